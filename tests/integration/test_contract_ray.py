"""A worker is a stranger's machine: what it sends over a real Ray cluster is read through the
contract. A named actor whose figures break it is never adopted; a worker that streams a
malformed chunk loses the job (which may resume elsewhere) and is marked unhealthy."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from impostors import impostor_class

from sparkgrid.contract import NAMESPACE, SamplingParams
from worker.models import shipped_pair

pytestmark = pytest.mark.integration


async def _pool_view(chunks_by_name: dict, stats_by_name: dict):
    from scheduler.worker_pool import WorkerLost, WorkerPool

    files = {"tokenizer.json": (Path(shipped_pair()[0]) / "tokenizer.json").read_bytes()}
    impostor = impostor_class()
    actors = [impostor.options(name=name, namespace=NAMESPACE).remote(
        stats_by_name[name], chunks_by_name.get(name, []), files) for name in stats_by_name]
    pool = WorkerPool("auto", stats_interval_s=0.2, discovery_interval_s=0.2)
    await pool.start()
    await asyncio.sleep(1.0)
    adopted = sorted(s.stats.name for s in pool.stats())
    outcome = None
    if "honest-but-garbled" in adopted:
        try:
            async for _ in pool.generate("honest-but-garbled", "job-1", [1, 2],
                                         SamplingParams(max_tokens=4), None, 4):
                pass
        except WorkerLost as err:
            outcome = str(err)
        healthy = {s.stats.name: s.healthy for s in pool.stats()}
    else:
        healthy = {}
    await pool.stop()
    import ray

    for a in actors:
        ray.kill(a)
    return adopted, outcome, healthy


def test_bad_figures_keep_an_actor_out_and_a_bad_chunk_loses_the_job(cluster, stats_wire):
    good_stats = stats_wire
    stats = {"liar": good_stats(name="liar", tokens_per_s="infinite"),
             "renamed": {**{k: v for k, v in good_stats(name="renamed").items()
                            if k != "verify_policy"}, "policy": "prefix"},
             "honest-but-garbled": good_stats(name="honest-but-garbled")}
    chunks = {"honest-but-garbled": [
        {"job_id": "job-1", "token_ids": [5], "text": "x", "finish_reason": None,
         "usage": None, "spec": {}},
        {"job_id": "job-1", "token_ids": [6], "text": "y", "finish_reason": "stop",
         "usage": {"prompt_tokens": 2, "completion_tokens": -1_000_000}, "spec": {}},
    ]}
    adopted, outcome, healthy = asyncio.run(_pool_view(chunks, stats))
    assert adopted == ["honest-but-garbled"]
    assert outcome is not None and "bad chunk" in outcome and "completion_tokens" in outcome
    assert healthy == {"honest-but-garbled": False}


async def _adopted(stats_by_name: dict, files_by_name: dict, pins=None) -> list[str]:
    """The actors a pool adopts, each lending the tokenizer files given for it, in order."""
    import ray

    from scheduler.worker_pool import WorkerPool

    impostor = impostor_class()
    pool = WorkerPool("auto", stats_interval_s=0.2, discovery_interval_s=0.2,
                      tokenizer_pins=pins)
    actors = []
    for name in stats_by_name:  # one at a time: the first of the model sets its tokenizer
        actors.append(impostor.options(name=name, namespace=NAMESPACE).remote(
            stats_by_name[name], [], files_by_name[name]))
        if not pool._tasks:
            await pool.start()
        # until the pool has decided on it: adopted, or refused with a reason
        deadline = time.monotonic() + 30
        while name not in pool._refused and name not in {s.stats.name for s in pool.stats()}:
            assert time.monotonic() < deadline, f"the pool did not decide on {name} in 30 s"
            await asyncio.sleep(0.1)
    adopted = sorted(s.stats.name for s in pool.stats())
    await pool.stop()
    for a in actors:
        ray.kill(a)
    return adopted


def test_every_worker_of_a_model_must_lend_its_tokenizer_and_pins_decide_which(
        cluster, stats_wire):
    import hashlib

    real = {"tokenizer.json": (Path(shipped_pair()[0]) / "tokenizer.json").read_bytes()}
    other = {"tokenizer.json": real["tokenizer.json"] + b"\n"}  # another file, still valid
    assert other != real
    stats = {n: stats_wire(name=n) for n in ("first", "same", "swapped")}
    files = {"first": real, "same": real, "swapped": other}
    assert asyncio.run(_adopted(stats, files)) == ["first", "same"]
    pinned = {"org/m": hashlib.sha256(other["tokenizer.json"]).hexdigest()}
    assert asyncio.run(_adopted(stats, files, pins=pinned)) == ["swapped"]
    assert asyncio.run(_adopted(stats, files, pins={"org/other": "0" * 64})) == []
