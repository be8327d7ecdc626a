"""A `Report` as text: an aligned table, CSV, JSON, or one self-contained HTML page.

- `to_table`: a line stating the UTC range, one stating the rounding, then aligned columns
  and the totals row. Amounts (USD) share the fewest decimals, from 2 (cents) to 6 (exact
  micro-dollars), at which every non-zero one keeps 2 significant digits (so sub-cent amounts
  never read 0.00) and every column's shown rows add up to its shown total (at 6 they always
  do); hours share the fewest that keep 2 digits in all of them, and prices per hour or per
  million tokens take the fewest that keep 2 digits in their own column. Ratios as percent.
- `to_csv`: a header row of column names, one row per report row, then the totals row (its
  key column reads `(total)`). Every row also carries `since` and `until`, the UTC range, as
  CSV allows no comment line. Money as exact USD with 6 decimals ("12.345678"); empty cells
  are figures without a denominator. The `tokens_per_tenant` column (a dict) is left out.
- `to_json`: {by, since, until, timezone: "UTC", generated_at, rounding, columns (name, unit,
  doc), rows, totals}; money as strings with 6 decimals, empty figures as null.
- `to_html` (in `report_html.py`): every report on one page, with the same rounding.

Knows: presentation. Does not know: the ledger or how figures are computed (`reports.py`).
"""

from __future__ import annotations

import csv
import io
import json
from decimal import ROUND_HALF_EVEN, Decimal

from scheduler.reports import ROUNDING, Column, Report

MIN_PLACES, MAX_PLACES = 2, 6
"""Decimals of money and hours that tables (text and HTML) show: from cents to micro-dollars."""
SIGNIFICANT = 2
"""Significant digits every non-zero figure keeps in a table (up to MAX_PLACES decimals)."""
AMOUNT_UNIT, _ROUNDED = "USD", ("USD", "USD/h", "USD/Mtok", "h")
"""Amounts add up over rows, prices (per hour, per Mtok) do not; `column_places` picks the decimals
of all four units (money as Decimal, hours as float)."""
_FLOAT_FORMAT = {"tokens/s": "{:,.1f}", "tokens/step": "{:.2f}", "ratio": "{:.1%}"}


def is_map(column: Column) -> bool:
    return column.unit == "tokens by tenant"


def _decimal(value) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(repr(value))


def round_to(value, places: int) -> Decimal:
    return _decimal(value).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN)


def significant_places(values) -> int:
    """The fewest decimals, MIN_PLACES to MAX_PLACES, at which every non-zero value of
    `values` (None skipped) keeps SIGNIFICANT digits."""
    needed = [SIGNIFICANT - 1 - _decimal(v).adjusted() for v in values if v]
    return min(max([MIN_PLACES, *needed]), MAX_PLACES)


def _adds_up(report: Report, name: str, places: int) -> bool:
    """Whether the column's rows, rounded to `places`, add up to its rounded total."""
    total = report.totals[name]
    if total is None or any(row[name] is None for row in report.rows):
        return True
    shown = sum((round_to(row[name], places) for row in report.rows), Decimal(0))
    return shown == round_to(total, places)


def column_places(report: Report) -> dict[str, int]:
    """Decimals shown per column of money and hours (see the module's docstring)."""
    rows = report.rows + [report.totals]
    places = {c.name: significant_places(row[c.name] for row in rows)
              for c in report.columns if c.unit in _ROUNDED}
    for unit in (AMOUNT_UNIT, "h"):  # comparable side by side: one count for the report
        names = [c.name for c in report.columns if c.unit == unit]
        shared = max((places[name] for name in names), default=MIN_PLACES)
        while unit == AMOUNT_UNIT and shared < MAX_PLACES and not all(
                _adds_up(report, name, shared) for name in names):
            shared += 1
        places |= dict.fromkeys(names, shared)
    return places


ROUNDING_RULE = (f"the fewest decimals ({MIN_PLACES} to {MAX_PLACES}) at which every amount keeps "
         f"{SIGNIFICANT} significant digits and every column adds up to its total; hours: the "
         f"fewest that keep {SIGNIFICANT} digits in every hours column, prices: in their column; "
         "rounded half-even; CSV and JSON carry exact micro-dollars")


def money_note(report: Report, places: dict[str, int]) -> str:
    """"money in USD to N decimals": how a table of `report` shows its amounts."""
    shared = {places[c.name] for c in report.columns if c.unit == AMOUNT_UNIT} or {MIN_PLACES}
    return f"money in USD to {max(shared)} decimals"


def shown_cell(column: Column, value, places: int | None = None) -> str:
    """A value as tables show it; money and hours to `places` decimals (default: enough for
    this value alone)."""
    if value is None:
        return "-"
    if column.unit in _ROUNDED:
        digits = significant_places([value]) if places is None else places
        return f"{round_to(value, digits):,}"
    if isinstance(value, float):
        return _FLOAT_FORMAT.get(column.unit, "{:.4g}").format(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _exact(value):
    """A value as CSV and JSON carry it: money as a string of 6 decimals."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, float):
        return round(value, 6)
    return value


def _range_line(report: Report) -> str:
    return (f"UTC days {report.since} to {report.until}, both included "
            f"(generated {report.generated_at})")


# --- text, CSV, JSON ---------------------------------------------------------------------------

def to_table(report: Report) -> str:
    columns = [c for c in report.columns if not is_map(c)]
    places = column_places(report)
    body = [[shown_cell(c, row[c.name], places.get(c.name)) for c in columns]
            for row in report.rows]
    totals = [shown_cell(c, report.totals[c.name], places.get(c.name)) for c in columns]
    widths = [max(len(c.name), *(len(r[i]) for r in body + [totals]))
              for i, c in enumerate(columns)]

    def line(cells):
        return "  ".join(cell.ljust(w) if c.unit in ("text", "day") else cell.rjust(w)
                         for c, cell, w in zip(columns, cells, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [f"sparkgrid cost report by {report.by}: {_range_line(report)}",
           f"{money_note(report, places)}, {ROUNDING_RULE}", "",
           line([c.name for c in columns]), rule, *(line(r) for r in body)]
    if not body:
        out.append("(no usage in this range)")
    out += [rule, line(totals)]
    return "\n".join(out) + "\n"


def to_csv(report: Report) -> str:
    columns = [c.name for c in report.columns if not is_map(c)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns + ["since", "until"])
    for row in report.rows + [report.totals]:
        writer.writerow([("" if row[name] is None else _exact(row[name])) for name in columns]
                        + [report.since, report.until])
    return buffer.getvalue()


def to_json(report: Report) -> str:
    def encode(row: dict) -> dict:
        return {name: _exact(value) for name, value in row.items()}

    document = {"by": report.by, "since": report.since, "until": report.until, "timezone": "UTC",
                "generated_at": report.generated_at, "rounding": ROUNDING,
                "columns": [{"name": c.name, "unit": c.unit, "doc": c.doc} for c in report.columns],
                "rows": [encode(row) for row in report.rows], "totals": encode(report.totals)}
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


# --- SVG charts ---------------------------------------------------------------------------------
