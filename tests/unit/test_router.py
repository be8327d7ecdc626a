"""The routing policies over worker snapshots (no Ray, no gRPC)."""

import dataclasses
from collections import Counter

import pytest

from scheduler.router import Router, WorkerSnapshot, predicted_seconds, throughput
from sparkgrid.costs import SPSTable

# A device whose forwards cost the same up to 64 tokens, then grow: 100 forwards/s flat.
FAST = SPSTable([1, 64, 512], [100.0, 100.0, 20.0])
SLOW = SPSTable([1, 64, 512], [100.0 / 3, 100.0 / 3, 20.0 / 3])


def worker(name, sps=FAST, **kw):
    base = dict(name=name, model="m", state="ready", healthy=True, num_waiting=0, num_running=0,
                remaining_tokens=0, tokens_per_s=0.0, mean_accept_length=3.0, sps=sps)
    return WorkerSnapshot(**{**base, **kw})


def test_only_ready_healthy_workers_of_the_model_get_work():
    ws = [worker("a", state="draining"), worker("b", state="loading"), worker("c", healthy=False),
          worker("d", model="other"), worker("e")]
    for policy in ("fastest", "round_robin", "jsq", "p2c"):
        router = Router(policy, rng_seed=0)
        assert {router.choose(ws, "m", 64).name for _ in range(10)} == {"e"}
        assert router.choose(ws, "nope", 64) is None
        assert router.choose(ws, "m", 64, exclude=frozenset({"e"})) is None


def test_fastest_prefers_the_faster_device_at_equal_queues():
    assert Router().choose([worker("slow", SLOW), worker("fast", FAST)], "m", 64).name == "fast"


def test_fastest_weighs_queued_tokens_not_only_requests():
    # Same number of queued requests, but one queue holds far more tokens.
    heavy = worker("heavy", num_running=2, remaining_tokens=4000)
    light = worker("light", num_running=2, remaining_tokens=40)
    assert Router().choose([heavy, light], "m", 64).name == "light"
    # Fewer requests but many more tokens: the fastest policy sees the work, jsq only the count.
    heavy_one = worker("heavy-one", num_running=1, remaining_tokens=8000)
    light_three = worker("light-three", num_running=3, remaining_tokens=60)
    assert Router().choose([heavy_one, light_three], "m", 64).name == "light-three"
    assert Router("jsq").choose([heavy_one, light_three], "m", 64).name == "heavy-one"

def test_fastest_sends_to_the_slow_device_when_the_fast_one_is_far_busier():
    fast = worker("fast", num_running=64, num_waiting=140, remaining_tokens=204 * 256)
    slow = worker("slow", SLOW)
    assert predicted_seconds(slow, 256) < predicted_seconds(fast, 256)
    assert Router().choose([fast, slow], "m", 256).name == "slow"


def test_measured_throughput_calibrates_the_profile():
    base = worker("w", num_running=4)
    measured_slow = dataclasses.replace(base, tokens_per_s=throughput(base, 4) / 2)
    assert throughput(measured_slow, 4) == pytest.approx(throughput(base, 4) / 2)
    wild = dataclasses.replace(base, tokens_per_s=throughput(base, 4) * 1000)
    assert throughput(wild, 4) == pytest.approx(throughput(base, 4) * 5)  # clamped
    unprofiled = worker("u", sps=None, tokens_per_s=123.0)
    assert throughput(unprofiled, 10) == 123.0


def test_pending_dispatches_spread_a_burst():
    """The scheduler's own count of what it sent since the last report stops a burst from all
    landing on the worker that looked idlest."""
    ws = {n: worker(n) for n in ("a", "b", "c")}
    router = Router()
    chosen = []
    for _ in range(30):
        w = router.choose(list(ws.values()), "m", 100)
        chosen.append(w.name)
        ws[w.name] = dataclasses.replace(w, pending_requests=w.pending_requests + 1,
                                         pending_tokens=w.pending_tokens + 100)
    assert Counter(chosen) == {"a": 10, "b": 10, "c": 10}


def test_round_robin_cycles_and_p2c_is_seeded():
    ws = [worker(n) for n in ("a", "b", "c")]
    rr = Router("round_robin")
    assert [rr.choose(ws, "m", 1).name for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    picks = [[Router("p2c", rng_seed=s).choose(ws, "m", 1).name for _ in range(5)] for s in (1, 1)]
    assert picks[0] == picks[1]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy"):
        Router("random")
