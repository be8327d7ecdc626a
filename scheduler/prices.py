"""The price book: what tenants pay, per plan and model, and each plan's quotas.

A price book is a versioned TOML file that the head node loads at start (`--prices FILE`;
`scheduler/prices.toml` ships as the default). A file, not Redis records, because prices are
a business decision that deserves review: it lives in version control, a change is a diff with
an author, and its `version` is written into every job's record, so any charge can be traced
to the book that made it. Which plan a tenant is on is operational and changes at run time, so
that lives in Redis (`sparkgrid keys create --tenant T --plan P`).

    version = "2026-11-28"
    default_plan = "standard"

    [plans.standard]
    tokens_per_day = 2_000_000      # prompt + completion tokens; 0 = unlimited
    tokens_per_month = 40_000_000
    requests_per_minute = 600
    max_concurrent_jobs = 32        # open (queued or running) jobs at once, all schedulers

    [plans.standard.prices."*"]     # "*": any model without its own entry
    prompt_per_million = "0.10"     # USD, a decimal string (never a float)
    completion_per_million = "0.40"

Money is exact: prices are read as decimals and kept as integer micro-dollars per million
tokens (a finer price is refused). What a job is charged at these prices is `billing.py`'s.

Knows: TOML, decimals. Does not know: what a job is charged (`billing.py`), Redis, gRPC, jobs.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from scheduler.quota import Limits

DEFAULT_BOOK = Path(__file__).with_name("prices.toml")
ANY_MODEL = "*"


@dataclass(frozen=True)
class ModelPrice:
    prompt_uusd_per_million: int
    completion_uusd_per_million: int


@dataclass(frozen=True)
class Plan:
    name: str
    prices: dict[str, ModelPrice]
    limits: Limits

    def price(self, model: str) -> ModelPrice:
        return self.prices.get(model) or self.prices[ANY_MODEL]


@dataclass(frozen=True)
class PriceBook:
    version: str
    default_plan: str
    plans: dict[str, Plan]

    def plan(self, name: str | None) -> Plan:
        """The named plan; the default one for a tenant with none (or an unknown one)."""
        return self.plans.get(name or "") or self.plans[self.default_plan]

    @classmethod
    def load(cls, path: str | Path = DEFAULT_BOOK) -> PriceBook:
        """Read and check a price book; ValueError names the file and the bad entry."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"prices: cannot read {path}: {err}") from None
        try:
            return cls.parse(data)
        except ValueError as err:
            raise ValueError(f"prices ({path}): {err}") from None

    @classmethod
    def parse(cls, data: dict) -> PriceBook:
        version = data.get("version")
        if not isinstance(version, str) or not version:
            raise ValueError("version: expected a non-empty string")
        plans_data = data.get("plans")
        if not isinstance(plans_data, dict) or not plans_data:
            raise ValueError("plans: expected at least one [plans.NAME] table")
        plans = {name: _plan(name, body) for name, body in plans_data.items()}
        default = data.get("default_plan")
        if default not in plans:
            raise ValueError(f"default_plan: expected one of {sorted(plans)}, got {default!r}")
        return cls(version, default, plans)


def _plan(name: str, body) -> Plan:
    where = f"plans.{name}"
    if not isinstance(body, dict):
        raise ValueError(f"{where}: expected a table")
    limits = {}
    for field in ("tokens_per_day", "tokens_per_month", "requests_per_minute",
                  "max_concurrent_jobs"):
        value = body.get(field, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{where}.{field}: expected an integer >= 0 (0: unlimited), "
                             f"got {value!r}")
        limits[field] = value
    prices = body.get("prices")
    if not isinstance(prices, dict) or ANY_MODEL not in prices:
        raise ValueError(f'{where}.prices: expected a table with at least the "{ANY_MODEL}" entry')
    return Plan(name, {model: _price(f"{where}.prices.{model}", p) for model, p in prices.items()},
                Limits(**limits))


def _price(where: str, body) -> ModelPrice:
    if not isinstance(body, dict):
        raise ValueError(f"{where}: expected a table")
    return ModelPrice(*(_uusd(f"{where}.{field}", body.get(field))
                        for field in ("prompt_per_million", "completion_per_million")))


def _uusd(where: str, text) -> int:
    """A USD price given as a decimal string, in whole micro-dollars (finer is refused)."""
    if not isinstance(text, str):
        raise ValueError(f'{where}: expected a decimal string such as "0.40" (not a float), '
                         f'got {text!r}')
    try:
        usd = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{where}: {text!r} is not a decimal number") from None
    uusd = usd * 1_000_000
    if not usd.is_finite() or usd < 0 or uusd != uusd.to_integral_value():
        raise ValueError(f"{where}: expected a price >= 0 in whole micro-dollars, got {text!r}")
    return int(uusd)
