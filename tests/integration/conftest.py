"""Fixtures for engine integration tests: real weights on disk, loaded in float64 so that
greedy comparisons against `transformers` are exact rather than tie-prone."""

from __future__ import annotations

import sys
import warnings
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


@pytest.fixture(scope="module")
def cluster(request):
    """A local Ray cluster (token authentication on) joined by this process, for one module;
    with the dashboard when the module sets `RAY_DASHBOARD = True`."""
    import ray

    from worker import actor

    options = dict(num_cpus=8, namespace=actor.NAMESPACE, logging_level="ERROR",
                   include_dashboard=getattr(request.module, "RAY_DASHBOARD", False))
    try:
        ctx = ray.init(**options)
    except RuntimeError as err:  # a daemon that failed to start (seen once under load): again
        warnings.warn(f"ray.init failed, retrying once: {err}")
        ray.shutdown()
        ctx = ray.init(**options)
    yield ctx
    ray.shutdown()


@pytest.fixture(scope="module")
def make_worker(cluster, served_pair, sps_cache_dir):
    """Starts a worker through `launch` (what `sparkgrid worker` runs); returns (its handle,
    its config, what the launcher printed). Every worker started is killed at the module's end."""
    import io

    import ray

    from worker import actor
    from worker.launcher import LaunchOptions, launch
    from worker.worker_config import WorkerConfig

    target, draft = served_pair
    started = []

    def make(name: str, **changes):
        config = WorkerConfig(name=name, target=target, draft=draft, gpu_type="cpu",
                              sps_cache_dir=sps_cache_dir, max_batch_tokens=64, **changes)
        out = io.StringIO()
        assert launch(LaunchOptions(ray.get_runtime_context().gcs_address, config), out=out) == 0
        started.append(name)
        return actor.find_worker(name), config, out.getvalue()
    yield make
    for name in started:
        if (handle := actor.find_worker(name)) is not None:
            actor.kill(handle)

