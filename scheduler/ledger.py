"""The usage ledger: how one job's bill is booked, by dimension and UTC day.

A `Bill` (what a job is billed, made and settled by `billing.py`) carries the job's segments,
each worker's part; the workers' own claims in them (draft, verified and accepted tokens, busy
time) are kept beside for reports, never billed. `increments(bill)` maps (dimension, key, day)
to {field: amount}:

- `tenant` (key: the tenant), `model` (key: the model) and `all` (key: "all") get the job's
  fields: `jobs` = 1, the billed `prompt_tokens`, `completion_tokens` and `charge_uusd`, and the
  segments' `draft_tokens`, `verified_tokens`, `accepted_tokens`, `spec_steps`.
- `worker` (key: the worker's name) and `gpu` (key: the GPU type) get, per distinct worker
  (GPU type) of the job's segments: `segments`, their delivered `completion_tokens`, their
  `processed_prompt_tokens` (the prompts they prefilled: a failover re-sends the delivered
  tokens as prompt, so this is real work, not billed work), spec figures, `busy_ms`, and the
  job's charge split by delivered tokens (whole micro-dollars, largest remainder). The job's
  `jobs` = 1 and billed `prompt_tokens` go to the FIRST segment's worker (GPU type) only.

So every dimension partitions the same job: for each job field, the sum over any dimension's
keys equals the `all` total exactly, and `worker` and `gpu` agree on the fields only they
have. A bill with no segments (a job that never reached a worker) is booked under the worker
and GPU type `NO_WORKER`, which keeps the sums exact. Zero amounts are left out.

Beside bills, the scheduler adds to the `worker` dimension as it watches workers: their time
and GPU cost (`worker_time`, also to `gpu` and `all`), and each audit verdict on one of their
jobs (`audit_verdict`: `audited_jobs`, `failed_audits`, on the UTC day of the verdict).

Knows: bills, segments, UTC days. Does not know: what a job is billed or priced at
(`billing.py`), Redis (see `redis_store.py`), gRPC.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from datetime import date, datetime, timedelta, timezone

from scheduler.errors import InvalidArgument

DIMENSIONS = ("tenant", "model", "worker", "gpu", "all")
JOB_FIELDS = ("jobs", "prompt_tokens", "completion_tokens", "draft_tokens", "verified_tokens",
              "accepted_tokens", "spec_steps", "charge_uusd")
"""Fields of the `tenant`, `model` and `all` dimensions."""
WORKER_FIELDS = JOB_FIELDS + ("segments", "processed_prompt_tokens", "busy_ms")
"""Fields of the `worker` and `gpu` dimensions."""
WORKER_TIME_FIELDS = ("online_ms", "active_ms", "gpu_cost_scaled")
"""Fields the scheduler adds as it watches workers (`worker`, `gpu` and `all` dimensions)."""
AUDIT_FIELDS = ("audited_jobs", "failed_audits")
"""Fields the auditor adds to the `worker` dimension (`audit_verdict`)."""
GPU_COST_SCALE = 3_600_000
"""`gpu_cost_scaled` is micro-dollars x this (online ms x micro-dollars per hour), exact;
reports divide by it and round half-even to whole micro-dollars once per worker and day."""
NO_WORKER = "(none)"
"""The worker and GPU type a bill without segments is booked under."""
MAX_DAYS = 3660
"""Longest range `days_between` returns: ten years and change."""
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
SPEC_FIELDS = ("draft_tokens", "verified_tokens", "accepted_tokens", "spec_steps")
"""A segment's speculation figures (the worker's claims, never billed)."""


def _check_count(owner: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{owner}: {name} must be a non-negative int; got {value!r}")


def _check_name(owner: str, name: str, value) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{owner}: {name} must be a non-empty string; got {value!r}")


@dataclass(frozen=True)
class Segment:
    """One worker's part of a job (a job that fails over has several, in dispatch order)."""

    worker: str
    gpu_type: str
    prompt_tokens: int
    """Tokens the worker was given as prompt: the prompt plus the tokens delivered before it."""
    completion_tokens: int
    """Tokens it generated that the scheduler delivered to the client."""
    draft_tokens: int = 0
    """The worker's own claims, kept beside (not billed): drafted, verified, accepted tokens."""
    verified_tokens: int = 0
    accepted_tokens: int = 0
    busy_ms: int = 0
    """Wall time from dispatch to its last token, milliseconds."""
    spec_steps: int = 0
    """Speculative decoding steps (each commits its accepted tokens plus one): the mean
    accepted length is 1 + accepted_tokens / spec_steps."""

    def __post_init__(self):
        _check_name("segment", "worker", self.worker)
        _check_name(f"segment of {self.worker}", "gpu_type", self.gpu_type)
        for f in fields(self)[2:]:
            _check_count(f"segment of {self.worker}", f.name, getattr(self, f.name))


