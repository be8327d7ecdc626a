"""The rows of the cost reports, from the ledger's cells: the money arithmetic (whole
micro-dollars, GPU cost rounded once per (worker, UTC day), largest-remainder splits) and one
row builder per `--by`, following the rules of `reports.py`'s docstring.

Each builder turns the cells into raw figures per row key, integer sums only; a row function
turns raw figures into the row's columns, and the totals row is the same row function applied
to the sums of the rows' raw figures, so totals add up exactly.

Knows: the ledger's fields, what a worker's registration says (GPU type, price, operator,
kind). Does not know: Redis or how the ledger is read (`reports.py`), output formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

from scheduler.ledger import GPU_COST_SCALE, NO_WORKER

WITHHELD = "withheld"
"""The key of the ledger view holding each worker's withheld days (`withheld_days`)."""
TOTAL = "(total)"
"""The key column of the totals row (no tenant, worker or day can be named so)."""
UNALLOCATED = "(unallocated)"
"""The tenant row holding the GPU cost of days on which no tenant used any tokens."""
UNREGISTERED = "(unregistered)"
"""The GPU type of a worker with usage but no registration."""
NO_OPERATOR = "(none)"
"""The operator row of workers without a registration (and of jobs that reached no worker)."""
_MICRO = Decimal(1_000_000)
_Q6 = Decimal("0.000001")
_MS_PER_HOUR = 3_600_000

Cells = dict[str, dict[str, dict[str, int]]]
"""key -> UTC day -> {field: amount}: one dimension of the ledger over the range."""


@dataclass(frozen=True)
class Known:
    """What the platform knows of its workers beside the ledger."""

    info: dict[str, dict]
    """worker -> what it was last seen with (`workers_info`: gpu_type, price_uusd_per_hour)."""
    registrations: dict[str, dict]
    """worker -> its registration (`registrations`: operator, kind, ...)."""

    def operator_of(self, worker: str) -> str:
        return self.registrations.get(worker, {}).get("operator") or NO_OPERATOR


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


def worker_costs(workers: Cells) -> dict[str, dict[str, int]]:
    """worker -> day -> GPU cost in uusd (rounded once per cell; cells without cost left out)."""
    return {worker: {day: cell_cost_uusd(a["gpu_cost_scaled"]) for day, a in days.items()
                     if a.get("gpu_cost_scaled")}
            for worker, days in workers.items()}


