"""`sparkgrid report`: cost reports from the usage ledger, as a table, CSV, JSON or HTML.

`COMMANDS` holds the pair (add options, run) for `sparkgrid.cli`. The
range is UTC days `--since`..`--until`, both included (default: the 30 days up to today, UTC).
`--format html` builds the reports by tenant, worker, GPU type, day and operator into one
page, the one of `--by` first. A user error (a bad day, Redis unreachable) raises ValueError
naming the option; the table's `main` prints it and exits 2.

Knows: options and where output goes. Does not know: the arithmetic (`reports.py`) or the
formats (`report_formats.py`, `report_html.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from scheduler.errors import InvalidArgument, SchedulerError
from scheduler.ledger import days_between
from scheduler.reports import BY
from sparkgrid.options import add_redis_options, redis_url

FORMATS = ("table", "csv", "json", "html")
DEFAULT_DAYS = 30


def report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", default=None,
                   help=f"first UTC day, YYYY-MM-DD "
                        f"(default: {DEFAULT_DAYS - 1} days before --until)")
    p.add_argument("--until", default=None, help="last UTC day, included (default: today, UTC)")
    p.add_argument("--by", default="tenant", choices=BY, help="one row per (default: tenant)")
    p.add_argument("--format", default="table", choices=FORMATS,
                   help="html: one page of every report with charts (default: table)")
    p.add_argument("--out", default=None, help="write to this file (default: stdout)")
    add_redis_options(p, "the usage ledger")


def day_range(since: str | None, until: str | None, today: date) -> tuple[str, str]:
    """(since, until) with the defaults filled in and both checked; ValueError naming the option."""
    until = until if until is not None else today.isoformat()
    if since is None:
        since = (_day("until", until) - timedelta(days=DEFAULT_DAYS - 1)).isoformat()
    try:
        days_between(since, until)
    except InvalidArgument as err:
        raise ValueError(f"--{err}") from None
    return since, until


def _day(option: str, text: str) -> date:
    try:
        days_between(text, text)
    except InvalidArgument as err:
        raise ValueError(f"--{option}: {str(err).partition(': ')[2]}") from None
    return date.fromisoformat(text)


def run_report(args) -> int:
    since, until = day_range(args.since, args.until, datetime.now(timezone.utc).date())
    text = asyncio.run(_render(args, since, until))
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote the {args.format} report to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


async def _render(args, since: str, until: str) -> str:
    from scheduler import report_formats, report_html
    from scheduler.redis_store import RedisStore
    from scheduler.reports import build_reports

    store = RedisStore(redis_url(args.redis_url), prefix=args.redis_prefix)
    try:
        if args.format == "html":
            order = [args.by] + [by for by in BY if by != args.by]
            reports = await build_reports(store, since, until, order)
            return report_html.to_html(reports, {"Redis key prefix": args.redis_prefix})
        report = (await build_reports(store, since, until, (args.by,)))[args.by]
    except SchedulerError as err:
        raise ValueError(str(err)) from None
    finally:
        await store.close()
    return getattr(report_formats, f"to_{args.format}")(report)


COMMANDS = {  # name: (add options, run); the help is sparkgrid.cli's
    "report": (report_options, run_report),
}