@dataclass(frozen=True)
class Bill:
    """What one job is billed: counted by the scheduler from what it delivered."""

    job_id: str
    tenant: str
    model: str
    finished_at: float
    """Unix seconds; its UTC day is the day the job is booked on."""
    prompt_tokens: int
    completion_tokens: int
    segments: tuple[Segment, ...] = ()
    charge_uusd: int = 0
    """What the tenant is charged, in micro-dollars (`billing.py` computes it)."""

    def __post_init__(self):
        _check_name("bill", "job_id", self.job_id)
        owner = f"bill of job {self.job_id}"
        _check_name(owner, "tenant", self.tenant)
        _check_name(owner, "model", self.model)
        if (not isinstance(self.finished_at, (int, float)) or isinstance(self.finished_at, bool)
                or not math.isfinite(self.finished_at)):
            raise ValueError(f"{owner}: finished_at must be unix seconds; got {self.finished_at!r}")
        _check_count(owner, "prompt_tokens", self.prompt_tokens)
        _check_count(owner, "completion_tokens", self.completion_tokens)
        _check_count(owner, "charge_uusd", self.charge_uusd)
        if not (isinstance(self.segments, tuple)
                and all(isinstance(s, Segment) for s in self.segments)):
            raise ValueError(f"{owner}: segments must be a tuple of Segment; got {self.segments!r}")


def utc_day(ts: float) -> str:
    """The UTC day of unix time `ts`, as YYYY-MM-DD."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")


def _parse_day(field: str, text: str) -> date:
    if isinstance(text, str) and _DAY.fullmatch(text):
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass
    raise InvalidArgument(field, f"expected a UTC day as YYYY-MM-DD; got {text!r}")


def days_between(since: str, until: str) -> list[str]:
    """Every UTC day from `since` to `until`, both included, at most `MAX_DAYS` of them."""
    first, last = _parse_day("since", since), _parse_day("until", until)
    if first > last:
        raise InvalidArgument("since", f"{since} is after until ({until})")
    num_days = (last - first).days + 1
    if num_days > MAX_DAYS:
        raise InvalidArgument("until", f"the range spans {num_days} days; at most {MAX_DAYS}")
    return [(first + timedelta(days=i)).isoformat() for i in range(num_days)]


def _job_fields(bill: Bill) -> dict[str, int]:
    return {"jobs": 1, "prompt_tokens": bill.prompt_tokens,
            "completion_tokens": bill.completion_tokens, "charge_uusd": bill.charge_uusd,
            **spec_totals(bill.segments)}


def spec_totals(segments) -> dict[str, int]:
    """A job's speculation figures: its segments' summed."""
    return {name: sum(getattr(s, name) for s in segments) for name in SPEC_FIELDS}


def _per_owner(bill: Bill, attr: str) -> dict[str, dict[str, int]]:
    """Worker fields per distinct `attr` ("worker" or "gpu_type") of the bill's segments."""
    first = getattr(bill.segments[0], attr) if bill.segments else NO_WORKER
    out = {first: {"jobs": 1, "prompt_tokens": bill.prompt_tokens}}
    shares = _charge_shares(bill)
    for seg, charge in zip(bill.segments, shares):
        owner = out.setdefault(getattr(seg, attr), {})
        owner["charge_uusd"] = owner.get("charge_uusd", 0) + charge
    if not bill.segments:
        out[first]["charge_uusd"] = bill.charge_uusd
    for seg in bill.segments:
        totals = out.setdefault(getattr(seg, attr), {})
        amounts = {"segments": 1, "completion_tokens": seg.completion_tokens,
                   "processed_prompt_tokens": seg.prompt_tokens, "busy_ms": seg.busy_ms}
        amounts.update((name, getattr(seg, name)) for name in SPEC_FIELDS)
        for name, amount in amounts.items():
            totals[name] = totals.get(name, 0) + amount
    return out


