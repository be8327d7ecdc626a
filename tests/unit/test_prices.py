"""The price book and quota arithmetic: exact prices, errors naming the entry (what a job is
charged at them: test_billing.py)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from scheduler.billing import charge_uusd
from scheduler.prices import DEFAULT_BOOK, PriceBook
from scheduler.quota import Admission, Limits, refusal


def book(**plan_changes):
    plan = {"tokens_per_day": 10, "prices": {"*": {"prompt_per_million": "0.10",
                                                   "completion_per_million": "0.40"},
                                             "org/big": {"prompt_per_million": "2.5",
                                                         "completion_per_million": "10"}}}
    plan.update(plan_changes)
    return PriceBook.parse({"version": "v1", "default_plan": "std", "plans": {"std": plan}})


def test_the_shipped_price_book_loads_and_its_default_plan_exists():
    shipped = PriceBook.load(DEFAULT_BOOK)
    assert shipped.default_plan in shipped.plans and shipped.version
    assert shipped.plan("no-such-plan") is shipped.plans[shipped.default_plan]
    assert charge_uusd(shipped.plan("internal"), "m", 10**6, 10**6) == 0


def test_a_model_without_its_own_price_has_the_plan_s_any_model_price():
    std = book().plan("std")
    assert std.price("org/big").completion_uusd_per_million == 10_000_000
    assert (std.price("any") == std.price("*")
            and std.price("any").prompt_uusd_per_million == 100_000)


@pytest.mark.parametrize("change, where", [
    ({"prices": {"*": {"prompt_per_million": 0.1, "completion_per_million": "1"}}},
     "plans.std.prices.*.prompt_per_million"),
    ({"prices": {"*": {"prompt_per_million": "abc", "completion_per_million": "1"}}},
     "plans.std.prices.*.prompt_per_million"),
    ({"prices": {"*": {"prompt_per_million": "-1", "completion_per_million": "1"}}},
     "plans.std.prices.*.prompt_per_million"),
    ({"prices": {"*": {"prompt_per_million": "0.0000001", "completion_per_million": "1"}}},
     "plans.std.prices.*.prompt_per_million"),
    ({"prices": {"org/x": {"prompt_per_million": "1", "completion_per_million": "1"}}},
     "plans.std.prices"),
    ({"tokens_per_day": -1}, "plans.std.tokens_per_day"),
    ({"requests_per_minute": 1.5}, "plans.std.requests_per_minute"),
])
def test_a_bad_price_book_names_the_entry(change, where):
    with pytest.raises(ValueError, match=f"^{where.replace('*', '[*]')}: "):
        book(**change)


def test_a_price_book_file_error_names_the_file(tmp_path):
    bad = tmp_path / "prices.toml"
    bad.write_text('version = "x"\ndefault_plan = "nope"\n[plans.a.prices."*"]\n'
                   'prompt_per_million = "1"\ncompletion_per_million = "1"\n')
    with pytest.raises(ValueError, match="prices.toml.*default_plan"):
        PriceBook.load(bad)
    bad.write_text("not toml [")
    with pytest.raises(ValueError, match="cannot read"):
        PriceBook.load(bad)


def test_retry_hints_point_at_the_next_utc_day_and_month():
    at = datetime(2026, 12, 31, 23, 59, 30, tzinfo=timezone.utc).timestamp()
    adm = Admission(Limits(tokens_per_day=5, tokens_per_month=9), 7, at)
    assert (adm.day, adm.month) == ("2026-12-31", "2026-12")
    assert adm.seconds_to_next_day() == adm.seconds_to_next_month() == 30
    text = refusal("acme", "tokens_per_day", adm, 30)
    assert "tokens_per_day of 5" in text and "2026-12-31" in text and "reserves 7" in text
    assert Limits().unlimited and not Limits(requests_per_minute=1).unlimited


def test_max_concurrent_jobs_is_read_checked_and_shipped():
    assert book(max_concurrent_jobs=4).plan("std").limits.max_concurrent_jobs == 4
    assert book().plan("std").limits.max_concurrent_jobs == 0  # absent: unlimited
    with pytest.raises(ValueError, match=r"plans\.std\.max_concurrent_jobs: expected an integer"):
        book(max_concurrent_jobs=-1)
    shipped = PriceBook.load(DEFAULT_BOOK)
    caps = {name: plan.limits.max_concurrent_jobs for name, plan in shipped.plans.items()}
    assert caps == {"standard": 32, "pro": 256, "internal": 0}
    assert not Limits(max_concurrent_jobs=1).unlimited


def test_a_concurrency_refusal_names_the_limit_and_the_retry():
    message = refusal("acme", "max_concurrent_jobs",
                      Admission(Limits(max_concurrent_jobs=32), 100, 0.0), 1.0)
    assert message == ("quota: tenant acme would pass its plan's max_concurrent_jobs of 32 jobs "
                       "open (queued or running) at once; retry in 1 s")
