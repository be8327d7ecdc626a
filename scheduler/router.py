"""Routing: which worker gets a request. Pure logic over a snapshot of the workers' figures.

Policies:
- `fastest` (the default): the worker serving the model with the smallest predicted completion
  time for this request: its queued work in tokens (what it reported plus what this scheduler
  sent it since) over the throughput it would have at that load, from its profiled `SPS(B)`
  and accepted length, calibrated by the tokens/s it measured while busy. All of that is the
  worker's own word: once this scheduler has read enough of its streams
  (`scheduler.observed`), a claim more than `CLAIM_TOLERANCE` times faster than what it
  delivered is scaled down to what it delivered (`claim_factor`), never up.
- `round_robin`, `jsq` (join the shortest queue, in requests) and `p2c` (power of two random
  choices, the shorter queue), for comparison.
Only `ready`, healthy workers of the request's model get anything.

Cost per decision. Over a plain list of snapshots every worker is scored (exact). The pool
hands the router a `PoolView` instead: per model a `CandidateIndex` of its routable workers,
kept up to date as figures arrive and jobs are sent (O(log N) per change, never rebuilt per
request) and ordered by predicted completion time for a few nominal budgets. Then `fastest`
scores a bounded set: the `SAMPLE_BEST` best of the two orders nearest the request's budget
(which already count what this scheduler sent since the figures) and `SAMPLE_RANDOM` random
candidates, each scored for the request's own budget; `p2c` samples its two from the index.
A model with at most `EXACT_UP_TO` routable workers is still scored exhaustively, exactly as
over a list. `round_robin` and `jsq` stay
exhaustive (O(N) per decision: they are kept for comparison). `capacity` and `room` answer a
capacity check (shortest queue, free slots) from the index too, without looking at every worker.

Knows: worker figures, the scheduler's own dispatch counts. Does not know: Ray, gRPC, Redis.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from sparkgrid.costs import SPSTable

POLICIES = ("fastest", "round_robin", "jsq", "p2c")
CALIBRATION_RANGE = (0.2, 5.0)
"""Measured/modelled throughput is trusted within this range (a noisy window cannot swing
a worker's estimate without bound)."""
CLAIM_TOLERANCE = 1.5
"""A worker's claimed speed per request stands while it is at most this many times what the
scheduler observed of its streams (network, batching and the scheduler's own reading make an
honest worker look somewhat slower); beyond it the worker is predicted at what was observed."""
EXACT_UP_TO = 64
"""A model with at most this many routable workers is scored exhaustively."""
SAMPLE_BEST = 8
"""Candidates `fastest` takes from the top of each of the two orders nearest the request."""
SAMPLE_RANDOM = 8
"""Candidates `fastest` draws at random besides."""
NOMINAL_TOKENS = (32, 128, 512, 2048)
"""The request budgets the index orders workers for: a worker's predicted time is linear in
the budget, so the best for a budget between two of these is near the top of one of them."""


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
    observed_tokens_per_s: float | None = None
    """Tokens/s per request of the streams this scheduler read from the worker, at
    `observed_concurrency` (`scheduler.observed`); None: too little seen to judge its claims."""
    observed_concurrency: float = 1.0
    """The worker's mean load (requests in flight) while they were read."""

    @property
    def queued_requests(self) -> int:
        return self.num_waiting + self.num_running + self.pending_requests

    @functools.cached_property
    def claim_factor(self) -> float:
        """What the worker's claimed throughput is multiplied by (see `claim_factor`)."""
        return claim_factor(self)

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


def claimed_throughput(w: WorkerSnapshot, concurrency: float) -> float:
    """Tokens/s at `concurrency` as the worker's figures put it: the profile's figure,
    calibrated by what the worker measured at its current load when it was busy; the measured
    figure alone when unprofiled."""
    modelled = modelled_throughput(w, concurrency)
    if modelled is None:
        return max(w.tokens_per_s, 1e-3)
    busy = w.num_running
    if busy > 0 and w.tokens_per_s > 0:
        now = modelled_throughput(w, busy)
        low, high = CALIBRATION_RANGE
        modelled *= min(high, max(low, w.tokens_per_s / now))
    return modelled


def claim_factor(w: WorkerSnapshot) -> float:
    """1 while the worker's claim is believable: too little observed, or its claimed tokens/s
    per request at the load it was observed at is within CLAIM_TOLERANCE of the observed one;
    else observed / claimed (< 1/CLAIM_TOLERANCE): it is predicted at what it delivered."""
    observed = w.observed_tokens_per_s
    if observed is None:
        return 1.0
    load = max(1.0, w.observed_concurrency)
    claimed = claimed_throughput(w, load) / load
    return 1.0 if claimed <= CLAIM_TOLERANCE * observed else observed / claimed


def throughput(w: WorkerSnapshot, concurrency: int) -> float:
    """Predicted tokens/s at `concurrency`: the worker's claim (`claimed_throughput`), held to
    what was observed of it (`claim_factor`)."""
    return claimed_throughput(w, concurrency) * w.claim_factor


def predicted_seconds(w: WorkerSnapshot, request_tokens: int) -> float:
    """Time until the worker would have generated its queued work and this request's."""
    return (w.queued_tokens + request_tokens) / throughput(w, w.queued_requests + 1)


def fastest_key(w: WorkerSnapshot, request_tokens: int) -> tuple:
    """What `fastest` minimises. Ties (below saturation, batching more is free) go to the less
    loaded worker, then to the name."""
    return (round(predicted_seconds(w, request_tokens), 6), w.queued_tokens, w.queued_requests,
            w.name)


def key_at_rate(w: WorkerSnapshot, rate: float, request_tokens: int) -> tuple:
    """`fastest_key` given `rate`, the worker's `throughput(w, w.queued_requests + 1)`."""
    return (round((w.queued_tokens + request_tokens) / rate, 6), w.queued_tokens,
            w.queued_requests, w.name)


def routable(w: WorkerSnapshot) -> bool:
    return w.state == "ready" and w.healthy


class _LazyHeap:
    """Names by key, smallest first; a name's key may change any time (O(log N)): entries
    that no longer hold its current key are dropped when met, and the heap is rebuilt when
    such dead entries outnumber the live ones."""

    def __init__(self):
        self._heap: list[tuple] = []
        self._key: dict[str, tuple] = {}

    def put(self, name: str, key: tuple) -> None:
        if self._key.get(name) == key:
            return
        self._key[name] = key
        heapq.heappush(self._heap, (key, name))
        if len(self._heap) > 2 * len(self._key) + 64:
            self._heap = [(k, n) for n, k in self._key.items()]
            heapq.heapify(self._heap)

    def remove(self, name: str) -> None:
        self._key.pop(name, None)

    def smallest(self, m: int, skip: frozenset[str] = frozenset()) -> list[str]:
        """The (at most) `m` names of the smallest keys, `skip` left out: O((m + dead) log N)."""
        out, live, seen = [], [], set()
        while self._heap and len(out) < m:
            key, name = heapq.heappop(self._heap)
            if self._key.get(name) != key or name in seen:
                continue  # an older key of the name, or the same key put twice: dead
            seen.add(name)
            live.append((key, name))
            if name not in skip:
                out.append(name)
        for entry in live:
            heapq.heappush(self._heap, entry)
        return out


class CandidateIndex:
    """The routable (`ready`, healthy) workers of one model, as their latest snapshots: O(1)
    random samples, and their orders by predicted completion time of a request of each of the
    NOMINAL_TOKENS budgets (the pool puts a worker's snapshot again whenever its figures or its
    pending count change, so the orders are always current). Not routable snapshots are taken
    out."""

    def __init__(self):
        self._snaps: dict[str, WorkerSnapshot] = {}
        self._rates: dict[str, float] = {}  # throughput at its queue + 1, from its snapshot
        self._names: list[str] = []
        self._pos: dict[str, int] = {}
        self._fast = [_LazyHeap() for _ in NOMINAL_TOKENS]
        self._queue = _LazyHeap()
        self._room_cap: int | None = None  # the cap `room` was last asked for
        self._room = 0  # free slots under that cap, kept as snapshots come and go

    def put(self, w: WorkerSnapshot) -> None:
        if not routable(w):
            self.remove(w.name)
            return
        if w.name not in self._snaps:
            self._pos[w.name] = len(self._names)
            self._names.append(w.name)
        else:
            self._room -= self._free(self._snaps[w.name])
        self._room += self._free(w)
        self._snaps[w.name] = w
        rate = self._rates[w.name] = throughput(w, w.queued_requests + 1)
        for heap, budget in zip(self._fast, NOMINAL_TOKENS):
            heap.put(w.name, key_at_rate(w, rate, budget))
        self._queue.put(w.name, (w.queued_requests, w.name))

    def remove(self, name: str) -> None:
        if (gone := self._snaps.pop(name, None)) is None:
            return
        self._room -= self._free(gone)
        del self._rates[name]
        i, last = self._pos.pop(name), self._names.pop()
        if last != name:  # the last name takes the freed place
            self._names[i] = last
            self._pos[last] = i
        for heap in self._fast:
            heap.remove(name)
        self._queue.remove(name)

    def __len__(self) -> int:
        return len(self._names)

    def get(self, name: str) -> WorkerSnapshot | None:
        return self._snaps.get(name)

    def key(self, w: WorkerSnapshot, request_tokens: int) -> tuple:
        """`fastest_key(w, request_tokens)` of an indexed snapshot, its throughput known."""
        return key_at_rate(w, self._rates[w.name], request_tokens)

    def all(self) -> list[WorkerSnapshot]:
        return list(self._snaps.values())

    def sample(self, k: int, rng: random.Random) -> list[WorkerSnapshot]:
        names = self._names
        picked = rng.sample(names, k) if k < len(names) else names
        return [self._snaps[n] for n in picked]

    def best(self, m: int, request_tokens: int = NOMINAL_TOKENS[1],
             skip: frozenset[str] = frozenset()) -> list[WorkerSnapshot]:
        """The `m` first of each of the two orders whose budgets bracket `request_tokens`
        (one order below the first budget or past the last), `skip` left out."""
        i = bisect.bisect_left(NOMINAL_TOKENS, request_tokens)  # the first budget >= it
        if i < len(NOMINAL_TOKENS) and NOMINAL_TOKENS[i] == request_tokens or i == 0:
            orders = [i]
        else:
            orders = [i - 1] if i == len(NOMINAL_TOKENS) else [i - 1, i]
        names: dict[str, None] = {}
        for k in orders:
            names.update(dict.fromkeys(self._fast[k].smallest(m, skip)))
        return [self._snaps[n] for n in names]

    def _free(self, w: WorkerSnapshot) -> int:
        return 0 if self._room_cap is None else max(0, self._room_cap - w.queued_requests)

    def room(self, cap: int) -> int:
        """Free request slots of the model's routable workers with `cap` requests each (O(1),
        after one O(N) count whenever `cap` changes)."""
        if cap != self._room_cap:
            self._room_cap = cap
            self._room = sum(self._free(w) for w in self._snaps.values())
        return self._room

    def least_queued(self) -> int | None:
        """The shortest queue (requests, pending ones included) of the model; None: no
        routable worker. For a capacity check that does not look at every worker."""
        first = self._queue.smallest(1)
        return self._snaps[first[0]].queued_requests if first else None


class PoolView:
    """What the pool hands the router: every worker's snapshot when iterated (O(N), made
    fresh), and each model's `CandidateIndex` (O(1) to reach)."""

    def __init__(self, snapshots: Callable[[], Iterable[WorkerSnapshot]],
                 indexes: Mapping[str, CandidateIndex]):
        self._snapshots = snapshots
        self._indexes = indexes

    def __iter__(self) -> Iterator[WorkerSnapshot]:
        return iter(self._snapshots())

    def candidates(self, model: str) -> CandidateIndex | None:
        return self._indexes.get(model)


def capacity(workers: Iterable[WorkerSnapshot], model: str) -> tuple[int, int | None]:
    """(routable workers of `model`, the shortest queue among them in requests, None if there
    are none): O(log N) over a `PoolView`, O(N) over a list."""
    if isinstance(workers, PoolView):
        index = workers.candidates(model)
        return (0, None) if index is None else (len(index), index.least_queued())
    queues = [w.queued_requests for w in workers if w.model == model and routable(w)]
    return len(queues), min(queues, default=None)


def room(workers: Iterable[WorkerSnapshot], model: str, cap: int) -> int | None:
    """Free request slots (`cap` each, less its queue) of the routable workers of `model`;
    None if there are none: O(1) over a `PoolView`, O(N) over a list."""
    if isinstance(workers, PoolView):
        index = workers.candidates(model)
        return index.room(cap) if index is not None and len(index) else None
    queues = [w.queued_requests for w in workers if w.model == model and routable(w)]
    return sum(max(0, cap - q) for q in queues) if queues else None


class Router:
    """Picks a worker per request by `policy`; `rng_seed` fixes the random choices (p2c, and
    the samples of `fastest` over a large pool)."""

    def __init__(self, policy: str = "fastest", rng_seed: int | None = None,
                 exact_up_to: int = EXACT_UP_TO, sample_best: int = SAMPLE_BEST,
                 sample_random: int = SAMPLE_RANDOM):
        if policy not in POLICIES:
            raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
        for name, value in (("exact_up_to", exact_up_to), ("sample_best", sample_best),
                            ("sample_random", sample_random)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
        if sample_best + sample_random < 2:
            raise ValueError("sample_best: with sample_random, expected at least 2 candidates")
        self.policy = policy
        self.exact_up_to = exact_up_to
        self.sample_best = sample_best
        self.sample_random = sample_random
        self._rng = random.Random(rng_seed)
        self._turn = itertools.count()

    def choose(self, workers: Iterable[WorkerSnapshot], model: str, request_tokens: int,
               exclude: frozenset[str] = frozenset()) -> WorkerSnapshot | None:
        """The worker for a request of `request_tokens` (its token budget), or None when no
        ready worker serves `model` (workers named in `exclude` are skipped: failover).
        `workers`: a list (every one is scored), or the pool's `PoolView` (see the module)."""
        if isinstance(workers, PoolView):
            index = workers.candidates(model)
            if index is None or not len(index):
                return None
            if len(index) > self.exact_up_to and self.policy in ("fastest", "p2c"):
                chosen = self._sampled(index, request_tokens, exclude)
                if chosen is not None:
                    return chosen
            workers = index.all()  # small, or every sampled one excluded: all of them
        pool = sorted((w for w in workers if w.model == model and routable(w)
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
        return min(pool, key=lambda w: fastest_key(w, request_tokens))

    def _sampled(self, index: CandidateIndex, request_tokens: int,
                 exclude: frozenset[str]) -> WorkerSnapshot | None:
        """A bounded number of candidates scored: O(sample) per decision, whatever N."""
        if self.policy == "p2c":
            pair = [w for w in index.sample(2 + len(exclude), self._rng)
                    if w.name not in exclude][:2]
            return min(pair, key=lambda w: w.queued_requests) if pair else None
        candidates = {w.name: w for w in index.best(self.sample_best, request_tokens, exclude)}
        for w in index.sample(self.sample_random, self._rng):
            if w.name not in exclude:
                candidates[w.name] = w
        if not candidates:
            return None
        return min(candidates.values(), key=lambda w: index.key(w, request_tokens))
