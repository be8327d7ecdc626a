"""A job in flight on one scheduler, as the dispatcher holds it: what it delivered, on which
workers, and what its client gets next (`Piece`); and a routing decision, for metrics.

Knows: what a job's bill and record are made of. Does not know: routing, Ray, gRPC, Redis.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from scheduler.billing import JobEnd, Part
from scheduler.fair_queue import Ticket
from scheduler.jobs import JobState
from scheduler.ledger import Segment
from scheduler.prices import Plan
from scheduler.requests import JobRequest
from scheduler.text_check import ContentCheck


@dataclass
class Piece:
    """What the client gets next."""

    job_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: dict | None = None
    """Last piece only: prompt_tokens and completion_tokens, as billed."""


@dataclass(frozen=True)
class Decision:
    """One routing decision, for metrics and benchmarks."""

    job_id: str
    worker: str
    route_s: float
    """Time the router took to choose."""
    overhead_s: float
    """Time from the job's arrival here (its request checked) to this decision: writing the
    job record and routing, the scheduler's own cost before a worker gets the job."""


@dataclass
class Run:
    """A job in flight on this scheduler."""

    job_id: str
    tenant: str
    request: JobRequest
    plan: Plan
    arrived: float = field(default_factory=time.perf_counter)
    worker: str | None = None
    cancelled: bool = False
    delivered_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ticket: Ticket | None = None
    """Its place in the model's queue until a worker is chosen."""
    content: ContentCheck | None = None
    progress_write: asyncio.Task | None = None
    streamed: bool = True
    """Whether the client gets each piece as it comes (`Generate`) or all at the end."""
    admitted: bool = False
    """Let through by the queue; a job that never was is billed nothing (not even its prompt)."""

    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids) if self.admitted else 0

    def delivered_chars(self) -> int:
        return sum(map(len, self.text))

    def segments(self) -> tuple[Segment, ...]:
        """Each worker's part so far, as the ledger books it."""
        return tuple(part.segment() for part in self.parts)

    def end(self, state: JobState, finish_reason: str | None) -> JobEnd:
        """What the job's bill and final record are made of."""
        return JobEnd(self.job_id, self.tenant, self.request.model, self.plan.name, state,
                      self.prompt_tokens(), self.segments(), finish_reason or "",
                      "; ".join(self.errors) if state is JobState.FAILED else "",
                      tuple(self.workers), "".join(self.text), tuple(self.delivered_ids))
