"""Cost reports from the usage ledger: per tenant, worker, GPU type, UTC day or operator.

`build_report(store, since, until, by)` reads the ledger's pre-aggregated daily totals (one
pipelined read per (dimension, key), never a scan of jobs, so its cost grows with keys x days,
not with jobs) and returns a `Report`: its columns (name, unit, doc), its rows and the
grand-total row, over the UTC days `since`..`until`, both included. `build_reports` makes
several at once from one read of the ledger; the rows are made in `report_rows.py`.

Money and rounding. The ledger holds integer micro-dollars (uusd). GPU cost is held exactly
as `gpu_cost_scaled` (online ms x price in uusd per hour); for each (worker, UTC day) cell it
is divided by `GPU_COST_SCALE` and rounded half-even to whole micro-dollars, ONCE. Every money
figure after that is an integer sum of micro-dollars, so totals equal the sum of the rows
exactly and every report's GPU cost total is the same number. Money is a `Decimal` of USD with
6 decimals (exact micro-dollars); a ratio of money (cost per million tokens) is rounded
half-even to 6 decimals, and in the totals it is the ratio of the totals. Other ratios, hours
and rates are floats; a ratio with a zero denominator is None (shown empty).

Columns (each `Column.doc` says more):
- by tenant: tenant, requests, prompt_tokens, completion_tokens, charges_usd, gpu_cost_usd
  (each day's GPU cost split over tenants by their share of that day's prompt + completion
  tokens, largest remainder, so the split adds up to the day's cost exactly), margin_usd. The
  cost of days without tokens is the row `(unallocated)`, so the totals hold all GPU cost.
- by worker: worker, operator, kind, gpu_type, price_per_hour_usd, tokens_served,
  prompt_tokens_processed, busy_hours, online_hours, gpu_cost_usd, withheld_usd, payout_usd,
  revenue_usd, margin_usd, cost_per_million_tokens_usd, utilisation, mean_accept_length,
  verification_efficiency, audited_jobs, failed_audits.
- by gpu: gpu_type, workers, tokens_served, throughput_tok_s, cost_per_million_tokens_usd,
  share_of_traffic, revenue_usd, gpu_cost_usd, margin_usd, utilisation.
- by day (days with usage only): day, requests, prompt_tokens, completion_tokens,
  charges_usd, gpu_cost_usd, margin_usd, online_hours, tokens_per_tenant.
- by operator: operator, workers, and the worker report's figures that add up over workers
  (tokens, hours, money, audits) and their ratios; each row is the integer sum of its
  workers' raw figures, so the operator totals equal the worker totals exactly.
Rows are in name (day) order, made-up keys such as `(none)` last. The totals row has the same
columns; its key column reads `(total)`.

A worker's GPU type and price are those it was last seen with (`workers_info`); its operator
and kind are its registration's (`registrations`, read once per report); a worker without a
registration has no operator and is counted under the operator `(none)`. GPU cost by GPU type
is the sum of its workers' rounded cells (not the `gpu` dimension's own figure, which would
round differently); tokens, revenue and time by GPU type come from the `gpu` dimension.
Audits (`audited_jobs`, `failed_audits`) are counted in the worker's ledger cell of the UTC
day of each verdict, by every scheduler's auditor.

`usage_window(since, until, today)` is the range of a tenant's `GetUsage`: the last
`USAGE_DEFAULT_DAYS` days by default, never more than `USAGE_MAX_DAYS`, so one call reads at
most that many ledger hashes.

Knows: the ledger's dimensions and the store's read methods. Does not know: Redis, the
arithmetic of rows (`report_rows.py`), output formats (`report_formats.py`), the command line
(`report_cli.py`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from scheduler.errors import InvalidArgument
from scheduler.ledger import NO_WORKER, days_between, withheld_days
from scheduler.report_rows import (
    NO_OPERATOR,
    TOTAL,
    UNALLOCATED,
    UNREGISTERED,
    WITHHELD,
    Cells,
    Known,
    allocate,
    cell_cost_uusd,
    rows,
    usd,
    worker_costs,
)

__all__ = ["BY", "COLUMNS", "NO_OPERATOR", "ROUNDING", "TOTAL", "UNALLOCATED", "UNREGISTERED",
           "USAGE_DEFAULT_DAYS", "USAGE_MAX_DAYS", "Column", "Report", "allocate",
           "build_report", "build_reports", "cell_cost_uusd", "usage_window", "usd"]

BY = ("tenant", "worker", "gpu", "day", "operator")
ROUNDING = ("money in USD as exact micro-dollars (6 decimals); GPU cost rounded half-even to whole "
            "micro-dollars once per (worker, UTC day), then summed exactly; "
            "cost per million tokens rounded half-even to 6 decimals")
_NEEDS = {"tenant": ("tenant", "worker"), "worker": ("worker",), "gpu": ("gpu", "worker"),
          "day": ("all", "worker", "tenant"), "operator": ("worker",)}
"""The ledger dimensions each report reads; the `worker` one always, for GPU cost."""
_MAX_READS = 16
"""Reads in flight at once (each one pipeline of a key's days)."""
USAGE_DEFAULT_DAYS = 31
"""Days a `GetUsage` without `since` covers, up to `until` (a month of daily figures)."""
USAGE_MAX_DAYS = 366
"""Most days one `GetUsage` may cover (a year; one ledger hash read per day)."""


@dataclass(frozen=True)
class Column:
    name: str
    unit: str
    """text, day, count, tokens, USD, USD/h, USD/Mtok, h, tokens/s, tokens/step, ratio (a
    fraction of 1) or tokens by tenant (a dict)."""
    doc: str


@dataclass
class Report:
    by: str
    since: str
    """First UTC day of the range (YYYY-MM-DD), included."""
    until: str
    """Last UTC day of the range, included."""
    generated_at: str
    """When it was made: ISO 8601, UTC."""
    columns: list[Column]
    rows: list[dict]
    """One dict per row, keyed by column name."""
    totals: dict
    """The grand-total row, keyed by column name (its key column reads `TOTAL`)."""


_REQUESTS = Column("requests", "count", "jobs billed, booked on the UTC day they finished")
_PROMPT = Column("prompt_tokens", "tokens", "prompt tokens billed")
_COMPLETION = Column("completion_tokens", "tokens", "completion tokens billed (delivered)")
_CHARGES = Column("charges_usd", "USD", "what the tenants were charged")
_TOKENS_SERVED = Column("tokens_served", "tokens", "completion tokens its segments delivered")
_REVENUE = Column("revenue_usd", "USD", "the charges attributed to it: each job's charge "
                  "split over its segments by delivered tokens (largest remainder)")
_UTILISATION = Column("utilisation", "ratio", "active time / online time (empty if never online)")
_COST_PER_MTOK = Column("cost_per_million_tokens_usd", "USD/Mtok",
                        "gpu_cost_usd / tokens_served x 1e6 (empty without tokens)")
_GPU_COST = Column("gpu_cost_usd", "USD", "online hours x asked price per hour, rounded "
                   "half-even to whole micro-dollars once per (worker, UTC day)")
_ONLINE = Column("online_hours", "h", "hours seen online")
_DAY_MARGIN = Column("margin_usd", "USD", "charges_usd - gpu_cost_usd")
_PROMPT_PROCESSED = Column("prompt_tokens_processed", "tokens", "prompt tokens prefilled (a "
                           "failover re-sends the delivered tokens as prompt)")
_BUSY = Column("busy_hours", "h", "hours with work (active time)")
_WITHHELD = Column("withheld_usd", "USD", "payout withheld: the GPU cost of the UTC days a "
                   "worker was quarantined (`sparkgrid workers quarantined`)")
_PAYOUT = Column("payout_usd", "USD", "what its operator is paid: the asked price per hour "
                 "online (gpu_cost_usd) less withheld_usd")
_PAID_MARGIN = Column("margin_usd", "USD", "revenue_usd - payout_usd")
_AUDITED = Column("audited_jobs", "count", "jobs re-scored on a trusted worker that reached a "
                  "verdict (passed or failed), booked on the UTC day of the verdict")
_FAILED_AUDITS = Column("failed_audits", "count", "audited jobs that failed (a failed audit "
                        "quarantines the worker)")

COLUMNS = {
    "tenant": [
        Column("tenant", "text", f"the tenant; {UNALLOCATED} holds the GPU cost of days on "
               "which no tenant used tokens"),
        _REQUESTS, _PROMPT, _COMPLETION, _CHARGES,
        Column("gpu_cost_usd", "USD", "GPU cost allocated: each UTC day's GPU cost split over "
               "tenants by their share of its prompt + completion tokens, in whole "
               "micro-dollars (largest remainder, ties by name), adding up exactly"),
        _DAY_MARGIN],
    "worker": [
        Column("worker", "text", f"the worker's name ({NO_WORKER}: jobs that reached none)"),
        Column("operator", "text", "the operator it is registered under (empty: no "
               f"registration; the operator report counts it under {NO_OPERATOR})"),
        Column("kind", "text", "how it reaches the scheduler, per its registration: in-cluster "
               "(a Ray actor of the platform's cluster) or linked (a worker link)"),
        Column("gpu_type", "text", "its registered GPU type"),
        Column("price_per_hour_usd", "USD/h", "its registered asked price per hour online"),
        _TOKENS_SERVED, _PROMPT_PROCESSED, _BUSY, _ONLINE, _GPU_COST, _WITHHELD, _PAYOUT,
        _REVENUE, _PAID_MARGIN, _COST_PER_MTOK, _UTILISATION,
        Column("mean_accept_length", "tokens/step", "1 + accepted / speculative steps: tokens "
               "committed per target forward (empty without steps)"),
        Column("verification_efficiency", "ratio", "accepted / verified draft tokens "
               "(empty when none verified)"),
        _AUDITED, _FAILED_AUDITS],
    "gpu": [
        Column("gpu_type", "text", f"the GPU type ({UNREGISTERED}: workers never registered)"),
        Column("workers", "count", "distinct workers of the type with usage in the range"),
        _TOKENS_SERVED,
        Column("throughput_tok_s", "tokens/s", "tokens_served / active seconds (empty if none)"),
        _COST_PER_MTOK,
        Column("share_of_traffic", "ratio", "tokens_served / all tokens served"),
        _REVENUE, Column("gpu_cost_usd", "USD", "the sum of its workers' GPU cost"),
        Column("margin_usd", "USD", "revenue_usd - gpu_cost_usd"), _UTILISATION],
    "day": [
        Column("day", "day", "the UTC day (days with usage only)"),
        _REQUESTS, _PROMPT, _COMPLETION, _CHARGES,
        Column("gpu_cost_usd", "USD", "the day's GPU cost: the sum of its workers' cells"),
        _DAY_MARGIN,
        Column("online_hours", "h", "hours online, all workers together"),
        Column("tokens_per_tenant", "tokens by tenant", "tenant -> prompt + completion tokens "
               "(not in CSV or the text table; drawn in the HTML)")],
    "operator": [
        Column("operator", "text", f"the operator its workers are registered under "
               f"({NO_OPERATOR}: workers without a registration, and jobs that reached none)"),
        Column("workers", "count", "distinct workers of the operator with usage in the range"),
        _TOKENS_SERVED, _PROMPT_PROCESSED, _BUSY, _ONLINE,
        Column("gpu_cost_usd", "USD", "the sum of its workers' GPU cost"), _WITHHELD,
        Column("payout_usd", "USD", "what the operator is paid: gpu_cost_usd less withheld_usd"),
        _REVENUE, _PAID_MARGIN, _COST_PER_MTOK, _UTILISATION, _AUDITED, _FAILED_AUDITS],
}


def usage_window(since: str, until: str, today: str) -> tuple[str, str]:
    """The UTC days (since, until) a tenant's usage call covers: `until` defaults to `today`,
    `since` to `USAGE_DEFAULT_DAYS - 1` days before `until`; a range longer than
    `USAGE_MAX_DAYS` is refused (InvalidArgument naming since), as is a bad day."""
    until = until or today
    if not since:
        try:
            since = (date.fromisoformat(until)
                     - timedelta(days=USAGE_DEFAULT_DAYS - 1)).isoformat()
        except ValueError:
            raise InvalidArgument(
                "until", f"expected a UTC day YYYY-MM-DD, got {until!r}") from None
    try:
        num_days = (date.fromisoformat(until) - date.fromisoformat(since)).days + 1
    except ValueError:
        num_days = 0  # days_between names the bad field
    if num_days > USAGE_MAX_DAYS:
        raise InvalidArgument("since", f"the range {since}..{until} spans {num_days} days; at "
                              f"most {USAGE_MAX_DAYS} per call (ask for several ranges)")
    days_between(since, until)  # InvalidArgument naming since or until
    return since, until


async def _read(store, dimension: str, since: str, until: str, limit: asyncio.Semaphore) -> Cells:
    """Every key of `dimension` with usage in the range: key -> day -> fields."""
    async def one(key: str):
        async with limit:
            return key, dict(await store.usage(dimension, key, since, until))

    pairs = await asyncio.gather(*(one(key) for key in await store.usage_keys(dimension)))
    return {key: days for key, days in pairs if days}


async def build_reports(store, since: str, until: str, bys=BY) -> dict[str, Report]:
    """The reports of `bys` over UTC days `since`..`until` (inclusive), from one read of the
    ledger. `store` needs async `usage`, `usage_keys`, `workers_info`, `registrations` and
    `withheld_periods` (see `RedisStore`)."""
    bys = list(bys)
    for by in bys:
        if by not in BY:
            raise InvalidArgument("by", f"expected one of {', '.join(BY)}; got {by!r}")
    days_between(since, until)  # InvalidArgument naming since or until
    dimensions = sorted({d for by in bys for d in _NEEDS[by]})
    limit = asyncio.Semaphore(_MAX_READS)
    cells = await asyncio.gather(*(_read(store, d, since, until, limit) for d in dimensions))
    ledger = dict(zip(dimensions, cells))
    paid = {"worker", "operator"} & set(bys)
    known = Known(info=await store.workers_info() if {"worker", "gpu"} & set(bys) else {},
                  registrations=await store.registrations() if paid else {})
    if paid:
        ledger[WITHHELD] = withheld_days(await store.withheld_periods(), time.time())
    costs = worker_costs(ledger["worker"])
    generated_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = {}
    for by in bys:
        report_rows, totals = rows(by, ledger, costs, known)
        out[by] = Report(by, since, until, generated_at, list(COLUMNS[by]), report_rows, totals)
    return out


async def build_report(store, since: str, until: str, by: str) -> Report:
    """The report `by` tenant, worker, gpu, day or operator over UTC days `since`..`until`
    (inclusive)."""
    return (await build_reports(store, since, until, (by,)))[by]
