"""Billing against a real, private Redis: a job left open by a dead scheduler is settled by
the next ones once, however many try, and is billed as its own scheduler would have billed it."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from scheduler.billing import Billing, JobEnd, orphan_end
from scheduler.jobs import JobState
from scheduler.ledger import Segment, utc_day
from scheduler.prices import PriceBook
from scheduler.quota import Admission
from scheduler.redis_store import RedisStore

pytestmark = pytest.mark.integration
NOW = time.time()
"""When the jobs are admitted (a job is booked on the UTC day it is settled: now, too)."""
PRICES = PriceBook.parse({"version": "b1", "default_plan": "std", "plans": {
    "std": {"prices": {"*": {"prompt_per_million": "0", "completion_per_million": "0"}}},
    "pro": {"tokens_per_day": 1000,
            "prices": {"*": {"prompt_per_million": "1", "completion_per_million": "3.5"}}}}})


@contextlib.asynccontextmanager
async def schedulers(url, prefix, n):
    """`n` schedulers' billing, each with its own connection, writers started."""
    stores = [RedisStore(url, prefix) for _ in range(n)]
    billers = [Billing(store, PRICES, retry_s=0.01) for store in stores]
    for biller in billers:
        biller.start()
    try:
        yield billers
    finally:
        for biller, store in zip(billers, stores):
            await biller.stop()
            await store.close()


async def booked(store, dimension, key):
    """What the ledger has for `key`, summed over the days since the jobs were admitted."""
    total = {}
    for _, amounts in await store.usage(dimension, key, utc_day(NOW), utc_day(time.time())):
        for name, amount in amounts.items():
            total[name] = total.get(name, 0) + amount
    return total


async def open_job(store, job_id, tenant="acme", delivered=5):
    """A job admitted (10 prompt tokens, 64 more reserved), running on w1, that has delivered
    `delivered` tokens by its scheduler's last progress note."""
    await store.create_job({"job_id": job_id, "tenant": tenant, "model": "m", "request_id": "",
                            "params": {}, "owner": "sched-dead", "created_at": NOW,
                            "prompt_tokens": 10, "plan": "pro"},
                           Admission(PRICES.plan("pro").limits, 10 + 64, NOW))
    await store.start_job(job_id, "w1", NOW + 1)
    await store.record_progress(job_id, delivered, NOW + 2)


def test_an_orphan_settled_twice_and_by_two_schedulers_at_once_is_billed_once(
        redis_server, redis_prefix):
    async def scenario():
        async with schedulers(redis_server.url, redis_prefix, 4) as (first, second, third, late):
            await open_job(first.store, "o")
            seen_open = await first.store.get_job("o")
            # two schedulers start at once after the job's one died, and both settle it ...
            settled = await asyncio.gather(first.settle_orphans("s1"),
                                           second.settle_orphans("s2"))
            # ... and a third had read it open before their writes landed
            third.settle(orphan_end(seen_open, "pro"))
            assert await third.flush(5)
            again = await late.settle_orphans("s4")  # a later start finds nothing open
            store = first.store
            return (settled, again, await store.get_job("o"), await store.job_events("o"),
                    await booked(store, "tenant", "acme"),
                    await booked(store, "worker", "unknown"),
                    await store.quota_use("acme", utc_day(NOW)), await store.open_jobs())

    settled, again, job, events, tenant, worker, quota, still_open = asyncio.run(scenario())
    assert ["o"] in settled and again == [] and still_open == []
    # 10 prompt tokens at $1/M and 5 at $3.5/M: 27.5 micro-dollars, rounded half-even once
    assert job["state"] == "failed" and job["charge_uusd"] == 28
    assert "sched-dead" in job["error"] and (job["plan"], job["price_version"]) == ("pro", "b1")
    assert job["workers"] == ["w1"] and "text" not in job and job["billed"] is True
    assert (job["prompt_tokens"], job["completion_tokens"]) == (10, 5)
    assert [e["event"] for e in events].count("failed") == 1
    assert tenant == {"jobs": 1, "prompt_tokens": 10, "completion_tokens": 5, "charge_uusd": 28}
    assert worker == {"jobs": 1, "prompt_tokens": 10, "segments": 1, "completion_tokens": 5,
                      "charge_uusd": 28}
    assert quota == {"used": 15, "reserved": 0}  # the reservation swapped for what was billed


def test_a_job_ended_by_its_scheduler_and_one_settled_as_an_orphan_are_billed_alike(
        redis_server, redis_prefix):
    async def scenario():
        async with schedulers(redis_server.url, redis_prefix, 2) as (own, next_one):
            await open_job(own.store, "x", tenant="acme")
            await open_job(own.store, "y", tenant="beta")
            # x: its scheduler ends it (it failed after w1 delivered 5 tokens), then retries
            # the write as if the reply had been lost
            x = JobEnd("x", "acme", "m", "pro", JobState.FAILED, 10,
                       (Segment("w1", "cpu", 10, 5),), error="w1 broke",
                       workers=("w1",), text="abcde", token_ids=(1, 2, 3, 4, 5))
            own.settle(x)
            own.settle(x)
            assert await own.flush(5)
            # y: its scheduler dies; the next one settles it
            assert await next_one.settle_orphans("s2") == ["y"]
            store = own.store
            return ([await booked(store, "tenant", t) for t in ("acme", "beta")],
                    await store.get_job("x"), await store.get_job("y"))

    (acme, beta), x, y = asyncio.run(scenario())
    assert acme == beta == {"jobs": 1, "prompt_tokens": 10, "completion_tokens": 5,
                            "charge_uusd": 28}
    billed = ("state", "prompt_tokens", "completion_tokens", "charge_uusd", "plan",
              "price_version")
    assert [x[k] for k in billed] == [y[k] for k in billed] == \
           ["failed", 10, 5, 28, "pro", "b1"]
    assert x["text"] == "abcde" and x["error"] == "w1 broke"
