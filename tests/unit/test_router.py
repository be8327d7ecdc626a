"""The routing policies over worker snapshots, as a list (every worker scored) and through
the candidate index the pool keeps (a bounded sample scored): no Ray, no gRPC."""

import dataclasses
import random
from collections import Counter

import pytest

from scheduler.router import (
    EXACT_UP_TO,
    NOMINAL_TOKENS,
    CandidateIndex,
    PoolView,
    Router,
    WorkerSnapshot,
    capacity,
    fastest_key,
    predicted_seconds,
    room,
    throughput,
)
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


# -- the candidate index: what the pool hands the router (per-decision cost independent of N) --
def view(*indexed: tuple[str, list]):
    """A PoolView over one CandidateIndex per (model, workers)."""
    indexes = {}
    for model, ws in indexed:
        index = indexes.setdefault(model, CandidateIndex())
        for w in ws:
            index.put(w)
    everyone = [w for _, ws in indexed for w in ws]
    return PoolView(lambda: everyone, indexes)


def random_worker(rng, name, model="m"):
    return worker(name, rng.choice([FAST, SLOW]), model=model, num_running=rng.randint(0, 40),
                  num_waiting=rng.randint(0, 3), remaining_tokens=rng.randint(0, 9000),
                  tokens_per_s=rng.choice([0.0, rng.uniform(50, 900)]),
                  mean_accept_length=rng.choice([None, rng.uniform(1.0, 5.0)]),
                  pending_requests=rng.randint(0, 2), pending_tokens=rng.randint(0, 400))


@pytest.mark.parametrize("policy", ["fastest", "jsq", "round_robin"])
def test_a_small_pool_through_the_index_is_routed_exactly_as_the_list(policy):
    rng = random.Random(7)
    for trial in range(200):
        ws = [random_worker(rng, f"w{i}") for i in range(rng.randint(1, EXACT_UP_TO))]
        ws += [worker("x-unready", state="loading"), worker("x-sick", healthy=False),
               worker("x-other", model="other")]
        budget, exclude = rng.randint(1, 2048), frozenset(rng.sample([w.name for w in ws], 1))
        by_list = Router(policy).choose(ws, "m", budget, exclude)
        by_index = Router(policy).choose(
            view(("m", [w for w in ws if w.model == "m"]), ("other", [ws[-1]])), "m", budget,
            exclude)
        assert by_index == by_list, trial


def test_a_large_pool_never_gets_an_excluded_unready_sick_or_other_model_worker():
    rng = random.Random(3)
    ws = [random_worker(rng, f"w{i}") for i in range(2000)]
    bad = {w.name for w in ws[:500]}
    ws = ([dataclasses.replace(w, state=rng.choice(["loading", "draining", "quarantined"]))
           for w in ws[:250]] + [dataclasses.replace(w, healthy=False) for w in ws[250:500]]
          + ws[500:])
    # the best of them all, by far, is of another model
    other = [worker("o-best", FAST, model="other")]
    pool = view(("m", ws), ("other", other))
    assert len(pool.candidates("m")) == 1500  # not routable: never indexed
    exclude = frozenset(w.name for w in ws[500:1400])
    for policy in ("fastest", "p2c"):
        router = Router(policy, rng_seed=1)
        for _ in range(300):
            chosen = router.choose(pool, "m", rng.randint(1, 512), exclude)
            assert chosen.model == "m" and chosen.name not in bad | exclude
    # all but one excluded: that one, even though no sample holds it
    last = frozenset(w.name for w in ws[500:-1])
    assert Router(rng_seed=0).choose(pool, "m", 64, last).name == ws[-1].name
    assert Router().choose(pool, "m", 64, frozenset(w.name for w in ws)) is None
    assert Router().choose(pool, "nope", 64) is None


def test_a_worker_that_turns_unready_leaves_the_index_and_comes_back():
    index = CandidateIndex()
    ws = [worker(f"w{i}", num_running=5, remaining_tokens=5000) for i in range(100)]
    for w in ws:
        index.put(w)
    star = worker("star", FAST)
    index.put(star)
    pool = PoolView(lambda: [], {"m": index})
    assert Router(rng_seed=0).choose(pool, "m", 64).name == "star"
    index.put(dataclasses.replace(star, healthy=False))
    assert len(index) == 100 and index.get("star") is None
    assert Router(rng_seed=0).choose(pool, "m", 64).name != "star"
    index.put(star)
    assert Router(rng_seed=0).choose(pool, "m", 64).name == "star"


