"""STS calibration from the engine's own verification logs, on a structured pair whose
drafter partly agrees with its target (`structured.py`), so acceptance is really partial.

The pair's confidence head is random; its weights are scaled up here so that it is
over-confident, the situation STS exists for (docs/DSPARK.md section 3): raw a_k sit near 0 or 1
while the true survival rates lie between. A temperature above 1 pulls them towards the rates,
so held-out ECE falls at every position, by a margin (about 0.1) far above the sampling noise
of a few hundred held-out blocks. (A merely random head, with logits near 0, is not: STS
cannot turn c_k near 0.5 into the right survival decay, and later positions may get worse.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from structured import structured_draft, structured_target

from worker.engine.calibration import calibrate_sts
from worker.engine.config import EngineConfig, SamplingParams
from worker.engine.draft_checkpoint import save_dspark_checkpoint
from worker.engine.drafter import DSparkDraft
from worker.engine.engine import LLMEngine
from worker.engine.model_runner import load_target
from worker.engine.sts import load_sts

pytestmark = pytest.mark.integration

NUM_PROMPTS = 24
MAX_TOKENS = 48


def engine_config(**overrides) -> EngineConfig:
    return EngineConfig(policy="fixed", profile_sps=False, **overrides)


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 20, (NUM_PROMPTS,), generator=gen).tolist()
    return [torch.randint(0, 30, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory) -> tuple[str, Path]:
    """(target dir, draft dir) with an over-confident confidence head."""
    root = tmp_path_factory.mktemp("calibration")
    target_dir = structured_target(root / "target")
    target = load_target(str(target_dir), device=torch.device("cpu"), dtype=torch.float32)
    draft_dir = structured_draft(root / "draft", target)
    draft = DSparkDraft.from_pretrained(draft_dir, target.config, dtype=torch.float32)
    with torch.no_grad():
        draft.confidence_head.proj.weight.mul_(100.0)
        draft.confidence_head.proj.bias.fill_(3.0)
    save_dspark_checkpoint(draft, json.loads((draft_dir / "config.json").read_text()), draft_dir)
    return str(target_dir), draft_dir


@pytest.fixture(scope="module")
def calibrated(pair_dirs) -> dict:
    target_dir, draft_dir = pair_dirs
    engine = LLMEngine.from_pretrained(target_dir, str(draft_dir),
                                       engine_config(record_confidence=True))
    assert engine.sts is None
    params = [SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=i)
              for i in range(NUM_PROMPTS)]
    return calibrate_sts(engine, prompts(), params, draft_dir=draft_dir)


def test_calibration_writes_sts_json_that_a_reloaded_engine_applies(pair_dirs, calibrated):
    target_dir, draft_dir = pair_dirs
    saved = json.loads((draft_dir / "sts.json").read_text())
    assert saved["temperatures"] == calibrated["temperatures"]
    assert saved["metrics"]["ece_after"] == calibrated["ece_after"]
    assert load_sts(draft_dir) == calibrated["temperatures"]
    reloaded = LLMEngine.from_pretrained(target_dir, str(draft_dir), engine_config())
    assert reloaded.sts == calibrated["temperatures"]
    assert len(reloaded.sts) == reloaded.gamma


def test_split_is_deterministic_and_covers_every_complete_block(calibrated):
    assert calibrated["num_fit"] + calibrated["num_heldout"] + \
        calibrated["num_capped_blocks_dropped"] == calibrated["num_blocks"]
    assert abs(calibrated["num_heldout"] - calibrated["num_fit"]) <= 1
    assert calibrated["num_heldout"] >= 200  # enough for the ECE comparison below


def test_sts_lowers_heldout_ece_of_an_overconfident_head(calibrated):
    for k, (before, after) in enumerate(zip(calibrated["ece_before"], calibrated["ece_after"])):
        assert after < before, f"position {k + 1}: ECE {before:.3f} -> {after:.3f}"
    # a positive temperature is order-preserving, so the first position ranks blocks as
    # before; only ties differ (raw float32 sigmoid saturates at 1.0 for logits above ~17)
    assert calibrated["auc_after"][0] == pytest.approx(calibrated["auc_before"][0], abs=1e-3)


def test_calibration_needs_an_engine_that_records_confidence(pair_dirs, tmp_path):
    target_dir, draft_dir = pair_dirs
    engine = LLMEngine.from_pretrained(target_dir, str(draft_dir), engine_config())
    with pytest.raises(ValueError, match="record_confidence"):
        calibrate_sts(engine, prompts()[:2], SamplingParams(max_tokens=8), draft_dir=tmp_path)
    assert not (tmp_path / "sts.json").exists()
