"""A worker's claims weighed against what the scheduler observed of its streams: the tracker's
sums (tokens over stream seconds, time to first token included, at the load meanwhile), the
router's claim factor over real snapshots and the candidate index, and what the dispatcher
tells the tracker (delivered chunks only). No Ray, no gRPC."""

from __future__ import annotations

import asyncio

import pytest

from scheduler import observed as observed_module
from scheduler.billing import Part
from scheduler.observed import MIN_OBSERVED_TOKENS, ObservedSpeeds
from scheduler.router import (
    CLAIM_TOLERANCE,
    CandidateIndex,
    PoolView,
    Router,
    WorkerSnapshot,
    claimed_throughput,
    throughput,
)
from sparkgrid.contract import Chunk
from sparkgrid.costs import SPSTable

# 100 forwards/s up to 64 tokens, then slower: with tau 3, one request gets 300 tokens/s.
HONEST_SPS = SPSTable([1, 64, 512], [100.0, 100.0, 20.0])
BOASTED_SPS = SPSTable([1, 64, 512], [100_000.0, 100_000.0, 20_000.0])  # the same, x1000


def snap(name, sps=HONEST_SPS, **kw) -> WorkerSnapshot:
    base = dict(name=name, model="m", state="ready", healthy=True, num_waiting=0, num_running=0,
                remaining_tokens=0, tokens_per_s=0.0, mean_accept_length=3.0, sps=sps)
    return WorkerSnapshot(**{**base, **kw})


def deliver(tracker: ObservedSpeeds, worker: str, tokens: int, rate: float, at: float = 0.0,
            per_chunk: int = 1, ttft_s: float | None = None) -> float:
    """One stream of `tokens` from `worker`, a chunk of `per_chunk` tokens every
    per_chunk / rate seconds (the first after `ttft_s`, by default the same wait), told to
    the tracker as the dispatcher does; returns the time it ended."""
    part = Part(worker, "gpu", 8)
    part.started = part.last = at
    now, left = at, tokens
    while left > 0:
        n = min(per_chunk, left)
        now += (n / rate) if ttft_s is None or left < tokens else ttft_s
        chunk = Chunk("j", tuple(range(n)), "x" * n)
        tracker.saw(part, chunk, now=now)
        part.add(chunk)
        part.last = now  # `add` stamps the real clock; this stream runs on its own
        left -= n
    return now


@pytest.fixture
def no_decay(monkeypatch):
    monkeypatch.setattr(observed_module, "MEMORY_TOKENS", float("inf"))


# -- the tracker's sums -------------------------------------------------------------------------
def test_observed_rate_is_tokens_over_stream_seconds_with_the_wait_for_the_first(no_decay):
    tracker = ObservedSpeeds()
    # 1 token after 0.5 s, then 9 chunks of 2 tokens 0.1 s apart: 19 tokens in 1.4 s
    part = Part("w", "gpu", 8)
    part.started = part.last = 10.0
    for n, at in [(1, 10.5)] + [(2, 10.5 + 0.1 * k) for k in range(1, 10)]:
        chunk = Chunk("j", tuple(range(n)), "x" * n)
        tracker.saw(part, chunk, now=at)
        part.add(chunk)
        part.last = at
    seen = tracker.figures("w")
    assert seen.tokens == 19 and seen.ttft_s == pytest.approx(0.5)
    assert seen.tokens_per_s is None  # 19 < MIN_OBSERVED_TOKENS: not judged yet
    # a second stream, run alongside 3 others (the load the router counted): 60 tokens in 1 s
    tracker.apply(snap("w", num_running=3, pending_requests=1))
    deliver(tracker, "w", 60, 60.0, at=20.0, per_chunk=3)
    seen = tracker.figures("w")
    assert seen.tokens == 79 and seen.tokens_per_s == pytest.approx(79 / 2.4)
    assert seen.concurrency == pytest.approx((1 * 1.4 + 4 * 1.0) / 2.4)
    assert seen.ttft_s == pytest.approx(0.8 * 0.5 + 0.2 * 0.05)
    shown = tracker.apply(snap("w"))
    assert shown.observed_tokens_per_s == pytest.approx(79 / 2.4)
    assert shown.observed_concurrency == pytest.approx(seen.concurrency)


