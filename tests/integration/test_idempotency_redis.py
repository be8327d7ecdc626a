"""request_id semantics as a payment API has them, in the real job store: a failed job's id
may be retried (it binds to the new job), a finished one's may not, and a repeat counts
against the rate limit like any request."""

from __future__ import annotations

import asyncio
import time

import pytest

from scheduler.errors import ResourceExhausted
from scheduler.jobs import JobState
from scheduler.quota import Admission, Limits
from scheduler.redis_store import RedisStore

pytestmark = pytest.mark.integration


def fields(job_id: str, request_id: str) -> dict:
    return {"job_id": job_id, "tenant": "acme", "model": "m", "request_id": request_id,
            "params": {"max_tokens": 8}, "owner": "s", "created_at": time.time()}


def test_a_failed_job_s_request_id_binds_to_the_retry_and_a_finished_one_s_does_not(
        redis_server, redis_prefix):
    async def scenario():
        store = RedisStore(redis_server.url, redis_prefix)
        try:
            assert await store.create_job(fields("a", "pay-1")) == ("a", True)
            await store.finish_job("a", JobState.FAILED, {"error": "no worker"}, None)
            retried = await store.create_job(fields("b", "pay-1"))
            again = await store.create_job(fields("c", "pay-1"))
            await store.start_job("b", "w1", time.time())
            await store.finish_job("b", JobState.FINISHED, {"finished_at": time.time()}, None)
            after_finish = await store.create_job(fields("d", "pay-1"))
            return retried, again, after_finish, await store.find_request("acme", "pay-1")
        finally:
            await store.close()

    retried, again, after_finish, bound = asyncio.run(scenario())
    assert retried == ("b", True)  # the failed job's id now names the retry
    assert again == ("b", False) and after_finish == ("b", False) and bound == "b"


def test_repeats_count_against_the_rate_limit(redis_server, redis_prefix):
    limits = Limits(requests_per_minute=2)

    async def scenario():
        store = RedisStore(redis_server.url, redis_prefix)
        try:
            now = time.time()
            first = await store.create_job(fields("a", "pay-2"), Admission(limits, 8, now))
            repeat = await store.create_job(fields("b", "pay-2"), Admission(limits, 8, now))
            try:
                await store.create_job(fields("c", "pay-2"), Admission(limits, 8, now))
            except ResourceExhausted as err:
                return first, repeat, err
            return first, repeat, None
        finally:
            await store.close()

    first, repeat, refused = asyncio.run(scenario())
    assert first == ("a", True) and repeat == ("a", False)
    assert refused is not None and "requests_per_minute" in str(refused)
