"""The command line's shared pieces: one argparse style for every `sparkgrid` subcommand.

A subcommand module has a table `COMMANDS = {name: (add_options, run)}`; `add_options(p)`
declares its options with the helpers here, `run(args)` does the work. A user's mistake
raises `UsageError` (or ValueError) whose message names the option; `sparkgrid.cli.main`
prints `error: <message>` and exits 2, never a traceback.

Knows: argparse, option values, where the Redis URL comes from. Does not know: what any
command does.
"""

from __future__ import annotations

import argparse
import math
import os

from sparkgrid.home import read_up_file

REDIS_URL_ENV = "SPARKGRID_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_REDIS_PREFIX = "sparkgrid"


class UsageError(Exception):
    """A mistake of the user's that the message tells them how to fix."""


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def int_at_least(low: int):
    """An option type: an integer >= `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def port_or_off(text: str) -> int | None:
    """An option type: a TCP port (0: any free one), or -1 for off (None)."""
    try:
        value = int(text)
    except ValueError:
        value = -2
    if value == -1:
        return None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535] or -1 (off), got {text!r}")
    return value


def port(text: str) -> int:
    """An option type: a TCP port (0: any free one)."""
    value = port_or_off(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {text!r}")
    return value


def number_in(low: float, high: float, *, open_low: bool = False, open_high: bool = False):
    """An option type: a finite number in the interval (ends open or closed)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = (low < value if open_low else low <= value) and (
            value < high if open_high else value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(
                f"expected a number in {'(' if open_low else '['}{low}, {high}"
                f"{')' if open_high else ']'}, got {text!r}")
        return value
    return parse


def add_redis_options(p: argparse.ArgumentParser, what: str = "jobs, keys and the ledger",
                      *, with_prefix: bool = True) -> None:
    """`--redis-url` and `--redis-prefix`, the same on every command that reads Redis."""
    p.add_argument("--redis-url", default=None, metavar="URL",
                   help=f"the Redis of {what} (default: ${REDIS_URL_ENV}, else the one of a "
                        f"running `sparkgrid up`, else {DEFAULT_REDIS_URL})")
    if with_prefix:
        p.add_argument("--redis-prefix", default=DEFAULT_REDIS_PREFIX, metavar="PREFIX",
                       help=f"prefix of every Redis key (default {DEFAULT_REDIS_PREFIX})")


def redis_url(given: str | None) -> str:
    """The Redis to use: `--redis-url`, else $SPARKGRID_REDIS_URL, else up.json's, else the
    local default."""
    return (given or os.environ.get(REDIS_URL_ENV) or read_up_file().get("redis_url")
            or DEFAULT_REDIS_URL)
