"""Billing arithmetic: what a bill adds to each dimension, and that the dimensions agree."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import datetime, timezone

import pytest

from scheduler.errors import InvalidArgument
from scheduler.ledger import (
    DIMENSIONS,
    JOB_FIELDS,
    MAX_DAYS,
    NO_WORKER,
    WORKER_FIELDS,
    Bill,
    Segment,
    days_between,
    increments,
    utc_day,
)

NOON = datetime(2025, 3, 14, 12, tzinfo=timezone.utc).timestamp()


def test_utc_day_is_the_utc_calendar_day():
    assert utc_day(NOON) == "2025-03-14"
    midnight = datetime(2025, 3, 15, tzinfo=timezone.utc).timestamp()
    assert utc_day(midnight - 0.001) == "2025-03-14"
    assert utc_day(midnight) == "2025-03-15"


def test_single_segment_job():
    seg = Segment("w1", "H200", prompt_tokens=10, completion_tokens=5, draft_tokens=8,
                  verified_tokens=8, accepted_tokens=4, busy_ms=120)
    bill = Bill("j1", "acme", "qwen", NOON, prompt_tokens=10, completion_tokens=5, segments=(seg,))
    job = {"jobs": 1, "prompt_tokens": 10, "completion_tokens": 5, "draft_tokens": 8,
           "verified_tokens": 8, "accepted_tokens": 4}
    worker = {**job, "segments": 1, "processed_prompt_tokens": 10, "busy_ms": 120}
    assert increments(bill) == {
        ("tenant", "acme", "2025-03-14"): job,
        ("model", "qwen", "2025-03-14"): job,
        ("all", "all", "2025-03-14"): job,
        ("worker", "w1", "2025-03-14"): worker,
        ("gpu", "H200", "2025-03-14"): worker,
    }


def test_failover_job_over_two_workers_and_two_gpu_types():
    # w1 (H200) delivers 4 tokens and dies; w2 (L4) gets prompt+4 and delivers 3, then dies;
    # w1 again (after a restart) gets prompt+7 and delivers the last 2.
    segments = (Segment("w1", "H200", 10, 4, draft_tokens=6, accepted_tokens=3, busy_ms=50),
                Segment("w2", "L4", 14, 3, draft_tokens=2, verified_tokens=2, accepted_tokens=1,
                        busy_ms=70),
                Segment("w1", "H200", 17, 2, busy_ms=30))
    bill = Bill("j2", "acme", "qwen", NOON, prompt_tokens=10, completion_tokens=9,
                segments=segments)
    got = increments(bill)
    day = "2025-03-14"
    job = {"jobs": 1, "prompt_tokens": 10, "completion_tokens": 9, "draft_tokens": 8,
           "verified_tokens": 2, "accepted_tokens": 4}
    assert (got[("tenant", "acme", day)] == got[("model", "qwen", day)]
            == got[("all", "all", day)] == job)
    w1 = {"jobs": 1, "prompt_tokens": 10, "segments": 2, "completion_tokens": 6,
          "processed_prompt_tokens": 27, "draft_tokens": 6, "accepted_tokens": 3, "busy_ms": 80}
    w2 = {"segments": 1, "completion_tokens": 3, "processed_prompt_tokens": 14, "draft_tokens": 2,
          "verified_tokens": 2, "accepted_tokens": 1, "busy_ms": 70}
    assert got[("worker", "w1", day)] == got[("gpu", "H200", day)] == w1
    assert got[("worker", "w2", day)] == got[("gpu", "L4", day)] == w2
    assert len(got) == 7


def test_first_segment_worker_gets_the_job_even_when_a_gpu_type_is_shared():
    segments = (Segment("w2", "L4", 5, 1), Segment("w1", "H200", 6, 1), Segment("w3", "L4", 7, 1))
    got = increments(Bill("j", "t", "m", NOON, 5, 3, segments))
    assert got[("worker", "w2", "2025-03-14")]["jobs"] == 1
    assert "jobs" not in got[("worker", "w1", "2025-03-14")]
    assert got[("gpu", "L4", "2025-03-14")] == {"jobs": 1, "prompt_tokens": 5, "segments": 2,
                                                "completion_tokens": 2,
                                                "processed_prompt_tokens": 12}
    assert got[("gpu", "H200", "2025-03-14")] == {"segments": 1, "completion_tokens": 1,
                                                  "processed_prompt_tokens": 6}


def test_bill_without_segments_is_booked_under_no_worker():
    got = increments(Bill("j", "t", "m", NOON, prompt_tokens=7, completion_tokens=0))
    assert got[("worker", NO_WORKER, "2025-03-14")] == {"jobs": 1, "prompt_tokens": 7}
    assert got[("gpu", NO_WORKER, "2025-03-14")] == {"jobs": 1, "prompt_tokens": 7}
    assert got[("all", "all", "2025-03-14")] == {"jobs": 1, "prompt_tokens": 7}


def test_zero_fields_are_left_out():
    got = increments(Bill("j", "t", "m", NOON, 3, 0, (Segment("w", "g", 3, 0),)))
    assert got[("tenant", "t", "2025-03-14")] == {"jobs": 1, "prompt_tokens": 3}
    assert got[("worker", "w", "2025-03-14")] == {"jobs": 1, "prompt_tokens": 3, "segments": 1,
                                                  "processed_prompt_tokens": 3}


@pytest.mark.parametrize("completion, segments", [
    (5, (Segment("w", "g", 1, 4),)),
    (3, (Segment("w", "g", 1, 2), Segment("v", "g", 3, 2))),
    (1, ()),
])
def test_completion_tokens_that_do_not_add_up_raise(completion, segments):
    bill = Bill("jx", "t", "m", NOON, 1, completion, segments)
    with pytest.raises(ValueError, match="bill of job jx: its segments delivered"):
        increments(bill)


@pytest.mark.parametrize("make, field", [
    (lambda: Segment("w", "g", -1, 0), "prompt_tokens"),
    (lambda: Segment("w", "g", 1, 2.0), "completion_tokens"),
    (lambda: Segment("w", "g", 1, 2, busy_ms=True), "busy_ms"),
    (lambda: Segment("w", "g", 1, 2, accepted_tokens=-3), "accepted_tokens"),
    (lambda: Segment("", "g", 1, 2), "worker"),
    (lambda: Segment("w", None, 1, 2), "gpu_type"),
    (lambda: Bill("j", "t", "m", NOON, -1, 0), "prompt_tokens"),
    (lambda: Bill("j", "t", "m", NOON, 1, "2"), "completion_tokens"),
    (lambda: Bill("j", "", "m", NOON, 1, 0), "tenant"),
    (lambda: Bill("j", "t", "m", float("nan"), 1, 0), "finished_at"),
    (lambda: Bill("j", "t", "m", NOON, 1, 0, [Segment("w", "g", 1, 0)]), "segments"),
])
def test_bad_counts_and_names_are_refused_naming_the_field(make, field):
    with pytest.raises(ValueError, match=rf": {field} must be"):
        make()


def test_days_between_is_inclusive_and_crosses_months_and_leap_days():
    assert days_between("2024-02-28", "2024-03-01") == ["2024-02-28", "2024-02-29", "2024-03-01"]
    assert days_between("2025-12-31", "2025-12-31") == ["2025-12-31"]
    assert len(days_between("2020-01-01", "2029-12-31")) == 3653


@pytest.mark.parametrize("since, until, field", [
    ("2025-1-01", "2025-01-02", "since"), ("2025-01-01", "20250102", "until"),
    ("2025-02-30", "2025-03-01", "since"), ("2025-01-01", "2025-13-01", "until"),
    ("2025-01-02", "2025-01-01", "since"), (None, "2025-01-01", "since"),
    ("2000-01-01", "2010-12-31", "until"),
])
def test_days_between_errors_name_the_field(since, until, field):
    with pytest.raises(InvalidArgument) as info:
        days_between(since, until)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_days_between_allows_exactly_max_days():
    days = days_between("2000-01-01", "2010-01-06")
    assert len(days) <= MAX_DAYS
    last = datetime.fromisoformat(days[0]).toordinal() + MAX_DAYS - 1
    until = datetime.fromordinal(last).date().isoformat()
    assert len(days_between("2000-01-01", until)) == MAX_DAYS


def _random_bill(rng: random.Random, n: int) -> Bill:
    workers = {"w1": "H200", "w2": "H200", "w3": "L4", "w4": "A100", "w5": "L4"}
    num_segments = rng.randint(0, 3)
    prompt = rng.randint(0, 300)
    segments, delivered = [], 0
    for _ in range(num_segments):
        worker = rng.choice(sorted(workers))
        done = rng.randint(0, 50)
        draft = rng.randint(0, 80)
        verified = rng.randint(0, draft)
        segments.append(Segment(worker, workers[worker], prompt + delivered, done, draft, verified,
                                rng.randint(0, verified), rng.randint(0, 9000),
                                spec_steps=rng.randint(0, 30)))
        delivered += done
    day = rng.choice([NOON - 86400, NOON, NOON + 86400 * 40]) + rng.uniform(-80000, 80000)
    return Bill(f"j{n}", rng.choice(["acme", "beta", "c.co"]), rng.choice(["qwen", "llama"]), day,
                prompt, delivered, tuple(segments),
                charge_uusd=rng.choice([0, 1, 7, rng.randint(0, 10**7)]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_dimension_partitions_the_all_totals_exactly(seed):
    rng = random.Random(seed)
    bills = [_random_bill(rng, n) for n in range(500)]
    totals = {dim: defaultdict(int) for dim in DIMENSIONS}  # dim -> (day, field) -> sum over keys
    for bill in bills:
        for (dim, _, day), amounts in increments(bill).items():
            assert set(amounts) <= set(WORKER_FIELDS if dim in ("worker", "gpu") else JOB_FIELDS)
            for field, amount in amounts.items():
                assert amount > 0
                totals[dim][(day, field)] += amount
    grand = totals["all"]
    assert sum(n for (_, field), n in grand.items() if field == "jobs") == 500
    assert len({day for day, _ in grand}) >= 4
    # Independently of the ledger: the all totals equal the bills' own sums per day.
    expected = defaultdict(int)
    for bill in bills:
        day = utc_day(bill.finished_at)
        expected[(day, "jobs")] += 1
        expected[(day, "prompt_tokens")] += bill.prompt_tokens
        expected[(day, "completion_tokens")] += bill.completion_tokens
        expected[(day, "charge_uusd")] += bill.charge_uusd
        for seg in bill.segments:
            for field in ("draft_tokens", "verified_tokens", "accepted_tokens", "spec_steps"):
                expected[(day, field)] += getattr(seg, field)
    assert {k: v for k, v in expected.items() if v} == dict(grand)
    for dim in DIMENSIONS:
        assert {k: v for k, v in totals[dim].items() if k[1] in JOB_FIELDS} == dict(grand), dim
    assert totals["worker"] == totals["gpu"]
    assert sum(v for (_, f), v in totals["worker"].items() if f == "segments") == \
        sum(len(b.segments) for b in bills)


def test_a_jobs_charge_is_split_over_its_workers_by_delivered_tokens_in_whole_micro_dollars():
    segs = (Segment("w1", "A", 5, 1), Segment("w2", "B", 6, 1), Segment("w3", "A", 7, 1))
    inc = increments(Bill("j", "acme", "m", NOON, 5, 3, segs, charge_uusd=10))
    day = utc_day(NOON)
    assert [inc[("worker", w, day)]["charge_uusd"] for w in ("w1", "w2", "w3")] == [4, 3, 3]
    assert (inc[("gpu", "A", day)]["charge_uusd"] == 7
            and inc[("tenant", "acme", day)]["charge_uusd"] == 10)
    nothing_delivered = increments(Bill("k", "acme", "m", NOON, 5, 0,
                                        (Segment("w1", "A", 5, 0), Segment("w2", "B", 5, 0)),
                                        charge_uusd=9))
    assert nothing_delivered[("worker", "w1", day)]["charge_uusd"] == 9
    assert "charge_uusd" not in nothing_delivered[("worker", "w2", day)]
