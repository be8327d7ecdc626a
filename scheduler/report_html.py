"""A set of `Report`s as one self-contained HTML page: `to_html(reports, extra)`.

The reports by tenant, worker, GPU type, day and operator on one page with inline CSS and
three inline SVG charts drawn here (cost per million tokens by GPU type, tokens per day per
tenant stacked, utilisation per worker), no script and no link outside. Tables, and the
headline figures, are rounded as `report_formats.to_table` rounds them.

Knows: HTML, SVG. Does not know: the ledger or how figures are computed (`reports.py`).
"""

from __future__ import annotations

import math
from decimal import Decimal
from html import escape

from scheduler.ledger import days_between
from scheduler.report_formats import (
    AMOUNT_UNIT,
    MAX_PLACES,
    MIN_PLACES,
    ROUNDING_RULE,
    column_places,
    is_map,
    money_note,
    round_to,
    shown_cell,
    significant_places,
)
from scheduler.reports import ROUNDING, Column, Report

_PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
            "#ff9da7", "#9c755f")
_OTHERS_COLOUR = "#bab0ac"
_MAX_TENANTS_DRAWN = len(_PALETTE)
_MAX_DAYS_FILLED = 120
"""Up to this many days the day chart shows every day of the range, days without usage too."""


def _nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^k at or above `value` (1 for nothing)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value * (1 - 1e-12))


def _svg(width: int, height: int, label: str, body: list[str]) -> str:
    return (f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}" '
            f'class="chart">' + "".join(body) + "</svg>")


def _y_axis(left: int, top: int, width: int, height: int, top_value: float, fmt) -> list[str]:
    out = []
    for i in range(5):
        y = top + height - height * i / 4
        out.append(f'<line x1="{left}" x2="{left + width}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
                   f"{escape(fmt(top_value * i / 4))}</text>")
    return out


def _compact(value: float) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def gpu_colours(*reports: Report) -> dict[str, str]:
    """One colour per GPU type of the reports' rows (by name), so that charts agree."""
    types = sorted({r["gpu_type"] for report in reports for r in report.rows})
    return {gpu: _PALETTE[i % len(_PALETTE)] for i, gpu in enumerate(types)}


def cost_chart(gpu: Report, colours: dict[str, str]) -> str:
    """Bars: cost per million tokens served, by GPU type, cheapest first."""
    items = sorted(((r["gpu_type"], float(r["cost_per_million_tokens_usd"])) for r in gpu.rows
                    if r["cost_per_million_tokens_usd"] is not None), key=lambda item: item[1])
    width, height, left, top, plot_h = 620, 300, 64, 16, 230
    plot_w = width - left - 12
    top_value = _nice_ceiling(max((v for _, v in items), default=0))
    ticks = [Decimal(repr(top_value)) * i / 4 for i in range(5)]
    tick = next((d for d in range(MIN_PLACES, MAX_PLACES)
                 if all(round_to(t, d) == t for t in ticks)), MAX_PLACES)
    body = _y_axis(left, top, plot_w, plot_h, top_value, lambda v: f"${round_to(v, tick):,}")
    slot = plot_w / max(len(items), 1)
    for i, (name, value) in enumerate(items):
        h = plot_h * value / top_value
        x = left + i * slot + slot * 0.2
        body.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{slot * 0.6:.1f}" '
                    f'height="{h:.1f}" rx="3" fill="{colours[name]}"/>'
                    f'<text x="{x + slot * 0.3:.1f}" y="{top + plot_h - h - 5:.1f}" class="value" '
                    f'text-anchor="middle">${round_to(value, significant_places([value])):,}</text>'
                    f'<text x="{x + slot * 0.3:.1f}" y="{top + plot_h + 18}" class="label" '
                    f'text-anchor="middle">{escape(name)}</text>')
    if not items:
        body.append(f'<text x="{width / 2}" y="{top + plot_h / 2}" class="label" '
                    'text-anchor="middle">no tokens served in this range</text>')
    return _svg(width, height, "cost per million tokens by GPU type", body)


