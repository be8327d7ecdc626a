"""Quotas and rate limits enforced in the real Redis: the check and the reservation are one
step, so a concurrent burst cannot overspend a budget; a job's end swaps its reservation for
the tokens billed, once."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest

from scheduler.errors import ResourceExhausted
from scheduler.jobs import JobState
from scheduler.ledger import Bill, Segment
from scheduler.quota import Admission, Limits
from scheduler.redis_store import RedisStore

pytestmark = pytest.mark.integration
NOW = datetime(2026, 11, 30, 23, 0, tzinfo=timezone.utc).timestamp()  # an hour to next month


def fields(job_id, tenant="acme"):
    return {"job_id": job_id, "tenant": tenant, "model": "m", "request_id": "", "params": {},
            "owner": "s", "created_at": NOW}


async def admit(store, job_id, limits, reserve, tenant="acme"):
    try:
        return (await store.create_job(fields(job_id, tenant), Admission(limits, reserve, NOW)))[1]
    except ResourceExhausted as err:
        return err


def test_a_concurrent_burst_cannot_overspend_the_daily_budget(redis_server, redis_prefix):
    limits = Limits(tokens_per_day=1000)

    async def burst():
        stores = [RedisStore(redis_server.url, redis_prefix) for _ in range(4)]
        try:
            results = await asyncio.gather(*(admit(stores[i % 4], f"j{i}", limits, 64)
                                             for i in range(40)))
            return results, await stores[0].quota_use("acme", "2026-11-30")
        finally:
            for s in stores:
                await s.close()

    results, use = asyncio.run(burst())
    admitted = [r for r in results if r is True]
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert len(admitted) == 1000 // 64 and len(admitted) + len(refused) == 40
    assert use == {"used": 0, "reserved": 64 * len(admitted)} and use["reserved"] <= 1000
    err = refused[0]
    assert "tokens_per_day" in str(err) and "acme" in str(err)
    assert err.retry_after_s == pytest.approx(3600, abs=1)  # the next UTC day starts in an hour


def test_the_end_of_a_job_swaps_its_reservation_for_what_was_billed_once(redis_server,
                                                                         redis_prefix):
    limits = Limits(tokens_per_day=500, tokens_per_month=10_000)

    async def scenario():
        store = RedisStore(redis_server.url, redis_prefix)
        try:
            assert await admit(store, "a", limits, 300) is True
            assert isinstance(await admit(store, "b", limits, 300), ResourceExhausted)
            bill = Bill("a", "acme", "m", NOW + 5, 20, 30, (Segment("w", "g", 20, 30),))
            await store.start_job("a", "w", NOW + 1)
            assert await store.finish_job("a", JobState.FINISHED, {}, bill) is True
            assert await store.finish_job("a", JobState.FINISHED, {}, bill) is False  # a retry
            day = await store.quota_use("acme", "2026-11-30")
            month = await store.quota_use("acme", "2026-11")
            assert await admit(store, "b", limits, 300) is True  # room again: 50 used + 300
            return day, month
        finally:
            await store.close()

    day, month = asyncio.run(scenario())
    assert day == {"used": 50, "reserved": 0} and month == {"used": 50, "reserved": 0}


def test_the_request_rate_is_limited_per_rolling_minute_and_per_tenant(redis_server, redis_prefix):
    limits = Limits(requests_per_minute=3)

    async def scenario():
        store = RedisStore(redis_server.url, redis_prefix)
        try:
            mine = [await admit(store, f"r{i}", limits, 1) for i in range(4)]
            other = await admit(store, "x0", limits, 1, tenant="globex")
            return mine, other
        finally:
            await store.close()

    mine, other = asyncio.run(scenario())
    assert mine[:3] == [True, True, True] and isinstance(mine[3], ResourceExhausted)
    assert "requests_per_minute" in str(mine[3]) and 0 < mine[3].retry_after_s <= 60
    assert other is True


def test_a_request_larger_than_the_whole_budget_is_refused_with_its_size_named(redis_server,
                                                                               redis_prefix):
    async def scenario():
        store = RedisStore(redis_server.url, redis_prefix)
        try:
            return await admit(store, "big", Limits(tokens_per_month=100), 101)
        finally:
            await store.close()

    err = asyncio.run(scenario())
    assert isinstance(err, ResourceExhausted) and "reserves 101" in str(err)
    assert "tokens_per_month" in str(err)
