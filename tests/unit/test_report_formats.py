"""Reports as text, CSV, JSON and HTML: each states the UTC range, CSV parses with its
documented columns, JSON money is exact strings, tables show money to enough decimals that no
amount reads as zero and the shown rows add up to the shown totals, and the HTML page is one
self-contained file with three charts."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from decimal import Decimal

import pytest

from scheduler.report_formats import to_csv, to_json, to_table
from scheduler.report_html import to_html
from scheduler.reports import BY, COLUMNS, ROUNDING, TOTAL, build_reports

SINCE, UNTIL = "2025-06-01", "2025-06-07"
HOUR = 3_600_000
MONEY = re.compile(r"^-?\d+\.\d{6}$")


class FakeStore:
    def __init__(self, cells, info, registered=None):
        self.cells, self.info, self.registered = cells, info, registered or {}

    async def usage_keys(self, dimension):
        return sorted({key for dim, key, _ in self.cells if dim == dimension})

    async def usage(self, dimension, key, since, until):
        return sorted((day, f) for (dim, k, day), f in self.cells.items()
                      if dim == dimension and k == key and since <= day <= until)

    async def workers_info(self):
        return self.info

    async def withheld_periods(self):
        return getattr(self, "periods", [])

    async def registrations(self):
        return self.registered


def ledger():
    cells, info = {}, {}
    for i, (worker, gpu, price) in enumerate((("h1", "H100", 2_500_003), ("l1", "L4", 450_000),
                                              ("x1", "<b>GPU&", 1_000_000))):
        info[worker] = {"gpu_type": gpu, "price_uusd_per_hour": price}
        for day in ("2025-06-02", "2025-06-03"):
            cells[("worker", worker, day)] = {
                "jobs": 2, "completion_tokens": 1000 * (i + 1), "charge_uusd": 40_000 + i,
                "spec_steps": 300, "accepted_tokens": 500, "verified_tokens": 2100,
                "online_ms": 5 * HOUR + 17, "active_ms": HOUR * (i + 1),
                "gpu_cost_scaled": (5 * HOUR + 17) * price, "audited_jobs": 2 - i,
                "failed_audits": int(i == 1)}
            cells[("gpu", gpu, day)] = {"completion_tokens": 1000 * (i + 1), "active_ms": HOUR}
    for t, tenant in enumerate(("acme", "beta")):
        for day in ("2025-06-02", "2025-06-03"):
            cells[("tenant", tenant, day)] = {"jobs": 3, "prompt_tokens": 900 + t,
                                              "completion_tokens": 3000, "charge_uusd": 60_001}
    cells[("all", "all", "2025-06-02")] = {"jobs": 6, "prompt_tokens": 1801,
                                           "completion_tokens": 6000, "charge_uusd": 120_002}
    return cells, info


REGISTERED = {"h1": {"operator": "<i>north", "kind": "linked"},
              "l1": {"operator": "<i>north", "kind": "in-cluster"}}  # x1: none


@pytest.fixture(scope="module")
def reports():
    cells, info = ledger()
    return asyncio.run(build_reports(FakeStore(cells, info, REGISTERED), SINCE, UNTIL))


@pytest.fixture(scope="module")
def empty():
    return asyncio.run(build_reports(FakeStore({}, {}), SINCE, UNTIL))


def money_columns(report):
    return [c.name for c in report.columns if c.unit.startswith("USD")]


@pytest.mark.parametrize("by", BY)
def test_csv_parses_with_the_documented_columns_and_the_range_on_every_row(reports, by):
    r = reports[by]
    rows = list(csv.DictReader(io.StringIO(to_csv(r))))
    documented = [c.name for c in COLUMNS[by] if c.name != "tokens_per_tenant"]
    assert list(rows[0]) == documented + ["since", "until"]
    assert len(rows) == len(r.rows) + 1 and rows[-1][documented[0]] == TOTAL
    assert all((row["since"], row["until"]) == (SINCE, UNTIL) for row in rows)
    for row in rows:
        for name in money_columns(r):
            assert row[name] == "" or MONEY.match(row[name]), (name, row[name])


def test_csv_money_is_exact_and_empty_figures_are_empty(reports):
    rows = list(csv.DictReader(io.StringIO(to_csv(reports["tenant"]))))
    assert [row["charges_usd"] for row in rows] == ["0.120002", "0.120002", "0.240004"]
    worker_rows = list(csv.DictReader(io.StringIO(to_csv(reports["worker"]))))
    assert worker_rows[-1]["price_per_hour_usd"] == ""


def test_operator_and_audit_columns_in_csv_and_json(reports):
    rows = list(csv.DictReader(io.StringIO(to_csv(reports["operator"]))))
    assert [(r["operator"], r["workers"]) for r in rows] == [
        ("<i>north", "2"), ("(none)", "1"), (TOTAL, "3")]
    assert [(r["audited_jobs"], r["failed_audits"]) for r in rows] == [
        ("6", "2"), ("0", "0"), ("6", "2")]
    assert rows[-1]["gpu_cost_usd"] == str(reports["worker"].totals["gpu_cost_usd"])
    worker = json.loads(to_json(reports["worker"]))
    assert [(r["worker"], r["operator"], r["kind"], r["failed_audits"])
            for r in worker["rows"]] == [("h1", "<i>north", "linked", 0),
                                         ("l1", "<i>north", "in-cluster", 2),
                                         ("x1", "", "", 0)]
    assert "audited_jobs" in to_table(reports["operator"]).splitlines()[3]


@pytest.mark.parametrize("by", BY)
def test_json_states_the_range_and_carries_money_as_six_decimal_strings(reports, by):
    r = reports[by]
    doc = json.loads(to_json(r))
    assert (doc["by"], doc["since"], doc["until"], doc["timezone"]) == (by, SINCE, UNTIL, "UTC")
    assert doc["rounding"] == ROUNDING and doc["generated_at"] == r.generated_at
    assert [(c["name"], c["unit"]) for c in doc["columns"]] == \
        [(c.name, c.unit) for c in COLUMNS[by]]
    assert all(c["doc"] for c in doc["columns"])
    for row in doc["rows"] + [doc["totals"]]:
        for name in money_columns(r):
            assert row[name] is None or (isinstance(row[name], str) and MONEY.match(row[name]))
    total = sum(Decimal(row[name]) for row in doc["rows"] for name in ("gpu_cost_usd",))
    assert total == Decimal(doc["totals"]["gpu_cost_usd"])


def test_json_keeps_tokens_per_tenant_and_nulls(reports):
    doc = json.loads(to_json(reports["day"]))
    assert doc["rows"][0]["tokens_per_tenant"] == {"acme": 3900, "beta": 3901}
    worker = json.loads(to_json(reports["worker"]))
    assert worker["totals"]["price_per_hour_usd"] is None


@pytest.mark.parametrize("by", BY)
def test_table_states_the_range_and_aligns_every_line(reports, by):
    text = to_table(reports[by])
    lines = text.splitlines()
    assert f"UTC days {SINCE} to {UNTIL}" in lines[0]
    assert re.match(r"money in USD to [2-6] decimals, the fewest ", lines[1])
    table = lines[3:]
    assert table[-1].startswith(TOTAL)
    assert len({len(table[1]), len(table[-2])}) == 1  # the two rules
    assert "tokens_per_tenant" not in text


def test_table_rounds_money_to_cents_and_says_when_empty(reports, empty):
    text = to_table(reports["tenant"])
    assert " 0.12 " in text and "0.120002" not in text
    assert "(no usage in this range)" in to_table(empty["gpu"])


def test_html_is_one_self_contained_page_with_three_charts(reports):
    page = to_html(reports, {"Redis key prefix": "sg"})
    assert page.startswith("<!DOCTYPE html>") and page.count("<html") == 1
    lowered = page.lower()
    for outside in ("http://", "https://", "src=", "<script", "<link", "url(", "@import"):
        assert outside not in lowered, outside
    assert page.count("<svg") == 3
    assert f"UTC days <b>{SINCE}</b> to <b>{UNTIL}</b>" in page
    assert reports["tenant"].generated_at in page and "Redis key prefix: sg" in page
    assert page.count("<table>") == len(BY) and "By operator" in page


def test_html_escapes_names_and_shows_tables_in_the_given_order(reports):
    page = to_html({"gpu": reports["gpu"], "tenant": reports["tenant"]})
    assert "<b>GPU&" not in page and "&lt;b&gt;GPU&amp;" in page
    operators = to_html({"operator": reports["operator"]})
    assert "<i>north" not in operators and "&lt;i&gt;north" in operators
    assert page.index("By GPU type") < page.index("By tenant")
    assert page.count("<svg") == 1  # only the GPU chart has its report


def test_html_of_an_empty_ledger_still_draws_the_charts(empty):
    page = to_html(empty)
    assert page.count("<svg") == 3 and "no usage in this range" in page
    with pytest.raises(ValueError, match="^reports:"):
        to_html({})


# -- how many decimals tables show ---------------------------------------------------------------
def tiny_ledger(price_uusd_per_hour=100_000, charge_uusd=(700, 300)):
    """Two minutes of two workers at $0.10/h and a few hundred tokens: a demo's sub-cent day."""
    day, cells, info = "2025-06-02", {}, {}
    for i, worker in enumerate(("w1", "w2")):
        info[worker] = {"gpu_type": "cpu", "price_uusd_per_hour": price_uusd_per_hour}
        cells[("worker", worker, day)] = {
            "jobs": 3 - i, "completion_tokens": 300 - 100 * i, "charge_uusd": charge_uusd[i],
            "spec_steps": 100, "accepted_tokens": 150, "verified_tokens": 400,
            "online_ms": 120_000 + i, "active_ms": 4_000 * (i + 1),
            "gpu_cost_scaled": (120_000 + i) * price_uusd_per_hour}
        cells[("gpu", "cpu", day)] = {"completion_tokens": 500, "active_ms": 12_000}
    cells[("tenant", "local", day)] = {"jobs": 5, "prompt_tokens": 60, "completion_tokens": 500,
                                       "charge_uusd": sum(charge_uusd)}
    cells[("all", "all", day)] = {"jobs": 5, "prompt_tokens": 60, "completion_tokens": 500,
                                  "charge_uusd": sum(charge_uusd)}
    return asyncio.run(build_reports(FakeStore(cells, info), SINCE, UNTIL))