def _tenant_series(day: Report) -> list[tuple[str, str]]:
    """(tenant, colour) of the tenants drawn one by one (the most tokens first); the rest are
    drawn together as "others"."""
    tokens = day.totals["tokens_per_tenant"]
    ranked = sorted(tokens, key=lambda t: (-tokens[t], t))
    drawn = ranked if len(ranked) <= _MAX_TENANTS_DRAWN else ranked[:_MAX_TENANTS_DRAWN - 1]
    series = [(t, _PALETTE[i]) for i, t in enumerate(drawn)]
    return series + ([("others", _OTHERS_COLOUR)] if len(drawn) < len(ranked) else [])


def tokens_chart(day: Report) -> tuple[str, list[tuple[str, str]]]:
    """Stacked bars: prompt + completion tokens per UTC day, by tenant; and the legend."""
    series = _tenant_series(day)
    named = {name for name, _ in series if name != "others"}
    by_day = {r["day"]: r["tokens_per_tenant"] for r in day.rows}
    days = days_between(day.since, day.until)
    if len(days) > _MAX_DAYS_FILLED:
        days = sorted(by_day)
    width, height, left, top, plot_h = 1240, 320, 64, 16, 250
    plot_w = width - left - 12
    top_value = _nice_ceiling(max((sum(by_day.get(d, {}).values()) for d in days), default=0))
    body = _y_axis(left, top, plot_w, plot_h, top_value, _compact)
    slot = plot_w / max(len(days), 1)
    label_every = max(1, math.ceil(len(days) / 20))
    for i, d in enumerate(days):
        tokens = by_day.get(d, {})
        parts = {name: tokens.get(name, 0) for name in named}
        parts["others"] = sum(n for t, n in tokens.items() if t not in named)
        y = top + plot_h
        x = left + i * slot + slot * 0.12
        for name, colour in series:
            h = plot_h * parts[name] / top_value
            if h > 0:
                y -= h
                body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.76:.1f}" '
                            f'height="{h:.1f}" fill="{colour}"><title>{escape(d)} {escape(name)}: '
                            f"{parts[name]:,} tokens</title></rect>")
        if i % label_every == 0:
            body.append(f'<text x="{x + slot * 0.38:.1f}" y="{top + plot_h + 18}" class="label" '
                        f'text-anchor="middle">{escape(d[5:])}</text>')
    return _svg(width, height, "tokens per day per tenant", body), series


def utilisation_chart(worker: Report, colours: dict[str, str]) -> tuple[str, list[tuple[str, str]]]:
    """Horizontal bars: utilisation per worker (busiest first), coloured by GPU type."""
    rows = sorted((r for r in worker.rows if r["utilisation"] is not None),
                  key=lambda r: (-r["utilisation"], r["worker"]))
    shown = sorted({r["gpu_type"] for r in rows})
    left, top, row_h, plot_w = 150, 24, 18, 430
    width, height = left + plot_w + 60, top + row_h * max(len(rows), 1) + 8
    body = []
    for i in range(5):
        x = left + plot_w * i / 4
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 4}" y2="{height - 8}" '
                    'class="grid"/>'
                    f'<text x="{x:.1f}" y="{top - 9}" class="tick" text-anchor="middle">'
                    f"{25 * i}%</text>")
    for i, r in enumerate(rows):
        y = top + i * row_h
        w = plot_w * min(r["utilisation"], 1.0)
        body.append(f'<text x="{left - 8}" y="{y + 13}" class="label" text-anchor="end">'
                    f'{escape(r["worker"])}</text><rect x="{left}" y="{y + 3}" width="{w:.1f}" '
                    f'height="{row_h - 6}" rx="2" fill="{colours[r["gpu_type"]]}"/>'
                    f'<text x="{left + w + 5:.1f}" y="{y + 13}" class="value">'
                    f'{r["utilisation"]:.0%}</text>')
    if not rows:
        body.append(f'<text x="{left}" y="{top + 13}" class="label">no worker was online</text>')
    return _svg(width, height, "utilisation per worker", body), [(g, colours[g]) for g in shown]


