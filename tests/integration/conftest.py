"""Fixtures for engine integration tests: real weights on disk, loaded in float64 so that
greedy comparisons against `transformers` are exact rather than tie-prone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from structured import structured_draft, structured_target, word_tokenizer  # noqa: E402

from worker.engine.drafter import DSparkDraft  # noqa: E402
from worker.engine.model_runner import load_target  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def structured_pairs(tmp_path_factory):
    """(family, head_type) -> (target model, draft model, tokenizer), float64 on CPU."""
    root = tmp_path_factory.mktemp("structured")
    cache = {}

    def get(family: str, head_type: str, *, rank: int = 32, confidence: bool = True,
            bend: float = 0.6, sharpness: float = 4.0):
        key = (family, head_type, rank, confidence, bend, sharpness)
        if key not in cache:
            tdir = root / f"{family}-{bend}-{sharpness}"
            if not tdir.exists():
                structured_target(tdir, family, bend=bend, sharpness=sharpness)
            target = load_target(str(tdir), device=CPU, dtype=torch.float64)
            ddir = root / f"draft-{family}-{head_type}-{rank}-{confidence}-{bend}-{sharpness}"
            structured_draft(ddir, target, head_type=head_type, rank=rank,
                             confidence=confidence)
            draft = DSparkDraft.from_pretrained(ddir, target.config, device=CPU,
                                                dtype=torch.float64)
            cache[key] = (target, draft, word_tokenizer(root / "tok"), ddir)
        return cache[key]

    return get