def test_a_chunk_that_carries_a_whole_answer_is_timed_from_the_stream_s_start(no_decay):
    """A worker cannot hide a slow job in the wait before one chunk."""
    tracker = ObservedSpeeds()
    deliver(tracker, "w", 100, rate=1000.0, per_chunk=100, ttft_s=10.0)
    assert tracker.figures("w").tokens_per_s == pytest.approx(10.0)


def test_the_observation_follows_a_worker_that_changes_speed():
    tracker = ObservedSpeeds()
    end = deliver(tracker, "w", 2000, rate=10.0)
    assert tracker.figures("w").tokens_per_s == pytest.approx(10.0)
    deliver(tracker, "w", 5 * observed_module.MEMORY_TOKENS, rate=100.0, at=end)
    assert tracker.figures("w").tokens_per_s == pytest.approx(100.0, rel=0.1)


def test_nothing_seen_leaves_the_snapshot_as_it_is():
    tracker = ObservedSpeeds()
    plain = snap("w")
    assert tracker.apply(plain) is plain and tracker.figures("w") is None
    deliver(tracker, "w", MIN_OBSERVED_TOKENS - 1, rate=1.0)
    assert tracker.apply(plain) == plain  # too few tokens: no observed figure


# -- the router weighs the claim ------------------------------------------------------------------
def test_a_worker_claiming_1000x_loses_routing_to_an_honest_one_once_observed():
    tracker = ObservedSpeeds()
    honest, boaster = snap("honest"), snap("boaster", sps=BOASTED_SPS, tokens_per_s=1e6)
    router = Router()
    assert router.choose([honest, boaster], "m", 64).name == "boaster"  # its word only
    deliver(tracker, "boaster", 2 * MIN_OBSERVED_TOKENS, rate=100.0)  # a third of the honest one
    deliver(tracker, "honest", 2 * MIN_OBSERVED_TOKENS, rate=280.0)
    seen = [tracker.apply(w) for w in (honest, boaster)]
    assert router.choose(seen, "m", 64).name == "honest"
    boaster_seen = seen[1]
    assert boaster_seen.claim_factor < 1 / 1000
    assert throughput(boaster_seen, 1) == pytest.approx(100.0)  # what it delivered
    assert throughput(seen[0], 1) == throughput(honest, 1)  # the honest claim stands


def test_a_claim_within_the_tolerance_keeps_its_weight_and_one_past_it_is_held_to_what_was_seen():
    claimed = claimed_throughput(snap("w"), 1)
    for observed, factor in [(claimed, 1.0), (claimed / (CLAIM_TOLERANCE * 0.99), 1.0),
                             (claimed / (CLAIM_TOLERANCE * 1.01), 1 / (CLAIM_TOLERANCE * 1.01)),
                             (claimed * 3, 1.0)]:  # faster than claimed: never raised
        w = snap("w", observed_tokens_per_s=observed)
        assert w.claim_factor == pytest.approx(factor)
        assert throughput(w, 1) == pytest.approx(claimed * factor)


def test_the_claim_is_compared_at_the_load_it_was_observed_at():
    """Forty requests at once share the worker's forwards: each goes slower than one alone,
    and an honest worker seen so is not taken for a boaster."""
    w = snap("w")
    per_request_at_40 = claimed_throughput(w, 40) / 40
    assert per_request_at_40 < claimed_throughput(w, 1) / CLAIM_TOLERANCE
    loaded = snap("w", observed_tokens_per_s=per_request_at_40, observed_concurrency=40.0)
    assert loaded.claim_factor == 1.0
    alone = snap("w", observed_tokens_per_s=per_request_at_40, observed_concurrency=1.0)
    assert alone.claim_factor < 1.0


