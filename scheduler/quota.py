"""Quotas and rate limits: what a tenant's plan allows, and what one admission asks for.

A job is admitted atomically in Redis together with its record (`redis_store.create_job`):
the script refuses it when the tenant's requests in the last 60 s reach `requests_per_minute`,
or when the tokens used plus those reserved by running jobs plus this job's reservation would
pass `tokens_per_day` or `tokens_per_month` (UTC day and month); otherwise it reserves
`prompt + max_tokens` tokens. When the job ends, the same script that bills it swaps the
reservation for the tokens really billed. So a concurrent burst cannot overspend a budget at
all: the check and the reservation are one step, and no job can use more than it reserved.
The same script refuses a job while the tenant already has `max_concurrent_jobs` open (queued
or running) on any scheduler: it counts a per-tenant set of open jobs that it and the
finishing script keep; the client is told to retry in `CONCURRENCY_RETRY_S`.

Knows: limits, UTC calendar arithmetic. Does not know: Redis, gRPC.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

RATE_WINDOW_S = 60.0
CONCURRENCY_RETRY_S = 1.0
"""The retry hint of a job refused for `max_concurrent_jobs` (a slot frees when a job ends)."""


@dataclass(frozen=True)
class Limits:
    """A plan's limits; 0 is unlimited."""

    tokens_per_day: int = 0
    tokens_per_month: int = 0
    requests_per_minute: int = 0
    max_concurrent_jobs: int = 0
    """Jobs of the tenant open (queued or running) at once, across every scheduler."""

    @property
    def unlimited(self) -> bool:
        return not (self.tokens_per_day or self.tokens_per_month or self.requests_per_minute
                    or self.max_concurrent_jobs)


@dataclass(frozen=True)
class Admission:
    """What admitting one job checks and reserves."""

    limits: Limits
    reserve_tokens: int
    """prompt + max_tokens: the most the job can be billed."""
    now: float
    """Unix seconds."""

    @property
    def day(self) -> str:
        return _utc(self.now).strftime("%Y-%m-%d")

    @property
    def month(self) -> str:
        return _utc(self.now).strftime("%Y-%m")

    def seconds_to_next_day(self) -> float:
        t = _utc(self.now)
        nxt = dt.datetime.combine(t.date() + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
        return (nxt - t).total_seconds()

    def seconds_to_next_month(self) -> float:
        t = _utc(self.now)
        year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
        return (dt.datetime(year, month, 1, tzinfo=dt.timezone.utc) - t).total_seconds()


def refusal(tenant: str, which: str, admission: Admission, retry_after_s: float) -> str:
    """The message of a refused admission."""
    limit = getattr(admission.limits, which)
    period = {"tokens_per_day": f"for UTC day {admission.day}",
              "tokens_per_month": f"for UTC month {admission.month}",
              "requests_per_minute": "for the last 60 s",
              "max_concurrent_jobs": "open (queued or running) at once"}[which]
    what = {"requests_per_minute": "requests", "max_concurrent_jobs": "jobs"}.get(which, "tokens")
    extra = "" if what != "tokens" else (
        f" (this request reserves {admission.reserve_tokens}: its prompt plus max_tokens)")
    return (f"quota: tenant {tenant} would pass its plan's {which} of {limit} {what} "
            f"{period}{extra}; retry in {max(1, round(retry_after_s))} s")


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)
