"""Cost reports from the usage ledger: per tenant, per worker, per GPU type or per UTC day.

`build_report(store, since, until, by)` reads the ledger's pre-aggregated daily totals (one
pipelined read per (dimension, key), never a scan of jobs, so its cost grows with keys x days,
not with jobs) and returns a `Report`: its columns (name, unit, doc), its rows and the
grand-total row, over the UTC days `since`..`until`, both included. `build_reports` makes
several at once from one read of the ledger.

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
- by worker: worker, gpu_type, price_per_hour_usd, tokens_served, prompt_tokens_processed,
  busy_hours, online_hours, gpu_cost_usd, payout_usd, revenue_usd, margin_usd,
  cost_per_million_tokens_usd, utilisation, mean_accept_length, verification_efficiency.
- by gpu: gpu_type, workers, tokens_served, throughput_tok_s, cost_per_million_tokens_usd,
  share_of_traffic, revenue_usd, gpu_cost_usd, margin_usd, utilisation.
- by day (days with usage only): day, requests, prompt_tokens, completion_tokens,
  charges_usd, gpu_cost_usd, margin_usd, online_hours, tokens_per_tenant.
Rows are in name (day) order, made-up keys such as `(none)` last. The totals row has the same
columns; its key column reads `(total)`.

A worker's GPU type and price are those of its registration (`workers_info`, the latest one).
GPU cost by GPU type is the sum of its workers' rounded cells (not the `gpu` dimension's own
figure, which would round differently); tokens, revenue and time by GPU type come from the
`gpu` dimension.

`usage_window(since, until, today)` is the range of a tenant's `GetUsage`: the last
`USAGE_DEFAULT_DAYS` days by default, never more than `USAGE_MAX_DAYS`, so one call reads at
most that many ledger hashes.

Knows: the ledger's fields and the store's read methods. Does not know: Redis, output
formats (`report_formats.py`), the command line (`report_cli.py`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal

from scheduler.errors import InvalidArgument
from scheduler.ledger import GPU_COST_SCALE, NO_WORKER, days_between, withheld_days

WITHHELD = "withheld"
"""The key of the ledger view holding each worker's withheld days (`withheld_days`)."""

BY = ("tenant", "worker", "gpu", "day")
TOTAL = "(total)"
"""The key column of the totals row (no tenant, worker or day can be named so)."""
UNALLOCATED = "(unallocated)"
"""The tenant row holding the GPU cost of days on which no tenant used any tokens."""
UNREGISTERED = "(unregistered)"
"""The GPU type of a worker with usage but no registration."""
ROUNDING = ("money in USD as exact micro-dollars (6 decimals); GPU cost rounded half-even to whole "
            "micro-dollars once per (worker, UTC day), then summed exactly; "
            "cost per million tokens rounded half-even to 6 decimals")
_MICRO = Decimal(1_000_000)
_Q6 = Decimal("0.000001")
_MS_PER_HOUR = 3_600_000
_NEEDS = {"tenant": ("tenant", "worker"), "worker": ("worker",), "gpu": ("gpu", "worker"),
          "day": ("all", "worker", "tenant")}
"""The ledger dimensions each report reads; the `worker` one always, for GPU cost."""
_MAX_READS = 16
"""Reads in flight at once (each one pipeline of a key's days)."""
USAGE_DEFAULT_DAYS = 31
"""Days a `GetUsage` without `since` covers, up to `until` (a month of daily figures)."""
USAGE_MAX_DAYS = 366
"""Most days one `GetUsage` may cover (a year; one ledger hash read per day)."""