def test_few_observed_tokens_keep_the_claim():
    tracker = ObservedSpeeds()
    honest, boaster = snap("honest"), snap("boaster", sps=BOASTED_SPS)
    deliver(tracker, "boaster", MIN_OBSERVED_TOKENS - 1, rate=1.0)
    seen = [tracker.apply(w) for w in (honest, boaster)]
    assert seen[1].observed_tokens_per_s is None and seen[1].claim_factor == 1.0
    assert Router().choose(seen, "m", 64).name == "boaster"


def test_the_weight_comes_back_when_the_worker_delivers_what_it_claims():
    tracker = ObservedSpeeds()
    w = snap("w")
    end = deliver(tracker, "w", 300, rate=50.0)  # a sixth of its claim: held to 50 tokens/s
    assert tracker.apply(w).claim_factor == pytest.approx(50.0 / claimed_throughput(w, 1),
                                                         rel=0.01)
    deliver(tracker, "w", 5 * observed_module.MEMORY_TOKENS, rate=280.0, at=end)
    assert tracker.apply(w).claim_factor == 1.0


# -- the candidate index follows the observation ---------------------------------------------------
def test_a_changed_observation_puts_the_worker_in_the_index_again():
    """Like the pool: the index holds each worker's snapshot with its observed figures, and the
    tracker re-indexes a worker whose figure moved, without waiting for its next figures."""
    raw = {"honest": snap("honest"), "boaster": snap("boaster", sps=BOASTED_SPS)}
    index = CandidateIndex()
    tracker = ObservedSpeeds(raw.get, lambda w: index.put(tracker.apply(w)))
    for w in raw.values():
        index.put(tracker.apply(w))
    view = PoolView(lambda: index.all(), {"m": index})
    router = Router(exact_up_to=0, sample_best=2, sample_random=0)  # the index's order decides
    assert router.choose(view, "m", 64).name == "boaster"
    deliver(tracker, "boaster", 2 * MIN_OBSERVED_TOKENS, rate=100.0)
    assert index.get("boaster").observed_tokens_per_s == pytest.approx(100.0)
    assert index.best(1, 64)[0].name == "honest"
    assert router.choose(view, "m", 64).name == "honest"


# -- what the dispatcher tells the tracker ---------------------------------------------------------
def test_the_dispatcher_reports_delivered_chunks_and_not_a_refused_one():
    from test_dispatch import chunk, collect, make

    dispatcher, pool, _, _ = make({
        "cheat": [chunk([1, 2], "ab"), chunk(list(range(20, 5020)), "x" * 5000, "stop")],
        "honest": [chunk([3], "c"), chunk([4, 5], "de", "stop")],
    })
    asyncio.run(collect(dispatcher))
    assert pool.strikes and pool.strikes[0][0] == "cheat"
    assert pool.observed.figures("cheat").tokens == pytest.approx(2, rel=0.01)
    assert pool.observed.figures("honest").tokens == pytest.approx(3, rel=0.01)


def test_a_dropped_worker_is_not_put_back_in_the_index_by_an_answer_in_flight():
    """The pool drops a worker (its operator revoked, say) while a read of its figures is in
    flight; when that answer lands, the worker must not be routable again."""
    from types import SimpleNamespace

    from scheduler.worker_pool import WorkerPool

    pool = WorkerPool("auto")
    w = SimpleNamespace(name="m-1", indexed_model=None, handle=None, snapshot=lambda: snap("m-1"))
    pool._workers["m-1"] = w
    pool._index(w)
    assert pool._indexes["m"].get("m-1") is not None
    pool._drop("m-1", "revoked")
    assert pool._indexes["m"].get("m-1") is None
    pool._index(w)  # the read that was in flight
    assert pool._indexes["m"].get("m-1") is None
    assert not pool.stats()
