"""Cost report arithmetic over an in-memory ledger: GPU cost rounded once per worker and day,
tenant allocations that add up to each day's cost, derived figures, empty cases, errors that
name the field, and totals that equal the sum of the rows exactly."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime
from decimal import Decimal

import pytest

from scheduler.errors import InvalidArgument
from scheduler.ledger import GPU_COST_SCALE, JOB_FIELDS, WORKER_FIELDS
from scheduler.report_cli import day_range
from scheduler.reports import (
    BY,
    COLUMNS,
    NO_OPERATOR,
    TOTAL,
    UNALLOCATED,
    UNREGISTERED,
    allocate,
    build_report,
    build_reports,
    cell_cost_uusd,
)

D1, D2, D3 = "2025-06-01", "2025-06-02", "2025-06-03"
HOUR = 3_600_000


class FakeStore:
    """The store's read methods over {(dimension, key, day): {field: int}}."""

    def __init__(self, cells: dict, info: dict | None = None, registered: dict | None = None):
        self.cells, self.info, self.registered = cells, info or {}, registered or {}

    async def usage_keys(self, dimension):
        return sorted({key for dim, key, _ in self.cells if dim == dimension})

    async def usage(self, dimension, key, since, until):
        return sorted((day, dict(f)) for (dim, k, day), f in self.cells.items()
                      if dim == dimension and k == key and since <= day <= until and f)

    async def workers_info(self):
        return self.info

    async def withheld_periods(self):
        return getattr(self, "periods", [])

    async def registrations(self):
        return self.registered


def report(cells, by, info=None, since=D1, until=D3, registered=None):
    return asyncio.run(build_report(FakeStore(cells, info, registered), since, until, by))


def time_cell(online_ms, active_ms, price_uusd_per_hour):
    return {"online_ms": online_ms, "active_ms": active_ms,
            "gpu_cost_scaled": online_ms * price_uusd_per_hour}


def uusd(value: Decimal) -> int:
    return int(value * 1_000_000)


def test_cell_cost_rounds_half_even_to_whole_micro_dollars():
    half = GPU_COST_SCALE // 2
    assert [cell_cost_uusd(n * GPU_COST_SCALE + half) for n in (0, 1, 2, 3)] == [0, 2, 2, 4]
    assert cell_cost_uusd(2 * GPU_COST_SCALE + half - 1) == 2
    assert cell_cost_uusd(2 * GPU_COST_SCALE + half + 1) == 3
    assert cell_cost_uusd(0) == 0


