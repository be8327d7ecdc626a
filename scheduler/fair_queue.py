"""Admission of a model's jobs when its workers are full: one FIFO per tenant, round-robin.

`FairQueue(room, limits)` serves one model. `enter(tenant)` gives a `Ticket` at once:
- admitted at once when nobody waits and `room()` (free request slots on the model's workers,
  as the pool counts them) exceeds the jobs this queue has admitted that are not yet counted
  there (`in_transit`): a burst cannot overshoot between admission and dispatch;
- otherwise it waits in its tenant's FIFO. `pump()` (called when capacity may have freed: a
  job ended, the pool's figures changed, an admitted ticket left) admits waiting jobs while
  there is room, one per tenant in turn: the tenants with waiting jobs form a ring, a tenant
  new to the ring joins at its back, and each admission moves its tenant to the back. So a
  tenant's single job waits behind at most one job of each tenant ahead of it, however many
  those have queued.
Round-robin counts jobs, not tokens: the slot it hands out is a request slot (workers are full
by request count, `max_queue_per_worker`), token budgets are the quotas' business, and a
`max_tokens` is only an upper bound of what a job will cost.

Bounds (`QueueLimits`): jobs waiting per tenant and in all, and the longest wait; past them
`QueueRefused` (RESOURCE_EXHAUSTED naming the limit, with a retry hint). No live worker for the
model while jobs wait (`room()` is None): they fail with Unavailable, as a new request would.

A ticket holds its place until `release()`: while waiting (it leaves the queue), or once
admitted until the job is counted by the pool (dispatched) or ended. A task cancelled while it
waits in `wait()` leaves the queue at once; `cancel()` ends a wait from outside.

Knows: tenants, request slots, asyncio. Does not know: workers, Ray, Redis, gRPC, billing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from scheduler.errors import ResourceExhausted, Unavailable
from sparkgrid.checks import require

RETRY_AFTER_S = 1.0
"""The retry hint of a refusal."""


@dataclass(frozen=True)
class QueueLimits:
    """Bounds of one model's queue (named after the SchedulerConfig fields that set them)."""

    max_waiting_per_tenant: int = 1000
    max_waiting_per_model: int = 10_000
    max_queue_wait_s: float = 30.0

    def __post_init__(self):
        for name in ("max_waiting_per_tenant", "max_waiting_per_model"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                    name, "an integer >= 0", value)
        value = self.max_queue_wait_s
        require(isinstance(value, (int, float)) and value > 0, "max_queue_wait_s",
                "a number > 0", value)


class QueueRefused(ResourceExhausted):
    """A job the queue will not hold: `limit` names the bound it hit."""

    def __init__(self, limit: str, message: str):
        super().__init__(message, retry_after_s=RETRY_AFTER_S)
        self.limit = limit


WAITING, ADMITTED, GONE = "waiting", "admitted", "gone"


class Ticket:
    """One job's place: `wait()` until admitted; `release()` when it no longer needs one."""

    def __init__(self, queue: FairQueue, tenant: str):
        self.queue = queue
        self.tenant = tenant
        self.state = WAITING
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.timer: asyncio.TimerHandle | None = None
        self.entered = time.monotonic()
        self.admitted_at: float | None = None

    def waited_s(self) -> float:
        """Seconds from `enter` to admission (or until now, while it waits)."""
        return (self.admitted_at or time.monotonic()) - self.entered

    @property
    def waiting(self) -> bool:
        return self.state == WAITING

    async def wait(self) -> bool:
        """True once admitted; False when `cancel()` ended the wait. Raises QueueRefused (the
        longest wait passed) or Unavailable (no live worker is left)."""
        try:
            return await self.future
        except asyncio.CancelledError:
            self.release()
            raise

    def cancel(self) -> None:
        """End the wait of a waiting ticket (`wait()` returns False); nothing otherwise."""
        if self.state == WAITING:
            self.queue._drop(self)
            self.future.set_result(False)

    def release(self) -> None:
        """The job no longer needs its place: dispatched (the pool counts it now) or ended.
        Idempotent."""
        if self.state == WAITING:
            self.queue._drop(self)
        elif self.state == ADMITTED:
            self.state = GONE
            self.queue.in_transit -= 1
            self.queue.pump()
        if not self.future.done():
            self.future.cancel()
        elif not self.future.cancelled():
            self.future.exception()  # retrieved: no "never retrieved" warning