def _day_costs(costs: dict[str, dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for days in costs.values():
        _add(out, days)
    return out


def _row_order(item: tuple[str, object]) -> tuple[bool, str]:
    """Rows by name, the made-up ones ("(none)", "(unregistered)") last."""
    return item[0].startswith("("), item[0]


# --- by tenant and by day ----------------------------------------------------------------------

def _tenant_row(name: str, a: dict[str, int]) -> dict:
    charge, cost = a.get("charge_uusd", 0), a.get("gpu_cost_uusd", 0)
    return {"tenant": name, "requests": a.get("jobs", 0),
            "prompt_tokens": a.get("prompt_tokens", 0),
            "completion_tokens": a.get("completion_tokens", 0), "charges_usd": usd(charge),
            "gpu_cost_usd": usd(cost), "margin_usd": usd(charge - cost)}


def _by_tenant(ledger: dict[str, Cells], costs, _known) -> dict[str, dict]:
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


def _by_day(ledger: dict[str, Cells], costs, _known) -> dict[str, dict]:
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


# --- by worker and by operator -----------------------------------------------------------------

def _by_worker(ledger: dict[str, Cells], costs, _known) -> dict[str, dict]:
    withheld = ledger.get(WITHHELD, {})
    return {worker: _add(_summed(days), {
                "gpu_cost_uusd": sum(costs[worker].values()),
                "withheld_uusd": sum(c for day, c in costs[worker].items()
                                     if day in withheld.get(worker, ()))})
            for worker, days in sorted(ledger["worker"].items(), key=_row_order)}


def _work_figures(a: dict[str, int]) -> dict:
    """The columns the worker and operator reports share, from summed worker figures."""
    cost, revenue = a.get("gpu_cost_uusd", 0), a.get("charge_uusd", 0)
    withheld, tokens = a.get("withheld_uusd", 0), a.get("completion_tokens", 0)
    return {"tokens_served": tokens,
            "prompt_tokens_processed": a.get("processed_prompt_tokens", 0),
            "busy_hours": a.get("active_ms", 0) / _MS_PER_HOUR,
            "online_hours": a.get("online_ms", 0) / _MS_PER_HOUR,
            "gpu_cost_usd": usd(cost), "withheld_usd": usd(withheld),
            "payout_usd": usd(cost - withheld), "revenue_usd": usd(revenue),
            "margin_usd": usd(revenue - cost + withheld),
            "cost_per_million_tokens_usd": _per_mtok(cost, tokens),
            "utilisation": _ratio(a.get("active_ms", 0), a.get("online_ms", 0)),
            "audited_jobs": a.get("audited_jobs", 0), "failed_audits": a.get("failed_audits", 0)}


def _worker_row(name: str, a: dict[str, int], info: dict, registration: dict) -> dict:
    price = info.get("price_uusd_per_hour")
    steps, accepted = a.get("spec_steps", 0), a.get("accepted_tokens", 0)
    return {"worker": name, "operator": registration.get("operator", ""),
            "kind": registration.get("kind", ""), "gpu_type": info.get("gpu_type", ""),
            "price_per_hour_usd": None if price is None else usd(int(price)),
            **_work_figures(a),
            "mean_accept_length": None if not steps else 1 + accepted / steps,
            "verification_efficiency": _ratio(accepted, a.get("verified_tokens", 0))}


def _by_operator(ledger: dict[str, Cells], costs, known: Known) -> dict[str, dict]:
    raw: dict[str, dict] = {}
    for worker, a in _by_worker(ledger, costs, known).items():
        _add(raw.setdefault(known.operator_of(worker), {}),
             {**a, "workers": int(worker != NO_WORKER)})
    return dict(sorted(raw.items(), key=_row_order))


def _operator_row(name: str, a: dict[str, int]) -> dict:
    return {"operator": name, "workers": a.get("workers", 0), **_work_figures(a)}


# --- by GPU type -------------------------------------------------------------------------------

def _gpu_of(worker: str, info: dict[str, dict]) -> str:
    if worker == NO_WORKER:
        return NO_WORKER
    return info.get(worker, {}).get("gpu_type") or UNREGISTERED


def _by_gpu(ledger: dict[str, Cells], costs, known: Known) -> dict[str, dict]:
    raw = {gpu: _summed(days) for gpu, days in ledger["gpu"].items()}
    for worker in ledger["worker"]:
        gpu = _gpu_of(worker, known.info)
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


# --- rows and totals ---------------------------------------------------------------------------

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


_BUILDERS = {"tenant": _by_tenant, "worker": _by_worker, "gpu": _by_gpu, "day": _by_day,
             "operator": _by_operator}


def rows(by: str, ledger: dict[str, Cells], costs: dict[str, dict[str, int]],
         known: Known) -> tuple[list[dict], dict]:
    """The rows of the report `by` and its totals row, both made from integer sums by the same
    function. `costs` is `worker_costs(ledger["worker"])`."""
    raw = _BUILDERS[by](ledger, costs, known)
    total = _sum_raw(raw.values())
    if by == "tenant":
        make = _tenant_row
    elif by == "worker":
        def make(name, a):
            return _worker_row(name, a, known.info.get(name, {}),
                               known.registrations.get(name, {}))
    elif by == "gpu":
        def make(name, a):
            return _gpu_row(name, a, total.get("completion_tokens", 0))
    elif by == "operator":
        make = _operator_row
    else:
        make = _day_row
    return [make(name, a) for name, a in raw.items()], make(TOTAL, total)
