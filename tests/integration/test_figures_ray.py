"""Pushed figures over a real Ray cluster: what workers push to the figures board reaches the
pool without the pool calling them; a worker whose pushes stop goes unhealthy (and comes back
when they resume); only the workers streaming the pool's jobs get its lease renewals; a real
worker actor pushes its own figures and heartbeats."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from sparkgrid.contract import NAMESPACE
from worker.models import shipped_pair

pytestmark = pytest.mark.integration
MODEL = "org/m"


def counting_actor_class():
    """A named actor that answers like a worker and counts the calls it gets; each job streams
    `chunks`, one every `gap_s`."""
    import ray

    @ray.remote
    class Counted:
        def __init__(self, stats: dict, files: dict, chunks: list[dict], gap_s: float):
            self._stats, self._files, self._chunks, self._gap_s = stats, files, chunks, gap_s
            self._calls: dict[str, int] = {}
            self._renewed: set[str] = set()

        def _count(self, what):
            self._calls[what] = self._calls.get(what, 0) + 1

        async def stats(self):
            self._count("stats")
            return self._stats

        async def check_health(self):
            self._count("check_health")

        async def renew(self, job_ids, lease_s):
            self._count("renew")
            self._renewed.update(job_ids)
            return []

        async def cancel(self, job_id):
            return True

        async def tokenizer_files(self):
            return self._files

        async def calls(self):
            return dict(self._calls), sorted(self._renewed)

        @ray.method(num_returns="streaming")
        async def generate(self, job_id, prompt_ids, params, resume, lease_s):
            for chunk in self._chunks:
                await asyncio.sleep(self._gap_s)
                yield {**chunk, "job_id": job_id}

    return Counted


async def until(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return value


async def _scenario(stats_wire) -> None:
    import ray

    from scheduler.worker_pool import WorkerPool
    from sparkgrid.board import BOARD_NAMESPACE, board_name

    files = {"tokenizer.json": (Path(shipped_pair()[0]) / "tokenizer.json").read_bytes()}
    chunks = [{"token_ids": [5], "text": "x", "finish_reason": None, "usage": None, "spec": {}}
              for _ in range(5)]
    chunks.append({"token_ids": [6], "text": "y", "finish_reason": "stop",
                   "usage": {"prompt_tokens": 2, "completion_tokens": 6}, "spec": {}})
    counted = counting_actor_class()
    actors = {n: counted.options(name=n, namespace=NAMESPACE).remote(
        stats_wire(name=n, model_id=MODEL), files, chunks, 0.3) for n in ("fig-a", "fig-b")}
    pool = WorkerPool("auto", stats_interval_s=0.2, discovery_interval_s=0.2)
    await pool.start()
    pushing = {"fig-a": True, "fig-b": True}
    figures = {"fig-a": stats_wire(name="fig-a", model_id=MODEL, num_running=7),
               "fig-b": stats_wire(name="fig-b", model_id=MODEL, num_running=3)}
    board = ray.get_actor(board_name(0), namespace=BOARD_NAMESPACE)
    assert pool.boards.stale_after_s == 2.0  # 10 x the 0.2 s interval

    async def push_loop():  # what each worker's Pusher does: figures once, then heartbeats
        while True:
            for name in figures:
                if pushing[name]:
                    await board.push.remote(name, figures[name])
                    figures[name] = None
            await asyncio.sleep(0.3)
            for name in figures:
                if pushing[name] and figures[name] is None:
                    await board.push.remote(name, None)

    def seen(name):
        return {s.stats.name: s for s in pool.stats()}.get(name)

    pusher = None
    try:
        await until(lambda: seen("fig-a") and seen("fig-b"), 10, "both adopted")
        assert seen("fig-a").stats.num_running == 2  # what it answered when called
        pusher = asyncio.create_task(push_loop())
        await until(lambda: seen("fig-a").stats.num_running == 7, 5, "pushed figures")
        await until(lambda: seen("fig-b").stats.num_running == 3, 5, "pushed figures")
        before = {n: (await a.calls.remote())[0] for n, a in actors.items()}
        await asyncio.sleep(1.0)  # 5 read intervals: a polled worker would be called 10 times
        after = {n: (await a.calls.remote())[0] for n, a in actors.items()}
        assert after == before and seen("fig-a").stats.num_running == 7
        assert all(seen(n).healthy for n in actors)

        # a job streaming from fig-a (1.8 s): its lease is renewed there, and only there
        got = [c async for c in pool.generate("fig-a", "job-1", [1, 2], _params(), None, 8)]
        assert got[-1].finish_reason == "stop"
        (calls_a, renewed_a), (calls_b, renewed_b) = [await a.calls.remote()
                                                      for a in actors.values()]
        assert calls_a.get("renew", 0) >= 3 and renewed_a == ["job-1"]
        assert "renew" not in calls_b and renewed_b == []

        # fig-b's pushes stop: unhealthy within the staleness bound, out of the candidates
        pushing["fig-b"] = False
        stopped = time.monotonic()
        await until(lambda: not seen("fig-b").healthy, 6, "fig-b unhealthy")
        assert time.monotonic() - stopped >= 1.5  # not before the bound (2 s, less a read)
        assert seen("fig-a").healthy
        index = pool.snapshots().candidates(MODEL)
        assert index.get("fig-b") is None and index.get("fig-a") is not None
        pushing["fig-b"] = True  # and back
        await until(lambda: seen("fig-b").healthy, 5, "fig-b healthy again")

        # figures that break the contract, or a failed health check, pushed: unhealthy
        figures["fig-b"] = stats_wire(name="fig-b", model_id=MODEL, tokens_per_s="fast")
        await until(lambda: not seen("fig-b").healthy, 5, "bad figures refused")
        pushing["fig-a"] = False
        await board.push.remote("fig-a", None, "engine failed: boom")
        await until(lambda: not seen("fig-a").healthy, 1.0, "failed health pushed")
        assert pool.boards.calls > 0
    finally:
        if pusher is not None:
            pusher.cancel()
        await pool.stop()
        for a in actors.values():
            ray.kill(a)


def _params():
    from sparkgrid.contract import SamplingParams

    return SamplingParams(max_tokens=8)


def test_pushed_figures_reach_the_pool_and_silence_makes_a_worker_unhealthy(cluster,
                                                                             stats_wire):
    asyncio.run(_scenario(stats_wire))


def test_a_real_worker_pushes_its_figures_and_heartbeats(cluster, make_worker):
    import ray

    from sparkgrid.board import layout, open_boards

    board = open_boards(layout(1, 0.2, 2.0))[0]  # the same boards a scheduler opens
    handle = make_worker("w-push")[0]

    def entry(since=(None, 0)):
        reply = ray.get(board.since.remote(*since))
        return reply, {e[0]: e for e in reply["entries"]}.get("w-push")

    deadline = time.monotonic() + 30
    while (found := entry()[1]) is None or found[1]["state"] != "ready":
        assert time.monotonic() < deadline, "no figures pushed"
        time.sleep(0.2)
    assert found[1]["name"] == "w-push" and found[1]["requests"] == 0 and found[2] is None
    reply, _ = entry()
    time.sleep(1.5)  # idle: heartbeats only (the figures are not sent again)
    _, beat = entry((reply["epoch"], reply["version"]))
    assert beat is not None and beat[1] is None and beat[3] < 1.0
    for ref in handle.generate.remote("job-p", "x = 1\n", {"max_tokens": 4}):
        ray.get(ref)
    deadline = time.monotonic() + 10
    while (found := entry()[1])[1]["requests"] != 1:
        assert time.monotonic() < deadline, "the accepted job never reached the board"
        time.sleep(0.2)
