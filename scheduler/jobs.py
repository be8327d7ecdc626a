"""A job's life: its states and the transitions between them, checked in one place.

    queued -> running -> finished
       |         |  \\-> cancelled
       |         \\----> failed
       \\--> cancelled, failed

A job that fails over stays `running` (it gains a worker, `Job.workers`). `finished`,
`cancelled` and `failed` are final: nothing leaves them, so a late event from a dead worker
cannot reopen a billed job.

Knows: states and transitions. Does not know: where jobs are stored, gRPC, Ray.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = frozenset({JobState.FINISHED, JobState.CANCELLED, JobState.FAILED})
TRANSITIONS = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.FINISHED, JobState.CANCELLED, JobState.FAILED}),
    JobState.FINISHED: frozenset(),
    JobState.CANCELLED: frozenset(),
    JobState.FAILED: frozenset(),
}


class TransitionError(ValueError):
    """A state change that the job's life does not allow."""


def check_transition(job_id: str, current: JobState, new: JobState) -> None:
    if new not in TRANSITIONS[current]:
        raise TransitionError(f"job {job_id}: cannot go from {current.value} to {new.value}")


@dataclass
class Job:
    """A job as the scheduler and the ledger see it."""

    job_id: str
    tenant: str
    model: str
    request_id: str = ""
    """The client's idempotency key ("" when none was given)."""
    state: JobState = JobState.QUEUED
    workers: list[str] = field(default_factory=list)
    """Every worker that served part of the job, in order."""
    created_at: float = 0.0
    finished_at: float = 0.0
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Tokens the scheduler delivered to the client: what is billed."""
    claimed_completion_tokens: int = 0
    """What the workers said they generated (kept beside, never billed)."""
    draft_tokens: int = 0
    verified_tokens: int = 0
    accepted_tokens: int = 0
    error: str = ""
