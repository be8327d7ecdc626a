"""The scheduler's domain errors, one per status code a client can see.

Everything below the gRPC edge raises these; `scheduler/interceptors.py` maps them to status
codes (the table of docs/ARCHITECTURE.md), so no other module knows gRPC.
"""

from __future__ import annotations


class SchedulerError(Exception):
    """Base class: a failure a client is told about, with a message that says what to fix."""


class InvalidArgument(SchedulerError):
    """Bad input: the message starts with the field's name."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field

    @classmethod
    def from_message(cls, message: str) -> InvalidArgument:
        """From a message that already starts with `field: ` (the engine's errors do)."""
        field, _, problem = message.partition(": ")
        return cls(field, problem) if problem else cls("request", message)


class Unauthenticated(SchedulerError):
    """A missing, malformed, unknown or revoked API key."""


class NotFound(SchedulerError):
    """An unknown job id (or one of another tenant: the same answer, so ids leak nothing)."""


class PermissionDenied(SchedulerError):
    """A known party asking for what is not its own (an operator registering another's worker)."""


class Unavailable(SchedulerError):
    """No live worker serves the model, or every attempt of a job failed."""


class StoreUnavailable(Unavailable):
    """The job store (Redis) cannot be reached; nothing new is accepted until it is back."""


class ResourceExhausted(SchedulerError):
    """Every worker's queue is full, or the tenant's quota is used up."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s
