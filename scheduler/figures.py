"""Workers' figures on the scheduler's side: what the pool holds of each worker, how the
figures boards are read, and the workers' online and active time counted from the figures.

- Pushed figures (`sparkgrid.board`): workers push their `stats()` to the figures boards (on
  change, at most every `stats_interval_s`, and a heartbeat while unchanged); `Boards.read()`
  asks each board, once per read interval, for the entries pushed since the last read: one call
  per board, not per worker. The boards are made by the first scheduler that opens them (with
  its layout: shards, push interval, staleness bound); later ones read the same boards.
- Staleness: figures are at most the push interval + the read interval (+ call times) old; a
  worker whose pushes stop for `stale_after_s` (default 10 x `stats_interval_s`, at least 2 s)
  is unhealthy until it pushes again.
- Polled figures: an actor that has never pushed (an older worker, or while it looks for its
  board) is still called for its figures every interval, and so is every worker while no board
  answers: the old path, kept as the fallback.

Knows: Ray (the boards' calls), the contract, the ledger's day. Does not know: routing policy,
gRPC, Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal

from ray.exceptions import RayError

from scheduler.ledger import utc_day
from scheduler.router import WorkerSnapshot
from sparkgrid.board import layout, open_boards
from sparkgrid.contract import WorkerStats

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 5.0
MAX_READ_GAP_S = 5.0
REOPEN_EVERY_S = 5.0
"""How often a scheduler without boards tries to open them again (it polls meanwhile)."""
LIVE_STATES = ("ready", "draining", "loading")


def stale_after(stats_interval_s: float) -> float:
    """The default staleness bound of a scheduler reading every `stats_interval_s`."""
    return max(2.0, 10 * stats_interval_s)


@dataclass
class TrackedWorker:
    """One worker as the pool holds it."""

    name: str
    handle: object
    stats: WorkerStats
    healthy: bool = True
    failures: int = 0  # consecutive failed reads
    sent: deque = field(default_factory=deque)  # [job_id, tokens] sent, not yet reported accepted
    accepted: int = 0  # the worker's `requests` counter at the last read
    last_read: float | None = None  # monotonic time of the last good read
    figures_asked: float = 0.0  # monotonic time the figures we hold were asked for (or pushed)
    streaming: set = field(default_factory=set)  # job ids whose chunks are being read here
    strikes: list = field(default_factory=list)  # what it did against the rules, in order
    quarantined: str | None = None  # why it gets no more jobs (None: it does)
    registered: object = None  # its checked registration (`registry.Registered`), if required
    pushed_at: float | None = None  # monotonic time of its latest push seen (None: polled)
    pushed_figures: bool = False  # the board gave its figures since it was adopted here
    bad_figures: str | None = None  # why its last pushed figures were refused
    indexed_model: str | None = None  # the model whose candidate index holds it

    def snapshot(self) -> WorkerSnapshot:
        s = self.stats
        return WorkerSnapshot(
            name=self.name, model=s.model_id,
            state="quarantined" if self.quarantined else s.state, healthy=self.healthy,
            num_waiting=s.num_waiting, num_running=s.num_running,
            remaining_tokens=s.remaining_tokens, tokens_per_s=s.tokens_per_s,
            mean_accept_length=s.mean_accept_length, sps=s.sps, max_num_seqs=s.max_num_seqs,
            pending_requests=len(self.sent), pending_tokens=sum(t for _, t in self.sent))


class Boards:
    """The scheduler's reader of the figures boards. `calls` counts the calls it made."""

    def __init__(self, shards: int, push_interval_s: float, stale_after_s: float):
        self.wanted = layout(shards, push_interval_s, stale_after_s)
        self.stale_after_s = stale_after_s
        self.layout: dict | None = None
        """The layout the boards run with (the first scheduler's), once opened."""
        self.calls = 0
        self._handles: list = []
        self._cursor: dict[int, tuple[str | None, int]] = {}
        self._tried = float("-inf")

    async def open(self) -> bool:
        """Find or make the boards; False (the pool polls every worker) if that fails."""
        self._tried = time.monotonic()
        try:
            handles = await asyncio.to_thread(open_boards, self.wanted)
            found = await asyncio.wait_for(handles[0].layout.remote(), CALL_TIMEOUT_S)
            if found["shards"] != self.wanted["shards"]:  # made by another scheduler
                handles = await asyncio.to_thread(open_boards, found)
            self.calls += 1
        except (RayError, asyncio.TimeoutError, ValueError) as err:
            log.warning("figures boards cannot be opened (%s): every worker is polled", err)
            self._handles = []
            return False
        if found["heartbeat_s"] * 2 > self.stale_after_s:
            log.warning("figures boards: heartbeats every %.3g s, more than half the staleness "
                        "bound %.3g s: idle workers may flap", found["heartbeat_s"],
                        self.stale_after_s)
        self.layout, self._handles, self._cursor = found, handles, {}
        return True

    async def read(self) -> list | None:
        """[worker, figures dict or None (unchanged), health, seconds since the push] of every
        entry pushed since the last read; None when no board answers (poll every worker)."""
        if not self._handles:
            if time.monotonic() - self._tried < REOPEN_EVERY_S or not await self.open():
                return None
        try:
            self.calls += len(self._handles)
            replies = await asyncio.gather(*(
                asyncio.wait_for(h.since.remote(*self._cursor.get(i, (None, 0))), CALL_TIMEOUT_S)
                for i, h in enumerate(self._handles)))
        except (RayError, asyncio.TimeoutError) as err:
            log.warning("figures boards do not answer (%s): every worker is polled", err)
            self._handles, self._tried = [], time.monotonic()
            return None
        entries = []
        for i, reply in enumerate(replies):
            self._cursor[i] = (reply["epoch"], reply["version"])
            entries.extend(reply["entries"])
        return entries