class FairQueue:
    """One model's waiting jobs: a FIFO per tenant, let through round-robin (see above)."""

    def __init__(self, room: Callable[[], int | None], limits: QueueLimits = QueueLimits(),
                 what: str = "model"):
        self.room = room
        """Free request slots on the model's workers now (the pool's count, which includes
        what was dispatched); None when no live worker serves the model."""
        self.limits = limits
        self.what = what
        """How refusals name the queue ("model m")."""
        self.in_transit = 0
        """Tickets admitted, not yet released (not yet counted by `room`)."""
        self._lanes: dict[str, deque[Ticket]] = {}
        self._ring: deque[str] = deque()
        self.waiting = 0

    def waiting_of(self, tenant: str) -> int:
        lane = self._lanes.get(tenant)
        return len(lane) if lane else 0

    def enter(self, tenant: str) -> Ticket:
        """A ticket for the tenant's next job, admitted at once when there is room and nobody
        waits; QueueRefused when it would wait past a bound; Unavailable without workers."""
        room = self.room()
        if room is None:
            raise Unavailable(f"{self.what}: no live worker serves it now")
        ticket = Ticket(self, tenant)
        if not self._ring and room > self.in_transit:  # nobody waits and there is room
            self._admit(ticket)
            return ticket
        lane = self._lanes.get(tenant)
        if lane is None:
            lane = self._lanes[tenant] = deque()
            self._ring.append(tenant)
        lane.append(ticket)
        self.waiting += 1
        self.pump()
        if ticket.state == WAITING:
            limit = None
            if len(lane) > self.limits.max_waiting_per_tenant:
                limit = ("max_waiting_per_tenant", self.limits.max_waiting_per_tenant,
                         "of this tenant")
            elif self.waiting > self.limits.max_waiting_per_model:
                limit = ("max_waiting_per_model", self.limits.max_waiting_per_model, "in all")
            if limit is not None:
                ticket.release()
                name, value, whose = limit
                raise QueueRefused(name, f"{self.what}: every worker is full and {value} jobs "
                                         f"{whose} already wait ({name}); retry later")
            loop = asyncio.get_running_loop()
            ticket.timer = loop.call_later(self.limits.max_queue_wait_s, self._expire, ticket)
        return ticket

    def pump(self) -> int:
        """Admit waiting jobs while there is room, one tenant at a time; how many it admitted.
        With no live worker left, every waiting job fails (Unavailable)."""
        admitted = 0
        while self._ring:
            room = self.room()
            if room is None:
                self._fail_all(lambda: Unavailable(f"{self.what}: no live worker serves it now"))
                break
            if room - self.in_transit <= 0:
                break
            tenant = self._ring.popleft()
            lane = self._lanes[tenant]
            ticket = lane.popleft()
            if lane:
                self._ring.append(tenant)
            else:
                del self._lanes[tenant]
            self.waiting -= 1
            if ticket.future.done():  # its wait was cancelled without release(): skip it
                ticket.state = GONE
                continue
            self._admit(ticket)
            admitted += 1
        return admitted

    # -- internals --------------------------------------------------------------------------
    def _admit(self, ticket: Ticket) -> None:
        ticket.state = ADMITTED
        ticket.admitted_at = time.monotonic()
        self.in_transit += 1
        if ticket.timer is not None:
            ticket.timer.cancel()
        ticket.future.set_result(True)

    def _drop(self, ticket: Ticket) -> None:
        """Take a waiting ticket out of its lane (the ring keeps the others' order)."""
        lane = self._lanes[ticket.tenant]
        lane.remove(ticket)
        self.waiting -= 1
        if not lane:
            del self._lanes[ticket.tenant]
            self._ring.remove(ticket.tenant)
        ticket.state = GONE
        if ticket.timer is not None:
            ticket.timer.cancel()

    def _expire(self, ticket: Ticket) -> None:
        if ticket.state == WAITING:
            self._drop(ticket)
            limit = self.limits.max_queue_wait_s
            ticket.future.set_exception(QueueRefused(
                "max_queue_wait_s", f"{self.what}: every worker stayed full for the longest "
                                    f"wait ({limit:g} s, max_queue_wait_s); retry later"))

    def _fail_all(self, error: Callable[[], Exception]) -> None:
        for lane in list(self._lanes.values()):
            for ticket in list(lane):
                self._drop(ticket)
                ticket.future.set_exception(error())