Cells = dict[str, dict[str, dict[str, int]]]
"""key -> UTC day -> {field: amount}: one dimension of the ledger over the range."""


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
        Column("gpu_type", "text", "its registered GPU type"),
        Column("price_per_hour_usd", "USD/h", "its registered asked price per hour online"),
        _TOKENS_SERVED,
        Column("prompt_tokens_processed", "tokens", "prompt tokens it prefilled (a failover "
               "re-sends the delivered tokens as prompt)"),
        Column("busy_hours", "h", "hours it had work (active time)"), _ONLINE, _GPU_COST,
        Column("withheld_usd", "USD", "payout withheld: its GPU cost on the UTC days it was "
               "quarantined (`sparkgrid workers quarantined`)"),
        Column("payout_usd", "USD", "what its operator is paid: the asked price per hour "
               "online (gpu_cost_usd) less withheld_usd"),
        _REVENUE, Column("margin_usd", "USD", "revenue_usd - payout_usd"), _COST_PER_MTOK,
        _UTILISATION,
        Column("mean_accept_length", "tokens/step", "1 + accepted / speculative steps: tokens "
               "committed per target forward (empty without steps)"),
        Column("verification_efficiency", "ratio", "accepted / verified draft tokens "
               "(empty when none verified)")],
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


# --- arithmetic --------------------------------------------------------------------------------

def usd(uusd: int) -> Decimal:
    """Whole micro-dollars as USD with 6 decimals, exactly."""
    return (Decimal(uusd) / _MICRO).quantize(_Q6)


def cell_cost_uusd(gpu_cost_scaled: int) -> int:
    """One (worker, day) cell's GPU cost: `gpu_cost_scaled / GPU_COST_SCALE`, rounded
    half-even to whole micro-dollars, in integers."""
    quotient, rest = divmod(gpu_cost_scaled, GPU_COST_SCALE)
    if 2 * rest > GPU_COST_SCALE or (2 * rest == GPU_COST_SCALE and quotient % 2):
        quotient += 1
    return quotient