class WorkerTime:
    """Online and active time per (worker, UTC day), from successive good figures."""

    def __init__(self):
        self._time: dict[tuple[str, str], list] = {}  # -> [online ms, active ms, registration]

    def count(self, w: TrackedWorker, stats: WorkerStats) -> None:
        """Online time is the time between good reads (a gap over MAX_READ_GAP_S counts only
        that much: the worker may have been away); it is active when either read saw work."""
        now = time.monotonic()
        if w.last_read is not None:
            elapsed_ms = round(1000 * min(now - w.last_read, MAX_READ_GAP_S))
            busy = any(s.num_running + s.num_waiting for s in (w.stats, stats))
            acc = self._time.setdefault((w.name, utc_day(time.time())),
                                        [0, 0, registration(stats)])
            acc[0] += elapsed_ms
            acc[1] += elapsed_ms if busy else 0
        w.last_read = now

    def take(self) -> list[tuple[str, dict, str, int, int]]:
        taken, self._time = self._time, {}
        return [(name, reg, day, online, active)
                for (name, day), (online, active, reg) in taken.items()]

    def give_back(self, entries) -> None:
        for name, reg, day, online, active in entries:
            acc = self._time.setdefault((name, day), [0, 0, reg])
            acc[0] += online
            acc[1] += active


def registration(stats: WorkerStats) -> dict:
    """What the ledger keeps of a worker: GPU type, price (whole micro-dollars per hour, the
    one rounding of a price), node and model."""
    price = Decimal(str(stats.price_per_hour)) * 1_000_000
    return {"gpu_type": stats.gpu_type,
            "price_uusd_per_hour": int(price.to_integral_value(ROUND_HALF_EVEN)),
            "node_ip": stats.node_ip, "model": stats.model_id}


@dataclass(frozen=True)
class WorkerStatus:
    """A worker as `ListWorkers` shows it: its own figures and the pool's view of it."""

    stats: WorkerStats
    healthy: bool
    pending_requests: int
    quarantined: str | None = None
    """Why the scheduler sends it nothing more (None: it is not quarantined)."""
    registered: object = None
    """Its checked registration (`registry.Registered`: operator, kind), if one was required."""