def test_the_sampled_router_finds_the_one_idle_fast_worker_among_thousands():
    rng = random.Random(5)
    busy = [worker(f"w{i:05d}", SLOW, num_running=30, remaining_tokens=rng.randint(4000, 9000))
            for i in range(10_000)]
    idle = worker("w-idle", FAST)
    pool = view(("m", busy + [idle]))
    assert Router(rng_seed=0).choose(pool, "m", 256).name == "w-idle"
    assert Router(rng_seed=0).choose(pool, "m", 256, frozenset({"w-idle"})).name != "w-idle"


def test_pending_dispatches_spread_a_burst_over_a_large_pool():
    """As over a list: the pool puts a worker again with each job sent to it, and the index's
    order follows, so a burst spreads over the best workers instead of piling on one."""
    index = CandidateIndex()
    for i in range(500):
        index.put(worker(f"w{i:03d}", SLOW, num_running=20, remaining_tokens=6000))
    for name in ("a", "b", "c"):
        index.put(worker(name, FAST))
    router, chosen = Router(rng_seed=0), []
    pool = PoolView(lambda: [], {"m": index})
    for _ in range(30):
        w = router.choose(pool, "m", 100)
        chosen.append(w.name)
        index.put(dataclasses.replace(w, pending_requests=w.pending_requests + 1,
                                      pending_tokens=w.pending_tokens + 100))
    assert Counter(chosen) == {"a": 10, "b": 10, "c": 10}


def test_the_index_order_and_least_queued_follow_every_change():
    rng = random.Random(11)
    index = CandidateIndex()
    live = {}
    for step in range(3000):
        name = f"w{rng.randint(0, 80)}"
        if rng.random() < 0.1:
            index.remove(name)
            live.pop(name, None)
            continue
        w = random_worker(rng, name)
        index.put(w)
        live[name] = w
        budget = rng.randint(1, 4096)
        assert index.key(w, budget) == fastest_key(w, budget)  # what the sample is scored by
        if step % 100 == 0:
            want = sorted(live.values(), key=lambda w: fastest_key(w, NOMINAL_TOKENS[1]))[:5]
            assert index.best(5, NOMINAL_TOKENS[1]) == want
            assert index.least_queued() == min(w.queued_requests for w in live.values())
            assert sorted(w.name for w in index.all()) == sorted(live)
    assert all(len(h._heap) <= 2 * len(live) + 65 for h in index._fast)  # dead entries are swept
    assert CandidateIndex().least_queued() is None


def test_capacity_is_the_same_through_the_index_as_over_the_list():
    rng = random.Random(2)
    ws = [random_worker(rng, f"w{i}") for i in range(300)]
    ws += [worker("idle-but-sick", healthy=False), worker("idle-other", model="other"),
           worker("idle-loading", state="loading")]
    pool = view(("m", [w for w in ws if w.model == "m"]), ("other", [ws[-2]]))
    assert capacity(pool, "m") == capacity(ws, "m")
    assert capacity(ws, "m") == (300, min(w.queued_requests for w in ws[:300]))
    assert capacity(pool, "other") == capacity(ws, "other") == (1, 0)
    assert capacity(pool, "nope") == capacity(ws, "nope") == (0, None)
    assert room(pool, "m", 20) == room(ws, "m", 20) > 0
    assert room(pool, "nope", 20) is room(ws, "nope", 20) is None
    index = pool.candidates("m")  # kept as workers come, change and go
    for w in ws[:50]:
        index.put(dataclasses.replace(w, num_waiting=w.num_waiting + 3))
    for w in ws[50:60]:
        index.remove(w.name)
    now = [dataclasses.replace(w, num_waiting=w.num_waiting + 3) for w in ws[:50]] + ws[60:]
    assert room(pool, "m", 20) == room(now, "m", 20)
    assert room(pool, "m", 30) == room(now, "m", 30)


def test_bad_sample_sizes_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="exact_up_to"):
        Router(exact_up_to=-1)
    with pytest.raises(ValueError, match="sample_random"):
        Router(sample_random=1.5)
    with pytest.raises(ValueError, match="sample_best"):
        Router(sample_best=1, sample_random=0)