# --- HTML ---------------------------------------------------------------------------------------

_CSS = """
body{margin:0;background:#f4f5f7;color:#1f2933;font:14px/1.45 system-ui,-apple-system,"Segoe UI",
Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1320px;margin:0 auto;padding:28px 32px 48px}
header h1{margin:0 0 4px;font-size:26px;font-weight:650}
header .range{font-size:17px;color:#334e68}.meta{color:#627d98;font-size:13px;margin-top:2px}
.kpis{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:14px;margin:22px 0}
.kpi,.card{background:#fff;border:1px solid #e1e5ea;border-radius:10px;
box-shadow:0 1px 2px rgba(16,24,40,.05)}
.kpi{padding:14px 16px}.kpi .k{color:#627d98;font-size:12px;text-transform:uppercase;
letter-spacing:.04em}.kpi .v{font-size:24px;font-weight:650;margin-top:2px}
.kpi .v small{font-size:13px;font-weight:500;color:#627d98;margin-left:6px}
.card{padding:16px 18px;margin-bottom:18px}.card h2{margin:0 0 2px;font-size:17px}
.card .sub{color:#627d98;font-size:12.5px;margin-bottom:8px}
.row{display:grid;grid-template-columns:1fr 1fr;gap:18px;align-items:start}
svg.chart{width:100%;height:auto;display:block}
svg .grid{stroke:#e4e7eb;stroke-width:1}svg .tick{fill:#829ab1;font-size:11px}
svg .label{fill:#486581;font-size:11.5px}svg .value{fill:#243b53;font-size:11px;font-weight:600}
.legend{display:flex;flex-wrap:wrap;gap:6px 16px;font-size:12.5px;color:#486581;margin-top:6px}
.legend i{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;
vertical-align:-1px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:12.5px;font-variant-numeric:tabular-nums}
th{text-align:left;color:#486581;font-weight:600;border-bottom:2px solid #d9e2ec;padding:6px 8px;
vertical-align:bottom;cursor:help}th small{display:block;color:#9fb3c8;font-weight:400}
td{padding:5px 8px;border-bottom:1px solid #eef1f4;white-space:nowrap}
td.num,th.num{text-align:right}tbody tr:nth-child(even){background:#fafbfc}
tfoot td{font-weight:650;border-top:2px solid #d9e2ec;border-bottom:0}
.neg{color:#c92a2a}.pos{color:#2b8a3e}footer{color:#829ab1;font-size:12px;margin-top:8px}
"""
_TITLES = {"tenant": "By tenant", "worker": "By worker", "gpu": "By GPU type", "day": "By UTC day",
           "operator": "By operator"}


def _legend(items: list[tuple[str, str]]) -> str:
    return ('<div class="legend">' + "".join(f'<span><i style="background:{c}"></i>{escape(n)}'
                                             "</span>" for n, c in items) + "</div>")


def _html_cells(columns: list[Column], row: dict, places: dict[str, int], tag: str = "td") -> str:
    cells = []
    for c in columns:
        value = row[c.name]
        classes = [] if c.unit in ("text", "day") else ["num"]
        if c.name == "margin_usd" and value is not None:
            classes.append("neg" if value < 0 else "pos")
        cls = f' class="{" ".join(classes)}"' if classes else ""
        cells.append(f"<{tag}{cls}>{escape(shown_cell(c, value, places.get(c.name)))}</{tag}>")
    return "".join(cells)


def _html_table(report: Report) -> str:
    columns = [c for c in report.columns if not is_map(c)]
    places = column_places(report)
    head = "".join(f'<th{" class=num" if c.unit not in ("text", "day") else ""} '
                   f'title="{escape(c.doc)}">{escape(c.name).replace("_", "_<wbr>")}'
                   f"<small>{escape(c.unit)}</small></th>"
                   for c in columns)
    body = "".join(f"<tr>{_html_cells(columns, row, places)}</tr>" for row in report.rows)
    if not report.rows:
        body = f'<tr><td colspan="{len(columns)}">no usage in this range</td></tr>'
    return (f'<section class="card"><h2>{_TITLES[report.by]}</h2>'
            f'<div class="sub">hover a column name for its definition; '
            f"{money_note(report, places)}</div><div class=\"scroll\">"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            f"<tfoot><tr>{_html_cells(columns, report.totals, places)}</tr></tfoot></table></div>"
            "</section>")