def worker_time(online_ms: int, active_ms: int, price_uusd_per_hour: int) -> dict[str, int]:
    """What `online_ms` of a worker (`active_ms` of it busy) adds: its time and GPU cost."""
    for name, value in (("online_ms", online_ms), ("active_ms", active_ms),
                        ("price_uusd_per_hour", price_uusd_per_hour)):
        _check_count("worker time", name, value)
    if active_ms > online_ms:
        raise ValueError(f"worker time: active_ms ({active_ms}) exceeds online_ms ({online_ms})")
    return {"online_ms": online_ms, "active_ms": active_ms,
            "gpu_cost_scaled": online_ms * price_uusd_per_hour}


def audit_verdict(passed: bool) -> dict[str, int]:
    """What one audit verdict adds to its worker's day: an audited job, and a failed audit
    when it failed (an undecided audit is no verdict and adds nothing)."""
    if not isinstance(passed, bool):
        raise ValueError(f"audit verdict: passed must be True or False; got {passed!r}")
    return {"audited_jobs": 1} if passed else {"audited_jobs": 1, "failed_audits": 1}


def _charge_shares(bill: Bill) -> list[int]:
    """The job's charge split over its segments by delivered tokens, in whole micro-dollars
    that add up exactly (largest remainder; ties to the earlier segment). With nothing
    delivered, the first segment takes it all."""
    segs = bill.segments
    if not segs:
        return []
    total = sum(s.completion_tokens for s in segs)
    if total == 0:
        return [bill.charge_uusd] + [0] * (len(segs) - 1)
    exact = [bill.charge_uusd * s.completion_tokens for s in segs]  # x total
    shares = [e // total for e in exact]
    order = sorted(range(len(segs)), key=lambda i: (-(exact[i] % total), i))
    for i in order[:bill.charge_uusd - sum(shares)]:
        shares[i] += 1
    return shares


def increments(bill: Bill) -> dict[tuple[str, str, str], dict[str, int]]:
    """(dimension, key, day) -> {field: amount} that `bill` adds to the ledger (see above).

    Raises ValueError when the segments' delivered tokens do not add up to the bill's
    `completion_tokens`: the caller counted one of them wrong, and billing either would be too.
    """
    delivered = sum(s.completion_tokens for s in bill.segments)
    if delivered != bill.completion_tokens:
        raise ValueError(f"bill of job {bill.job_id}: its segments delivered {delivered} "
                         f"completion tokens but the bill counts {bill.completion_tokens}")
    day = utc_day(bill.finished_at)
    job = _job_fields(bill)
    out = {("tenant", bill.tenant, day): job, ("model", bill.model, day): job,
           ("all", "all", day): job}
    for dimension, attr in (("worker", "worker"), ("gpu", "gpu_type")):
        for key, amounts in _per_owner(bill, attr).items():
            out[(dimension, key, day)] = amounts
    return {where: {name: n for name, n in amounts.items() if n} for where, amounts in out.items()}


def withheld_days(periods: list[dict], now: float) -> dict[str, set[str]]:
    """worker -> the UTC days its payout is withheld on: every day a quarantine period
    ({worker, since, until}; until None: still quarantined) touches."""
    out: dict[str, set[str]] = {}
    for p in periods:
        first, last = utc_day(p["since"]), utc_day(p["until"] or now)
        out.setdefault(p["worker"], set()).update(days_between(first, last))
    return out