def table_cells(text: str) -> tuple[list[str], list[list[str]], list[str]]:
    """(column names, body rows, totals row) of a `to_table` text, cut at the rule's dashes."""
    lines = text.splitlines()[3:]
    spans = [m.span() for m in re.finditer(r"-+", lines[1])]
    split = [[line[a:b].strip() for a, b in spans] for line in lines]
    return split[0], split[2:-2], split[-1]


@pytest.mark.parametrize("by", BY)
def test_sub_cent_money_keeps_two_significant_digits_and_the_rows_add_up(by):
    report = tiny_ledger()[by]
    names, body, totals = table_cells(to_table(report))
    decimals = int(re.search(r"to (\d) decimals", to_table(report)).group(1))
    for column in report.columns:
        if column.unit != "USD":
            continue
        i = names.index(column.name)
        shown = [Decimal(row[i].replace(",", "")) for row in body]
        total = Decimal(totals[i].replace(",", ""))
        assert sum(shown) == total, (column.name, shown, total)
        for cell, value in zip([*shown, total], [*(r[column.name] for r in report.rows),
                                                 report.totals[column.name]]):
            assert -cell.as_tuple().exponent == decimals  # one count for every amount
            if value:  # shown digits: from the first non-zero one to the last decimal
                assert cell != 0 and (decimals + cell.adjusted() + 1 >= 2 or decimals == 6), \
                    (column.name, cell, value)
    assert 2 < decimals <= 6