def _kpis(reports: dict[str, Report]) -> str:
    """Headline figures, (label, value, note), from the totals of the reports that carry them."""
    figures = []
    by = next((by for by in ("day", "tenant") if by in reports), None)
    if by is not None:
        totals, places = reports[by].totals, column_places(reports[by])

        def money(name: str) -> str:
            return "$" + shown_cell(Column(name, AMOUNT_UNIT, ""), totals[name], places[name])
        margin, charges = totals["margin_usd"], totals["charges_usd"]
        tokens = totals["prompt_tokens"] + totals["completion_tokens"]
        figures += [("Requests", f"{totals['requests']:,}", ""),
                    ("Tokens billed", _compact(tokens), ""),
                    ("Charges", money("charges_usd"), ""),
                    ("GPU cost", money("gpu_cost_usd"), ""),
                    ("Margin", money("margin_usd"),
                     f"{margin / charges:.0%}" if charges else "")]
    if "worker" in reports:
        totals = reports["worker"].totals
        utilisation = totals["utilisation"]
        figures.append(("Online hours", shown_cell(Column("", "h", ""), totals["online_hours"]),
                        "" if utilisation is None else f"{utilisation:.0%} busy"))
    return ('<div class="kpis">' + "".join(
        f'<div class="kpi"><div class="k">{escape(label)}</div><div class="v">{escape(value)}'
        + (f"<small>{escape(note)}</small>" if note else "") + "</div></div>"
        for label, value, note in figures) + "</div>")


def _charts(reports: dict[str, Report]) -> str:
    out = []
    if "day" in reports:
        svg, legend = tokens_chart(reports["day"])
        out.append('<section class="card"><h2>Tokens per day, by tenant</h2><div class="sub">'
                   "prompt + completion tokens billed, per UTC day</div>" + svg + _legend(legend)
                   + "</section>")
    halves = []
    colours = gpu_colours(*(reports[by] for by in ("gpu", "worker") if by in reports))
    if "gpu" in reports:
        halves.append('<section class="card"><h2>Cost per million tokens, by GPU type</h2>'
                      '<div class="sub">GPU cost / completion tokens served x 1e6, USD</div>'
                      + cost_chart(reports["gpu"], colours) + "</section>")
    if "worker" in reports:
        svg, legend = utilisation_chart(reports["worker"], colours)
        halves.append('<section class="card"><h2>Utilisation per worker</h2><div class="sub">'
                      "active time / online time, coloured by GPU type</div>" + svg
                      + _legend(legend) + "</section>")
    if halves:
        out.append(f'<div class="row">{"".join(halves)}</div>')
    return "".join(out)


def to_html(reports: dict[str, Report], extra: dict | None = None) -> str:
    """One page of the `reports` (by -> Report, all over the same range; tables in the dict's
    order), with the charts those of `gpu`, `day` and `worker` allow. `extra`: more facts for
    the header line, label -> text."""
    if not reports:
        raise ValueError("reports: expected at least one report")
    first = next(iter(reports.values()))
    facts = [f"generated {first.generated_at}"] + [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>sparkgrid cost report {first.since} to {first.until} (UTC)</title>"
            f"<style>{_CSS}</style></head><body><main><header><h1>sparkgrid cost report</h1>"
            f'<div class="range">UTC days <b>{first.since}</b> to <b>{first.until}</b>, both '
            f'included</div><div class="meta">{escape(" · ".join(facts))}</div></header>'
            + _kpis(reports) + _charts(reports)
            + "".join(_html_table(r) for r in reports.values())
            + f"<footer>Money in tables in USD to {escape(ROUNDING_RULE)}. "
              f"{escape(ROUNDING)}.</footer>"
            "</main></body></html>\n")