def test_gpu_cost_is_rounded_once_per_worker_day_then_summed():
    # 2.5 uusd on each of two days: 2 + 2 (per cell), not round(5.0) = 5 (per worker).
    cell = {"online_ms": 1, "gpu_cost_scaled": 2 * GPU_COST_SCALE + GPU_COST_SCALE // 2}
    cells = {("worker", "w1", D1): cell, ("worker", "w1", D2): cell}
    for by in BY:
        assert report(cells, by).totals["gpu_cost_usd"] == Decimal("0.000004"), by


def test_allocation_splits_by_largest_remainder_and_adds_up_exactly():
    assert allocate(100, {"b": 1, "a": 1, "c": 1}) == {"a": 34, "b": 33, "c": 33}
    assert allocate(10, {"b": 3, "a": 1}) == {"a": 3, "b": 7}  # 2.5 and 7.5: a tie, to "a"
    assert allocate(10, {"a": 2, "b": 1}) == {"a": 7, "b": 3}
    assert allocate(7, {"a": 0, "b": 0}) == {}
    rng = random.Random(1)
    for _ in range(200):
        weights = {f"t{i}": rng.randrange(0, 1000) for i in range(rng.randrange(1, 8))}
        amount = rng.randrange(0, 10**9)
        shares = allocate(amount, weights)
        if sum(weights.values()):
            assert sum(shares.values()) == amount
            assert all(abs(shares[k] * sum(weights.values()) - amount * w) < sum(weights.values())
                       for k, w in weights.items())


def test_tenant_gpu_cost_is_each_days_cost_split_by_tokens():
    cells = {("worker", "w1", D1): time_cell(HOUR, HOUR // 2, 1_000_000),   # $1.00 on D1
             ("worker", "w2", D1): time_cell(HOUR, 0, 500_001),             # $0.500001 on D1
             ("tenant", "a", D1): {"jobs": 1, "prompt_tokens": 1, "completion_tokens": 0,
                                   "charge_uusd": 2_000_000},
             ("tenant", "b", D1): {"jobs": 2, "prompt_tokens": 1, "completion_tokens": 1,
                                   "charge_uusd": 1_000_000}}
    rows = {r["tenant"]: r for r in report(cells, "tenant").rows}
    assert rows["a"]["gpu_cost_usd"] + rows["b"]["gpu_cost_usd"] == Decimal("1.500001")
    assert rows["a"]["gpu_cost_usd"] == Decimal("0.500000")  # 1/3 of 1500001 = 500000.33
    assert rows["b"]["gpu_cost_usd"] == Decimal("1.000001")  # 2/3 = 1000000.67, +1 remainder
    assert rows["a"]["margin_usd"] == Decimal("1.500000")
    assert rows["b"]["margin_usd"] == Decimal("-0.000001")
    assert rows["b"]["requests"] == 2 and UNALLOCATED not in rows


def test_cost_of_days_without_tokens_is_unallocated_and_in_the_totals():
    cells = {("worker", "w1", D1): time_cell(HOUR, 0, 1_000_000),
             ("worker", "w1", D2): time_cell(HOUR, 0, 1_000_000),
             ("tenant", "a", D1): {"jobs": 1, "prompt_tokens": 5, "charge_uusd": 10}}
    r = report(cells, "tenant")
    assert [row["tenant"] for row in r.rows] == ["a", UNALLOCATED]
    assert r.rows[1]["gpu_cost_usd"] == Decimal("1.000000")
    assert r.rows[1]["margin_usd"] == Decimal("-1.000000")
    assert r.totals["tenant"] == TOTAL
    assert r.totals["gpu_cost_usd"] == Decimal("2.000000")


def test_worker_figures():
    cells = {("worker", "w1", D1): {**time_cell(4 * HOUR, HOUR, 2_000_000), "jobs": 3,
                                    "completion_tokens": 500_000, "processed_prompt_tokens": 700,
                                    "charge_uusd": 9_000_000, "spec_steps": 200,
                                    "accepted_tokens": 300, "verified_tokens": 1200}}
    info = {"w1": {"gpu_type": "H100", "price_uusd_per_hour": 2_000_000}}
    row = report(cells, "worker", info).rows[0]
    assert row["gpu_type"] == "H100" and row["price_per_hour_usd"] == Decimal("2.000000")
    assert row["gpu_cost_usd"] == row["payout_usd"] == Decimal("8.000000")
    assert row["revenue_usd"] == Decimal("9.000000") and row["margin_usd"] == Decimal("1.000000")
    assert row["cost_per_million_tokens_usd"] == Decimal("16.000000")  # $8 / 0.5M tokens
    assert (row["busy_hours"], row["online_hours"], row["utilisation"]) == (1.0, 4.0, 0.25)
    assert row["mean_accept_length"] == 2.5 and row["verification_efficiency"] == 0.25
    assert row["tokens_served"] == 500_000 and row["prompt_tokens_processed"] == 700


def test_a_quarantined_workers_payout_is_withheld_on_the_days_its_quarantine_touched():
    cells = {("worker", w, day): {**time_cell(HOUR, 0, 1_000_000), "charge_uusd": 3_000_000}
             for w in ("bad", "good") for day in (D1, D2, D3)}
    store = FakeStore(cells, {w: {"gpu_type": "L4", "price_uusd_per_hour": 1_000_000}
                              for w in ("bad", "good")})
    noon = lambda day: datetime.fromisoformat(f"{day}T12:00:00+00:00").timestamp()  # noqa: E731
    store.periods = [{"worker": "bad", "reason": "3 strikes", "since": noon(D2),
                      "until": noon(D3) - 86400}]  # released the day it began: one day held
    rows = {r["worker"]: r for r in asyncio.run(build_report(store, D1, D3, "worker")).rows}
    assert rows["bad"]["gpu_cost_usd"] == Decimal("3.000000")
    assert rows["bad"]["withheld_usd"] == Decimal("1.000000")  # D2's hour
    assert rows["bad"]["payout_usd"] == Decimal("2.000000")
    assert rows["bad"]["margin_usd"] == Decimal("7.000000")  # 9 revenue - 2 paid
    assert rows["good"]["withheld_usd"] == 0 and rows["good"]["payout_usd"] == Decimal("3.000000")
    store.periods = [{"worker": "bad", "reason": "a failed audit", "since": noon(D1),
                      "until": None}]  # still quarantined: every day since
    report_now = asyncio.run(build_report(store, D1, D3, "worker"))
    assert {r["worker"]: r["withheld_usd"] for r in report_now.rows}["bad"] == Decimal("3.000000")
    assert report_now.totals["withheld_usd"] == Decimal("3.000000")


def test_a_worker_without_tokens_or_time_has_empty_ratios():
    cells = {("worker", "idle", D1): time_cell(HOUR, 0, 1_000_000),
             ("worker", "(none)", D1): {"jobs": 1, "charge_uusd": 3}}
    rows = {r["worker"]: r for r in report(cells, "worker").rows}
    idle, none = rows["idle"], rows["(none)"]
    assert idle["cost_per_million_tokens_usd"] is None and idle["utilisation"] == 0.0
    assert idle["mean_accept_length"] is None and idle["verification_efficiency"] is None
    assert idle["price_per_hour_usd"] is None and idle["gpu_type"] == ""
    assert none["utilisation"] is None and none["gpu_cost_usd"] == Decimal("0.000000")


def test_worker_rows_show_operator_kind_and_audits():
    cells = {("worker", "w1", D1): {**time_cell(HOUR, 0, 1), "audited_jobs": 3},
             ("worker", "w1", D2): {"audited_jobs": 2, "failed_audits": 1},  # audits only
             ("worker", "stray", D1): time_cell(HOUR, 0, 1)}
    r = report(cells, "worker", registered={"w1": {"operator": "acme", "kind": "linked"}})
    rows = {row["worker"]: row for row in r.rows}
    assert (rows["w1"]["operator"], rows["w1"]["kind"]) == ("acme", "linked")
    assert (rows["w1"]["audited_jobs"], rows["w1"]["failed_audits"]) == (5, 1)
    assert (rows["stray"]["operator"], rows["stray"]["kind"]) == ("", "")
    assert (rows["stray"]["audited_jobs"], rows["stray"]["failed_audits"]) == (0, 0)
    assert (r.totals["audited_jobs"], r.totals["failed_audits"], r.totals["operator"]) == (5, 1, "")


def test_operator_rows_sum_their_workers_and_unregistered_ones_are_under_none():
    cells = {("worker", "a1", D1): {**time_cell(2 * HOUR, HOUR, 1_000_001), "charge_uusd": 500,
                                    "completion_tokens": 100, "audited_jobs": 4},
             ("worker", "a2", D1): {**time_cell(HOUR, 0, 2_000_000), "completion_tokens": 50},
             ("worker", "a2", D2): {**time_cell(HOUR, HOUR, 2_000_000), "audited_jobs": 1,
                                    "failed_audits": 1},
             ("worker", "b1", D2): {**time_cell(HOUR, 0, 3_000_000), "charge_uusd": 7},
             ("worker", "stray", D1): time_cell(HOUR, 0, 1),
             ("worker", "(none)", D1): {"jobs": 1, "charge_uusd": 3}}
    registered = {"a1": {"operator": "acme", "kind": "linked"},
                  "a2": {"operator": "acme", "kind": "in-cluster"},
                  "b1": {"operator": "beta", "kind": "linked"},
                  "idle": {"operator": "gamma", "kind": "linked"}}  # no usage: no row
    store = FakeStore(cells, registered=registered)
    noon = datetime.fromisoformat(f"{D2}T12:00:00+00:00").timestamp()
    store.periods = [{"worker": "a2", "reason": "a failed audit", "since": noon, "until": None}]
    reports = asyncio.run(build_reports(store, D1, D3, ("worker", "operator")))
    r = reports["operator"]
    rows = {row["operator"]: row for row in r.rows}
    assert list(rows) == ["acme", "beta", NO_OPERATOR]
    acme = rows["acme"]
    assert acme["workers"] == 2 and acme["tokens_served"] == 150
    assert acme["gpu_cost_usd"] == Decimal("6.000002")  # 2.000002 + 2 + 2
    assert acme["withheld_usd"] == Decimal("2.000000")  # a2 on D2, quarantined since then
    assert acme["payout_usd"] == Decimal("4.000002")
    assert acme["margin_usd"] == Decimal("-4.000002") + Decimal("0.000500")
    assert (acme["audited_jobs"], acme["failed_audits"]) == (5, 1)
    assert (acme["busy_hours"], acme["online_hours"], acme["utilisation"]) == (2.0, 4.0, 0.5)
    assert acme["cost_per_million_tokens_usd"] == Decimal("40000.013333")  # 6000002 / 150
    none = rows[NO_OPERATOR]  # "stray" (unregistered) and the jobs that reached no worker
    assert none["workers"] == 1 and none["gpu_cost_usd"] == Decimal("0.000001")
    assert none["revenue_usd"] == Decimal("0.000003")
    worker = reports["worker"].totals
    for column in COLUMNS["operator"][2:]:
        assert r.totals[column.name] == worker[column.name], column.name
    assert r.totals["workers"] == 4 and r.totals["operator"] == TOTAL


def test_gpu_report_groups_workers_by_registration():
    cells = {("worker", "a", D1): time_cell(2 * HOUR, HOUR, 1_000_001),
             ("worker", "b", D1): time_cell(HOUR, HOUR, 3_000_000),
             ("worker", "ghost", D2): time_cell(HOUR, 0, 1),
             ("gpu", "A100", D1): {**time_cell(3 * HOUR, 2 * HOUR, 0), "completion_tokens": 7200,
                                   "charge_uusd": 10_000_000},
             ("gpu", "L4", D1): {"completion_tokens": 2400}}
    info = {"a": {"gpu_type": "A100"}, "b": {"gpu_type": "A100"}}
    r = report(cells, "gpu", info)
    rows = {row["gpu_type"]: row for row in r.rows}
    assert list(rows) == ["A100", "L4", UNREGISTERED]
    a100 = rows["A100"]
    assert a100["workers"] == 2 and a100["gpu_cost_usd"] == Decimal("5.000002")
    assert a100["throughput_tok_s"] == 1.0 and a100["share_of_traffic"] == 0.75
    assert a100["cost_per_million_tokens_usd"] == Decimal("694.444722")  # 5000002 / 7200
    assert a100["margin_usd"] == Decimal("4.999998") and a100["utilisation"] == 2 / 3
    assert rows["L4"]["throughput_tok_s"] is None and rows["L4"]["workers"] == 0
    assert r.totals["workers"] == 3 and r.totals["share_of_traffic"] == 1.0


def test_day_report_has_tokens_per_tenant_and_every_day_with_usage():
    cells = {("all", "all", D1): {"jobs": 2, "prompt_tokens": 10, "completion_tokens": 4,
                                  "charge_uusd": 50, "online_ms": HOUR},
             ("tenant", "a", D1): {"jobs": 1, "prompt_tokens": 6, "completion_tokens": 1},
             ("tenant", "b", D1): {"jobs": 1, "prompt_tokens": 4, "completion_tokens": 3},
             ("worker", "w", D3): time_cell(HOUR, 0, 7)}
    r = report(cells, "day")
    assert [row["day"] for row in r.rows] == [D1, D3]
    assert r.rows[0]["tokens_per_tenant"] == {"a": 7, "b": 7}
    assert r.rows[0]["online_hours"] == 1.0 and r.rows[0]["margin_usd"] == Decimal("0.000050")
    assert r.rows[1]["gpu_cost_usd"] == Decimal("0.000007")
    assert r.totals["tokens_per_tenant"] == {"a": 7, "b": 7} and r.totals["requests"] == 2


def test_no_usage_gives_no_rows_and_zero_totals():
    for by in BY:
        r = report({}, by)
        assert r.rows == [] and r.totals[COLUMNS[by][0].name] == TOTAL
        assert all(r.totals[c.name] in (0, Decimal(0), None, "", {}) for c in r.columns[1:]), by
        assert (r.by, r.since, r.until) == (by, D1, D3)
        assert r.generated_at.endswith("Z")


def test_bad_by_and_days_name_the_field():
    with pytest.raises(InvalidArgument,
                       match="^by: expected one of tenant, worker, gpu, day, operator"):
        report({}, "model")
    with pytest.raises(InvalidArgument, match="^since:"):
        report({}, "tenant", since="2025-13-01")
    with pytest.raises(InvalidArgument, match="^until:"):
        report({}, "tenant", until="tomorrow")
    with pytest.raises(InvalidArgument, match="^since: 2025-06-03 is after until"):
        report({}, "tenant", since=D3, until=D1)


def test_cli_range_defaults_to_the_30_days_up_to_today_and_names_bad_options():
    from datetime import date

    today = date(2025, 3, 1)
    assert day_range(None, None, today) == ("2025-01-31", "2025-03-01")
    assert day_range(None, "2025-01-30", today) == ("2025-01-01", "2025-01-30")
    assert day_range("2024-12-31", None, today) == ("2024-12-31", "2025-03-01")
    with pytest.raises(ValueError, match="^--since: expected a UTC day"):
        day_range("01/02/2025", None, today)
    with pytest.raises(ValueError, match="^--until:"):
        day_range(None, "2025-02-30", today)


def random_ledger(seed: int, num_cells: int = 300):
    """Random (dimension, key, day) cells of every dimension, and registrations."""
    rng = random.Random(seed)
    days = [f"2025-07-{d:02d}" for d in range(1, 11)]
    keys = {"tenant": [f"t{i}" for i in range(6)],
            "worker": [f"w{i}" for i in range(8)] + ["(none)"],
            "gpu": ["A100", "H100", "L4"], "all": ["all"]}
    fields = {"tenant": JOB_FIELDS, "all": JOB_FIELDS + ("online_ms", "active_ms"),
              "worker": WORKER_FIELDS, "gpu": WORKER_FIELDS + ("online_ms", "active_ms")}
    cells = {}
    for _ in range(num_cells):
        dim = rng.choice(list(keys))
        cell = {f: rng.randrange(0, 10**6) for f in rng.sample(fields[dim], rng.randrange(1, 6))}
        if dim == "worker" and rng.random() < 0.7:
            cell.update(time_cell(rng.randrange(HOUR), 0, rng.randrange(10**7)))
        if dim == "worker" and rng.random() < 0.3:
            cell.update(audited_jobs=rng.randrange(1, 20), failed_audits=rng.randrange(2))
        cells[(dim, rng.choice(keys[dim]), rng.choice(days))] = cell
    info = {f"w{i}": {"gpu_type": rng.choice(keys["gpu"]), "price_uusd_per_hour": 1}
            for i in range(6)}  # w6, w7 unregistered
    registered = {f"w{i}": {"operator": rng.choice(("acme", "beta")), "kind": "linked"}
                  for i in range(5)}  # w5, w6, w7 under (none)
    return cells, info, registered, days[0], days[-1]


@pytest.mark.parametrize("seed", range(5))
def test_totals_equal_the_sum_of_rows_exactly(seed):
    cells, info, registered, since, until = random_ledger(seed)
    store = FakeStore(cells, info, registered)
    noon = datetime.fromisoformat("2025-07-04T12:00:00+00:00").timestamp()
    store.periods = [{"worker": f"w{i}", "reason": "3 strikes", "since": noon, "until": None}
                     for i in range(4)]  # withheld from 07-04 on
    reports = asyncio.run(build_reports(store, since, until))
    for by, r in reports.items():
        for column in r.columns:
            if column.unit in ("USD", "tokens", "count"):
                total = sum((row[column.name] for row in r.rows), start=r.totals[column.name] * 0)
                assert total == r.totals[column.name], (by, column.name)
    gpu_costs = {by: r.totals["gpu_cost_usd"] for by, r in reports.items()}
    expected = sum(cell_cost_uusd(c.get("gpu_cost_scaled", 0))
                   for (dim, _, _), c in cells.items() if dim == "worker")
    assert {uusd(v) for v in gpu_costs.values()} == {expected}, gpu_costs
    worker, gpu = reports["worker"].totals, reports["gpu"].totals
    assert uusd(worker["revenue_usd"]) == sum(c.get("charge_uusd", 0)
                                              for (d, _, _), c in cells.items()
                                              if d == "worker")
    assert gpu["workers"] == len(reports["worker"].rows)
    operator = reports["operator"].totals
    assert uusd(worker["withheld_usd"]) > 0
    for column in COLUMNS["operator"][2:]:  # every operator figure is its workers' summed
        assert operator[column.name] == worker[column.name], column.name
    assert operator["workers"] == len([r for r in reports["worker"].rows
                                       if r["worker"] != "(none)"])
    assert worker["audited_jobs"] == sum(c.get("audited_jobs", 0) for (d, _, _), c in
                                         cells.items() if d == "worker")
