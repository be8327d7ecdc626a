"""Schedulers' leases, retention, per-tenant concurrency caps and the bounded GetUsage, in a
real, private Redis (no Ray): an open job is settled as an orphan only once its owner's
lease is gone, a job's own bill refused after that is logged as an anomaly, what a final job
leaves expires (its text first) while the ledger stays, and a tenant's open jobs are capped
across schedulers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest
import redis

from scheduler.billing import Billing, JobEnd
from scheduler.errors import InvalidArgument, ResourceExhausted
from scheduler.jobs import JobState
from scheduler.ledger import Bill, Segment, utc_day
from scheduler.prices import PriceBook
from scheduler.quota import Admission, Limits
from scheduler.redis_store import RedisStore

pytestmark = pytest.mark.integration
PRICES = PriceBook.parse({"version": "r1", "default_plan": "std", "plans": {
    "std": {"prices": {"*": {"prompt_per_million": "1", "completion_per_million": "2"}}}}})


@contextlib.asynccontextmanager
async def opened(url, prefix, n=1, **kwargs):
    stores = [RedisStore(url, prefix, **kwargs) for _ in range(n)]
    try:
        yield stores if n > 1 else stores[0]
    finally:
        for store in stores:
            await store.close()


def job(job_id, owner="sched-a", tenant="acme", request_id=""):
    return {"job_id": job_id, "tenant": tenant, "model": "m", "request_id": request_id,
            "params": {}, "owner": owner, "created_at": time.time(), "prompt_tokens": 10,
            "plan": "std"}


async def finish(store, job_id, text="héllo", tenant="acme"):
    bill = Bill(job_id, tenant, "m", time.time(), 10, 3, (Segment("w1", "cpu", 10, 3),))
    await store.start_job(job_id, "w1", time.time())
    return await store.finish_job(job_id, JobState.FINISHED, {
        "finish_reason": "stop", "text": text, "token_ids": [1, 2, 3]}, bill)


def test_a_lease_is_renewed_released_and_lapses_by_itself(redis_server, redis_prefix):
    async def scenario():
        async with opened(redis_server.url, redis_prefix) as store:
            first = await store.renew_lease("s1", 5)
            again = await store.renew_lease("s1", 0.3)
            live = await store.live_owners(["s1", "s2", "s1"])
            await asyncio.sleep(0.6)
            lapsed = await store.live_owners(["s1"])
            retaken = await store.renew_lease("s1", 5)
            await store.release_lease("s1")
            return first, again, live, lapsed, retaken, await store.live_owners(["s1"])

    first, again, live, lapsed, retaken, released = asyncio.run(scenario())
    assert (first, again, retaken) == (False, True, False)  # False: it had lapsed / was new
    assert live == {"s1"} and lapsed == set() and released == set()


def test_an_open_job_is_settled_as_an_orphan_only_once_its_owner_s_lease_is_gone(
        redis_server, redis_prefix):
    async def scenario():
        async with opened(redis_server.url, redis_prefix, 3) as (a, b, c):
            await a.renew_lease("sched-a", 30)
            await a.create_job(job("j"))
            await a.start_job("j", "w1", time.time())
            await a.record_progress("j", 7, time.time())
            sweepers = [Billing(s, PRICES, retry_s=0.01) for s in (b, c)]
            for s in sweepers:
                s.start()
            try:
                while_alive = await sweepers[0].settle_orphans("sched-b")
                state_alive = (await a.get_job("j"))["state"]
                await a.release_lease("sched-a")  # (or it lapsed: the same to the others)
                both = await asyncio.gather(sweepers[0].settle_orphans("sched-b"),
                                            sweepers[1].settle_orphans("sched-c"))
            finally:
                for s in sweepers:
                    await s.stop()
            usage = await a.usage("tenant", "acme", utc_day(time.time()), utc_day(time.time()))
            return while_alive, state_alive, both, await a.get_job("j"), usage

    while_alive, state_alive, both, record, usage = asyncio.run(scenario())
    assert while_alive == [] and state_alive == "running"
    assert ["j"] in both
    assert record["state"] == "failed" and record["settled_by"] in ("sched-b", "sched-c")
    assert (record["prompt_tokens"], record["completion_tokens"]) == (10, 7)
    assert usage[0][1]["jobs"] == 1 and usage[0][1]["completion_tokens"] == 7  # billed once


def test_a_script_level_orphan_settle_is_refused_while_the_lease_is_live(redis_server,
                                                                         redis_prefix):
    async def scenario():
        async with opened(redis_server.url, redis_prefix) as store:
            await store.renew_lease("sched-a", 30)
            await store.create_job(job("j"))
            live = await store.finish_job("j", JobState.FAILED, {"error": "x"}, None,
                                          orphan_of="sched-a")
            other = await store.finish_job("j", JobState.FAILED, {"error": "x"}, None,
                                           orphan_of="sched-z")  # read under another owner
            return live, other, (await store.get_job("j"))["state"]

    assert asyncio.run(scenario()) == (False, False, "queued")


def test_an_owner_s_bill_refused_after_its_job_was_settled_as_an_orphan_is_an_anomaly(
        redis_server, redis_prefix, caplog):
    async def scenario():
        async with opened(redis_server.url, redis_prefix, 2) as (a, b):
            await a.create_job(job("j"))  # sched-a's lease lapsed (it has none)
            await a.start_job("j", "w1", time.time())
            await a.record_progress("j", 2, time.time())
            owner, sweeper = Billing(a, PRICES, retry_s=0.01), Billing(b, PRICES, retry_s=0.01)
            owner.start()
            sweeper.start()
            try:
                assert await sweeper.settle_orphans("sched-b") == ["j"]
                owner.settle(JobEnd("j", "acme", "m", "std", JobState.FINISHED, 10,
                                    (Segment("w1", "cpu", 10, 9),), "stop", workers=("w1",),
                                    text="abcdefghi", token_ids=tuple(range(9))))
                assert await owner.flush(5)
            finally:
                await owner.stop()
                await sweeper.stop()
            return await a.get_job("j"), await a.job_events("j")

    with caplog.at_level(logging.ERROR, logger="scheduler.billing"):
        record, events = asyncio.run(scenario())
    assert record["state"] == "failed" and record["completion_tokens"] == 2  # the first settle
    anomaly = [e for e in events if e["event"] == "anomaly"]
    assert len(anomaly) == 1 and anomaly[0]["unbilled_completion_tokens"] == 7
    assert any("ANOMALY" in r.getMessage() and "j" in r.getMessage() for r in caplog.records)


def test_a_final_job_s_output_record_events_and_request_id_expire_and_the_ledger_stays(
        redis_server, redis_prefix):
    raw = redis.Redis.from_url(redis_server.url, decode_responses=True)

    async def scenario():
        async with opened(redis_server.url, redis_prefix, keep_text_s=100,
                          keep_jobs_s=1000) as store:
            await store.create_job(job("j", request_id="r1"))
            ttl_open = raw.ttl(f"{redis_prefix}:job:j")
            await finish(store, "j")
            return ttl_open, await store.get_job("j")

    ttl_open, record = asyncio.run(scenario())
    p = redis_prefix
    assert ttl_open == -1  # an open job never expires
    assert record["text"] == "héllo" and record["token_ids"] == [1, 2, 3]
    assert "output" not in record and "text_expired" not in record
    assert "text" not in raw.hgetall(f"{p}:job:j")  # the text lives in its own key
    assert 90 <= raw.ttl(f"{p}:job_output:j") <= 100
    for key in (f"{p}:job:j", f"{p}:job_events:j", f"{p}:request:acme:r1"):
        assert 990 <= raw.ttl(key) <= 1000, key
    ledger = [k for k in raw.scan_iter(f"{p}:usage*")]
    assert ledger and all(raw.ttl(k) == -1 for k in ledger)


def test_expired_text_is_said_so_and_a_repeat_of_its_request_id_is_refused_clearly(
        redis_server, redis_prefix):
    async def scenario():
        async with opened(redis_server.url, redis_prefix, keep_text_s=1,
                          keep_jobs_s=3) as store:
            await store.create_job(job("j", request_id="r1"))
            await finish(store, "j")
            repeat_kept = await store.create_job(job("k", request_id="r1"))
            await asyncio.sleep(1.5)
            record = await store.get_job("j")
            with pytest.raises(InvalidArgument) as refused:
                await store.create_job(job("k", request_id="r1"))
            await asyncio.sleep(2.0)  # the record and the request id are gone too
            gone = await store.get_job("j"), await store.find_request("acme", "r1")
            fresh = await store.create_job(job("k", request_id="r1"))
            return repeat_kept, record, refused.value, gone, fresh

    repeat_kept, record, refused, gone, fresh = asyncio.run(scenario())
    assert repeat_kept == ("j", False)
    assert record["state"] == "finished" and record["text_expired"] is True
    assert "text" not in record and "token_ids" not in record
    assert refused.field == "request_id" and "new request_id" in str(refused)
    assert gone == (None, None) and fresh == ("k", True)


def test_keep_forever_sets_no_expiry(redis_server, redis_prefix):
    raw = redis.Redis.from_url(redis_server.url, decode_responses=True)

    async def scenario():
        async with opened(redis_server.url, redis_prefix, keep_text_s=0, keep_jobs_s=0) as store:
            await store.create_job(job("j", request_id="r1"))
            await finish(store, "j")

    asyncio.run(scenario())
    p = redis_prefix
    assert [raw.ttl(k) for k in (f"{p}:job:j", f"{p}:job_output:j", f"{p}:request:acme:r1")] \
        == [-1, -1, -1]
    with pytest.raises(ValueError, match="keep_text_s"):
        RedisStore(redis_server.url, p, keep_text_s=5, keep_jobs_s=2)


def test_a_tenant_s_open_jobs_are_capped_across_schedulers(redis_server, redis_prefix):
    limits = Limits(max_concurrent_jobs=3)

    async def admit(store, job_id, tenant="acme", request_id=""):
        try:
            return (await store.create_job(job(job_id, tenant=tenant, request_id=request_id),
                                           Admission(limits, 20, time.time())))[1]
        except ResourceExhausted as err:
            return err

    async def scenario():
        async with opened(redis_server.url, redis_prefix, 4) as stores:
            burst = await asyncio.gather(*(admit(stores[i % 4], f"b{i}", request_id=f"q{i}")
                                           for i in range(20)))
            admitted = [f"b{i}" for i, r in enumerate(burst) if r is True]
            other_tenant = await admit(stores[1], "o1", tenant="globex")
            i = next(i for i, r in enumerate(burst) if r is True)
            repeat = await admit(stores[2], "again", request_id=f"q{i}")  # not a new job
            count = await stores[0].open_job_count("acme")
            await finish(stores[3], admitted[0])
            after_one_ended = await admit(stores[0], "next")
            return burst, admitted, other_tenant, repeat, count, after_one_ended

    burst, admitted, other_tenant, repeat, count, after_one_ended = asyncio.run(scenario())
    refused = [r for r in burst if isinstance(r, ResourceExhausted)]
    assert len(admitted) == 3 == count and len(refused) == 17
    assert "max_concurrent_jobs of 3" in str(refused[0]) and refused[0].retry_after_s == 1.0
    assert other_tenant is True and repeat is False and after_one_ended is True