def test_sub_cent_money_is_never_all_zero_in_tables_or_html():
    reports = tiny_ledger()
    for by, report in reports.items():
        names, body, totals = table_cells(to_table(report))
        for column in (c for c in report.columns if c.unit.startswith("USD")):
            cells = [row[names.index(column.name)] for row in body + [totals]]
            values = [r[column.name] for r in report.rows] + [report.totals[column.name]]
            assert all(c != "-" and Decimal(c.replace(",", "")) != 0
                       for c, v in zip(cells, values) if v), (by, column.name, cells)
    page = to_html(reports)
    decimals = int(re.search(r"to (\d) decimals", to_table(reports["day"])).group(1))
    gpu_cost = reports["day"].totals["gpu_cost_usd"].quantize(Decimal(1).scaleb(-decimals))
    assert 'class="v">$0.00<' not in page and f'class="v">${gpu_cost}<' in page
    assert f"money in USD to {decimals} decimals" in page


def test_prices_take_the_decimals_their_column_needs_and_hours_share_theirs():
    worker = tiny_ledger(price_uusd_per_hour=45_000)["worker"]
    names, body, totals = table_cells(to_table(worker))
    assert [row[names.index("price_per_hour_usd")] for row in body] == ["0.045", "0.045"]
    assert [row[names.index("cost_per_million_tokens_usd")] for row in body] == ["5.00", "7.50"]
    assert [row[names.index("busy_hours")] for row in body] == ["0.0011", "0.0022"]
    assert [row[names.index("online_hours")] for row in body] == ["0.0333", "0.0333"]
    assert totals[names.index("price_per_hour_usd")] == "-"


def test_whole_dollar_reports_keep_cents():
    reports = tiny_ledger(price_uusd_per_hour=30_000_000, charge_uusd=(2_500_000, 1_250_000))
    text = to_table(reports["tenant"])
    assert "money in USD to 2 decimals" in text and " 3.75 " in text
    names, body, _ = table_cells(to_table(reports["worker"]))  # hours need more; money does not
    assert "money in USD to 2 decimals" in to_table(reports["worker"])
    assert [row[names.index("gpu_cost_usd")] for row in body] == ["1.00", "1.00"]
    assert [row[names.index("online_hours")] for row in body] == ["0.0333", "0.0333"]
