"""GetUsage is bounded: without dates it covers the last 31 UTC days (not all time), a range
over 366 days is refused naming the field, and one call reads at most one ledger hash per day
of its range. The servicer's method against a real, private Redis (counted by Redis itself)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest
import redis

from protos import inference_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.errors import InvalidArgument
from scheduler.interceptors import TENANT
from scheduler.jobs import JobState
from scheduler.ledger import Bill, Segment, utc_day
from scheduler.redis_store import RedisStore
from scheduler.reports import USAGE_DEFAULT_DAYS, USAGE_MAX_DAYS, usage_window
from scheduler.server import InferenceServicer

pytestmark = pytest.mark.integration
DAY_S = 86400


def hgetall_calls(raw) -> int:
    return raw.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0)


def test_get_usage_defaults_to_a_month_refuses_over_a_year_and_reads_one_hash_a_day(
        redis_server, redis_prefix):
    raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
    now = time.time()

    async def scenario():
        store = RedisStore(redis_server.url, redis_prefix)
        try:
            for i, age_days in enumerate((0, 20, 45, 400)):  # jobs billed 0 .. 400 days ago
                await store.create_job({"job_id": f"j{i}", "tenant": "acme", "model": "m",
                                        "request_id": "", "params": {}, "owner": "s",
                                        "created_at": now})
                at = now - age_days * DAY_S
                await store.finish_job(f"j{i}", JobState.FAILED, {}, Bill(
                    f"j{i}", "acme", "m", at, 10, 1, (Segment("w", "g", 10, 1),)))
            servicer = InferenceServicer(SchedulerConfig(), None, None, store)
            TENANT.set("acme")
            before = hgetall_calls(raw)
            default = await servicer.GetUsage(pb.GetUsageRequest(), None)
            reads_default = hgetall_calls(raw) - before
            today = dt.date.fromisoformat(utc_day(now))
            year_ago = (today - dt.timedelta(days=USAGE_MAX_DAYS - 1)).isoformat()
            before = hgetall_calls(raw)
            year = await servicer.GetUsage(pb.GetUsageRequest(since=year_ago), None)
            reads_year = hgetall_calls(raw) - before
            too_long = (today - dt.timedelta(days=USAGE_MAX_DAYS)).isoformat()
            with pytest.raises(InvalidArgument) as refused:
                await servicer.GetUsage(pb.GetUsageRequest(since=too_long), None)
            return default, reads_default, year, reads_year, refused.value
        finally:
            await store.close()

    default, reads_default, year, reads_year, refused = asyncio.run(scenario())
    assert default.jobs == 2 and len(default.days) == 2  # today and 20 days ago, not 45 or 400
    assert default.days[0].day == utc_day(now - 20 * DAY_S)
    assert year.jobs == 3  # 400 days ago is outside any allowed range
    assert reads_default == USAGE_DEFAULT_DAYS and reads_year == USAGE_MAX_DAYS
    assert refused.field == "since" and f"at most {USAGE_MAX_DAYS}" in str(refused)


@pytest.mark.parametrize("since, until, field", [
    ("2026-13-01", "", "since"), ("", "2026-02-30", "until"), ("2026-03-02", "2026-03-01", "since"),
    ("2024-01-01", "2026-01-01", "since")])
def test_a_bad_usage_range_names_its_field(since, until, field):
    with pytest.raises(InvalidArgument) as err:
        usage_window(since, until, "2026-06-01")
    assert err.value.field == field


def test_the_usage_window_defaults():
    assert usage_window("", "", "2026-03-31") == ("2026-03-01", "2026-03-31")
    assert usage_window("", "2026-01-31", "2026-03-31") == ("2026-01-01", "2026-01-31")
    assert usage_window("2026-03-30", "", "2026-03-31") == ("2026-03-30", "2026-03-31")
