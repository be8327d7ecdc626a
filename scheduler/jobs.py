"""A job's life: its states and the transitions between them, checked in one place.

    queued -> running -> finished
       |         |  \\-> cancelled
       |         \\----> failed
       \\--> cancelled, failed

A job that fails over stays `running` (it only gains a worker). `finished`,
`cancelled` and `failed` are final: nothing leaves them, so a late event from a dead worker
cannot reopen a billed job.

Knows: states and transitions. Does not know: where jobs are stored, gRPC, Ray.
"""

from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


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