def allocate(amount: int, weights: dict[str, int]) -> dict[str, int]:
    """`amount` split over `weights`' keys in proportion, in integers that add up to `amount`
    exactly: floors first, then one more to the largest remainders (ties: the smaller key).
    Empty when the weights sum to zero."""
    total = sum(weights.values())
    if total == 0:
        return {}
    exact = {key: amount * weight for key, weight in weights.items()}  # x total
    shares = {key: value // total for key, value in exact.items()}
    order = sorted(exact, key=lambda key: (-(exact[key] % total), key))
    for key in order[:amount - sum(shares.values())]:
        shares[key] += 1
    return shares


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _per_mtok(cost_uusd: int, tokens: int) -> Decimal | None:
    """USD per million tokens: uusd per token, so (cost / tokens) micro-dollars x 1e6 / 1e6."""
    if not tokens:
        return None
    return (Decimal(cost_uusd) / Decimal(tokens)).quantize(_Q6, rounding=ROUND_HALF_EVEN)


def _add(into: dict[str, int], amounts: dict[str, int]) -> dict[str, int]:
    for name, amount in amounts.items():
        into[name] = into.get(name, 0) + amount
    return into


def _summed(days: dict[str, dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for amounts in days.values():
        _add(out, amounts)
    return out


def _worker_costs(workers: Cells) -> dict[str, dict[str, int]]:
    """worker -> day -> GPU cost in uusd (rounded once per cell; cells without cost left out)."""
    return {worker: {day: cell_cost_uusd(a["gpu_cost_scaled"]) for day, a in days.items()
                     if a.get("gpu_cost_scaled")}
            for worker, days in workers.items()}


def _day_costs(costs: dict[str, dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for days in costs.values():
        _add(out, days)
    return out


# --- reading the ledger ------------------------------------------------------------------------

async def _read(store, dimension: str, since: str, until: str, limit: asyncio.Semaphore) -> Cells:
    """Every key of `dimension` with usage in the range: key -> day -> fields."""
    async def one(key: str):
        async with limit:
            return key, dict(await store.usage(dimension, key, since, until))

    pairs = await asyncio.gather(*(one(key) for key in await store.usage_keys(dimension)))
    return {key: days for key, days in pairs if days}


# --- the reports -------------------------------------------------------------------------------

def _tenant_row(name: str, a: dict[str, int]) -> dict:
    charge, cost = a.get("charge_uusd", 0), a.get("gpu_cost_uusd", 0)
    return {"tenant": name, "requests": a.get("jobs", 0),
            "prompt_tokens": a.get("prompt_tokens", 0),
            "completion_tokens": a.get("completion_tokens", 0), "charges_usd": usd(charge),
            "gpu_cost_usd": usd(cost), "margin_usd": usd(charge - cost)}


def _by_tenant(ledger: dict[str, Cells], costs: dict[str, dict[str, int]],
               _info) -> dict[str, dict]:
    tenants = ledger["tenant"]
    raw = {tenant: _summed(days) for tenant, days in sorted(tenants.items())}
    unallocated = 0
    for day, cost in sorted(_day_costs(costs).items()):
        weights = {t: days[day].get("prompt_tokens", 0) + days[day].get("completion_tokens", 0)
                   for t, days in tenants.items() if day in days}
        shares = allocate(cost, weights)
        if not shares:
            unallocated += cost
        for tenant, share in shares.items():
            _add(raw[tenant], {"gpu_cost_uusd": share})
    if unallocated:
        raw[UNALLOCATED] = {"gpu_cost_uusd": unallocated}
    return raw


def _worker_row(name: str, a: dict[str, int], info: dict) -> dict:
    cost, revenue = a.get("gpu_cost_uusd", 0), a.get("charge_uusd", 0)
    withheld = a.get("withheld_uusd", 0)
    tokens = a.get("completion_tokens", 0)
    price = info.get("price_uusd_per_hour")
    steps, accepted = a.get("spec_steps", 0), a.get("accepted_tokens", 0)
    return {"worker": name, "gpu_type": info.get("gpu_type", ""),
            "price_per_hour_usd": None if price is None else usd(int(price)),
            "tokens_served": tokens, "prompt_tokens_processed": a.get("processed_prompt_tokens", 0),
            "busy_hours": a.get("active_ms", 0) / _MS_PER_HOUR,
            "online_hours": a.get("online_ms", 0) / _MS_PER_HOUR,
            "gpu_cost_usd": usd(cost), "withheld_usd": usd(withheld),
            "payout_usd": usd(cost - withheld), "revenue_usd": usd(revenue),
            "margin_usd": usd(revenue - cost + withheld),
            "cost_per_million_tokens_usd": _per_mtok(cost, tokens),
            "utilisation": _ratio(a.get("active_ms", 0), a.get("online_ms", 0)),
            "mean_accept_length": None if not steps else 1 + accepted / steps,
            "verification_efficiency": _ratio(accepted, a.get("verified_tokens", 0))}


def _by_worker(ledger: dict[str, Cells], costs, _info) -> dict[str, dict]:
    withheld = ledger.get(WITHHELD, {})
    return {worker: _add(_summed(days), {
                "gpu_cost_uusd": sum(costs[worker].values()),
                "withheld_uusd": sum(c for day, c in costs[worker].items()
                                     if day in withheld.get(worker, ()))})
            for worker, days in sorted(ledger["worker"].items(), key=_row_order)}



def _row_order(item: tuple[str, object]) -> tuple[bool, str]:
    """Rows by name, the made-up ones ("(none)", "(unregistered)") last."""
    return item[0].startswith("("), item[0]


def _gpu_of(worker: str, info: dict[str, dict]) -> str:
    if worker == NO_WORKER:
        return NO_WORKER
    return info.get(worker, {}).get("gpu_type") or UNREGISTERED


def _by_gpu(ledger: dict[str, Cells], costs, info) -> dict[str, dict]:
    raw = {gpu: _summed(days) for gpu, days in ledger["gpu"].items()}
    for worker in ledger["worker"]:
        gpu = _gpu_of(worker, info)
        _add(raw.setdefault(gpu, {}), {"workers": 1, "gpu_cost_uusd": sum(costs[worker].values())})
    return dict(sorted(raw.items(), key=_row_order))


def _gpu_row(name: str, a: dict[str, int], all_tokens: int) -> dict:
    cost, revenue = a.get("gpu_cost_uusd", 0), a.get("charge_uusd", 0)
    tokens = a.get("completion_tokens", 0)
    active_s = a.get("active_ms", 0) / 1000
    return {"gpu_type": name, "workers": a.get("workers", 0), "tokens_served": tokens,
            "throughput_tok_s": tokens / active_s if active_s else None,
            "cost_per_million_tokens_usd": _per_mtok(cost, tokens),
            "share_of_traffic": _ratio(tokens, all_tokens), "revenue_usd": usd(revenue),
            "gpu_cost_usd": usd(cost), "margin_usd": usd(revenue - cost),
            "utilisation": _ratio(a.get("active_ms", 0), a.get("online_ms", 0))}


def _by_day(ledger: dict[str, Cells], costs, _info) -> dict[str, dict]:
    day_costs = _day_costs(costs)
    days = sorted(set(ledger["all"].get("all", {})) | set(day_costs))
    raw = {day: _add(dict(ledger["all"].get("all", {}).get(day, {})),
                     {"gpu_cost_uusd": day_costs.get(day, 0)}) for day in days}
    for day in days:
        raw[day]["tokens_per_tenant"] = {
            tenant: tokens for tenant, cells in sorted(ledger["tenant"].items())
            if (tokens := cells.get(day, {}).get("prompt_tokens", 0)
                + cells.get(day, {}).get("completion_tokens", 0))}
    return raw


def _day_row(name: str, a: dict) -> dict:
    charge, cost = a.get("charge_uusd", 0), a.get("gpu_cost_uusd", 0)
    return {"day": name, "requests": a.get("jobs", 0), "prompt_tokens": a.get("prompt_tokens", 0),
            "completion_tokens": a.get("completion_tokens", 0), "charges_usd": usd(charge),
            "gpu_cost_usd": usd(cost), "margin_usd": usd(charge - cost),
            "online_hours": a.get("online_ms", 0) / _MS_PER_HOUR,
            "tokens_per_tenant": dict(a.get("tokens_per_tenant", {}))}


def _sum_raw(raws) -> dict:
    """Integer sums of the raw figures of every row (dicts of tokens by tenant merged)."""
    out: dict = {}
    for a in raws:
        for name, amount in a.items():
            if isinstance(amount, dict):
                out[name] = dict(sorted(_add(dict(out.get(name, {})), amount).items()))
            else:
                out[name] = out.get(name, 0) + amount
    return out


def _rows(by: str, raw: dict[str, dict], info: dict[str, dict]) -> tuple[list[dict], dict]:
    """The rows and the totals row, both made from integer sums by the same function."""
    total = _sum_raw(raw.values())
    if by == "tenant":
        make = _tenant_row
    elif by == "worker":
        def make(name, a):
            return _worker_row(name, a, info.get(name, {}))
    elif by == "gpu":
        def make(name, a):
            return _gpu_row(name, a, total.get("completion_tokens", 0))
    else:
        make = _day_row
    return [make(name, a) for name, a in raw.items()], make(TOTAL, total)


_BUILDERS = {"tenant": _by_tenant, "worker": _by_worker, "gpu": _by_gpu, "day": _by_day}


async def build_reports(store, since: str, until: str, bys=BY) -> dict[str, Report]:
    """The reports of `bys` over UTC days `since`..`until` (inclusive), from one read of the
    ledger. `store` needs async `usage`, `usage_keys`, `workers_info` and `withheld_periods`
    (see `RedisStore`)."""
    bys = list(bys)
    for by in bys:
        if by not in BY:
            raise InvalidArgument("by", f"expected one of {', '.join(BY)}; got {by!r}")
    days_between(since, until)  # InvalidArgument naming since or until
    dimensions = sorted({d for by in bys for d in _NEEDS[by]})
    limit = asyncio.Semaphore(_MAX_READS)
    cells = await asyncio.gather(*(_read(store, d, since, until, limit) for d in dimensions))
    ledger = dict(zip(dimensions, cells))
    info = await store.workers_info() if {"worker", "gpu"} & set(bys) else {}
    if "worker" in bys:
        ledger[WITHHELD] = withheld_days(await store.withheld_periods(), time.time())
    costs = _worker_costs(ledger["worker"])
    generated_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = {}
    for by in bys:
        rows, totals = _rows(by, _BUILDERS[by](ledger, costs, info), info)
        out[by] = Report(by, since, until, generated_at, list(COLUMNS[by]), rows, totals)
    return out


async def build_report(store, since: str, until: str, by: str) -> Report:
    """The report `by` tenant, worker, gpu or day over UTC days `since`..`until` (inclusive)."""
    return (await build_reports(store, since, until, (by,)))[by]
