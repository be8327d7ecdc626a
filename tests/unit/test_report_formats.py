"""Reports as text, CSV, JSON and HTML: each states the UTC range, CSV parses with its
documented columns, JSON money is exact strings, and the HTML page is one self-contained file
with three charts."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from decimal import Decimal

import pytest

from scheduler.report_formats import to_csv, to_html, to_json, to_table
from scheduler.reports import BY, COLUMNS, ROUNDING, TOTAL, build_reports

SINCE, UNTIL = "2025-06-01", "2025-06-07"
HOUR = 3_600_000
MONEY = re.compile(r"^-?\d+\.\d{6}$")


class FakeStore:
    def __init__(self, cells, info):
        self.cells, self.info = cells, info

    async def usage_keys(self, dimension):
        return sorted({key for dim, key, _ in self.cells if dim == dimension})

    async def usage(self, dimension, key, since, until):
        return sorted((day, f) for (dim, k, day), f in self.cells.items()
                      if dim == dimension and k == key and since <= day <= until)

    async def workers_info(self):
        return self.info


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
                "gpu_cost_scaled": (5 * HOUR + 17) * price}
            cells[("gpu", gpu, day)] = {"completion_tokens": 1000 * (i + 1), "active_ms": HOUR}
    for t, tenant in enumerate(("acme", "beta")):
        for day in ("2025-06-02", "2025-06-03"):
            cells[("tenant", tenant, day)] = {"jobs": 3, "prompt_tokens": 900 + t,
                                              "completion_tokens": 3000, "charge_uusd": 60_001}
    cells[("all", "all", "2025-06-02")] = {"jobs": 6, "prompt_tokens": 1801,
                                           "completion_tokens": 6000, "charge_uusd": 120_002}
    return cells, info


@pytest.fixture(scope="module")
def reports():
    cells, info = ledger()
    return asyncio.run(build_reports(FakeStore(cells, info), SINCE, UNTIL))


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


@pytest.mark.parametrize("by", BY)
def test_json_states_the_range_and_carries_money_as_six_decimal_strings(reports, by):
    r = reports[by]
    doc = json.loads(to_json(r))
    assert (doc["by"], doc["since"], doc["until"], doc["timezone"]) == (by, SINCE, UNTIL, "UTC")
    assert doc["rounding"] == ROUNDING and doc["generated_at"] == r.generated_at
    assert [(c["name"], c["unit"]) for c in doc["columns"]] == [(c.name, c.unit) for c in COLUMNS[by]]
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
    assert f"UTC days {SINCE} to {UNTIL}" in lines[0] and "2 decimals" in lines[1]
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
    assert page.count("<table>") == 4


def test_html_escapes_names_and_shows_tables_in_the_given_order(reports):
    page = to_html({"gpu": reports["gpu"], "tenant": reports["tenant"]})
    assert "<b>GPU&" not in page and "&lt;b&gt;GPU&amp;" in page
    assert page.index("By GPU type") < page.index("By tenant")
    assert page.count("<svg") == 1  # only the GPU chart has its report


def test_html_of_an_empty_ledger_still_draws_the_charts(empty):
    page = to_html(empty)
    assert page.count("<svg") == 3 and "no usage in this range" in page
    with pytest.raises(ValueError, match="^reports:"):
        to_html({})
