"""Routing: which worker gets a request. Pure logic over a snapshot of the workers' figures.

Policies:
- `fastest` (the default): the worker serving the model with the smallest predicted completion
  time for this request: its queued work in tokens (what it reported plus what this scheduler
  sent it since) over the throughput it would have at that load, from its profiled `SPS(B)`
  and accepted length, calibrated by the tokens/s it measured while busy.
- `round_robin`, `jsq` (join the shortest queue, in requests) and `p2c` (power of two random
  choices, the shorter queue), for comparison.
Only `ready`, healthy workers of the request's model get anything.

Knows: worker figures, the scheduler's own dispatch counts. Does not know: Ray, gRPC, Redis.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from sparkgrid.costs import SPSTable

POLICIES = ("fastest", "round_robin", "jsq", "p2c")
CALIBRATION_RANGE = (0.2, 5.0)
"""Measured/modelled throughput is trusted within this range (a noisy window cannot swing
a worker's estimate without bound)."""


@dataclass(frozen=True)
class WorkerSnapshot:
    """What the router knows of one worker."""

    name: str
    model: str
    state: str
    """Only `ready` workers get new requests."""
    healthy: bool
    num_waiting: int
    num_running: int
    remaining_tokens: int
    """Tokens still to generate for the worker's waiting and running requests, as reported."""
    tokens_per_s: float
    """Generated tokens per second over the worker's recent window, as measured."""
    mean_accept_length: float | None
    """Tokens committed per request per step (tau); None before any speculative request."""
    sps: SPSTable | None
    """Target forwards per second by tokens per forward, as profiled (None: not profiled)."""
    max_num_seqs: int = 64
    """Most requests the worker decodes at once; more wait."""
    pending_requests: int = 0
    """Requests this scheduler sent since the worker's figures were read."""
    pending_tokens: int = 0
    """Their token budgets."""

    @property
    def queued_requests(self) -> int:
        return self.num_waiting + self.num_running + self.pending_requests

    @property
    def queued_tokens(self) -> int:
        return self.remaining_tokens + self.pending_tokens


def modelled_throughput(w: WorkerSnapshot, concurrency: int) -> float | None:
    """Tokens/s with `concurrency` requests in flight, from the profile: each step commits
    tau tokens per request and verifies about tau + 1 per request in one target forward."""
    if w.sps is None:
        return None
    n = max(1, min(concurrency, w.max_num_seqs))
    tau = w.mean_accept_length or 1.0
    return n * tau * w.sps(max(1, round(n * (tau + 1))))


def throughput(w: WorkerSnapshot, concurrency: int) -> float:
    """Predicted tokens/s at `concurrency`: the profile's figure, calibrated by what the worker
    measured at its current load when it was busy; the measured figure alone when unprofiled."""
    modelled = modelled_throughput(w, concurrency)
    if modelled is None:
        return max(w.tokens_per_s, 1e-3)
    busy = w.num_running
    if busy > 0 and w.tokens_per_s > 0:
        now = modelled_throughput(w, busy)
        low, high = CALIBRATION_RANGE
        modelled *= min(high, max(low, w.tokens_per_s / now))
    return modelled


def predicted_seconds(w: WorkerSnapshot, request_tokens: int) -> float:
    """Time until the worker would have generated its queued work and this request's."""
    return (w.queued_tokens + request_tokens) / throughput(w, w.queued_requests + 1)


class Router:
    """Picks a worker per request by `policy`; `rng_seed` fixes the random choices of p2c."""

    def __init__(self, policy: str = "fastest", rng_seed: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self._rng = random.Random(rng_seed)
        self._turn = itertools.count()

    def choose(self, workers: list[WorkerSnapshot], model: str, request_tokens: int,
               exclude: frozenset[str] = frozenset()) -> WorkerSnapshot | None:
        """The worker for a request of `request_tokens` (its token budget), or None when no
        ready worker serves `model` (workers named in `exclude` are skipped: failover)."""
        pool = sorted((w for w in workers if w.model == model and w.state == "ready" and w.healthy
                       and w.name not in exclude), key=lambda w: w.name)
        if not pool:
            return None
        if self.policy == "round_robin":
            return pool[next(self._turn) % len(pool)]
        if self.policy == "jsq":
            return min(pool, key=lambda w: (w.queued_requests, w.queued_tokens))
        if self.policy == "p2c":
            pair = self._rng.sample(pool, 2) if len(pool) > 1 else pool
            return min(pair, key=lambda w: w.queued_requests)
        # Ties (below saturation, batching more is free) go to the less loaded worker.
        return min(pool, key=lambda w: (round(predicted_seconds(w, request_tokens), 6),
                                        w.queued_tokens, w.queued_requests, w.name))
