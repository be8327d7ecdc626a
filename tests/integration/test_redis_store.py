"""The job store against a real, private Redis: keys, jobs, billing once, usage by day, and
what a caller sees when Redis is down or comes back."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from datetime import datetime, timezone

import pytest
import redis

from scheduler.errors import InvalidArgument, NotFound, StoreUnavailable, Unauthenticated
from scheduler.jobs import JobState, TransitionError
from scheduler.keys import new_key
from scheduler.ledger import Bill, Segment
from scheduler.local_redis import LocalRedis, free_port
from scheduler.redis_store import RedisStore

pytestmark = pytest.mark.integration

MIDNIGHT = datetime(2025, 6, 2, tzinfo=timezone.utc).timestamp()


@contextlib.asynccontextmanager
async def opened(url, prefix, **kwargs):
    store = RedisStore(url, prefix, **kwargs)
    try:
        yield store
    finally:
        await store.close()


def job_fields(job_id, tenant="acme", request_id="", **extra):
    return {"job_id": job_id, "tenant": tenant, "model": "qwen", "request_id": request_id,
            "params": {"max_tokens": 16, "temperature": 0.5}, "owner": "sched-1",
            "created_at": 1000.25, **extra}


def two_segment_bill(job_id, finished_at, tenant="acme"):
    segments = (Segment("w1", "H200", 10, 4, draft_tokens=6, accepted_tokens=3, busy_ms=40),
                Segment("w2", "L4", 14, 3, busy_ms=25))
    return Bill(job_id, tenant, "qwen", finished_at, prompt_tokens=10, completion_tokens=7,
                segments=segments)


async def run_to_billed(store, job_id, finished_at, tenant="acme"):
    await store.create_job(job_fields(job_id, tenant))
    await store.start_job(job_id, "w1", finished_at - 2)
    await store.start_job(job_id, "w2", finished_at - 1)
    bill = two_segment_bill(job_id, finished_at, tenant)
    return await store.finish_job(job_id, JobState.FINISHED,
                                  {"finished_at": finished_at, "segments": list(bill.segments)},
                                  bill)


# --- API keys ---------------------------------------------------------------------------------


def test_key_authenticates_its_tenant_until_revoked_everywhere_at_once(redis_server, redis_prefix):
    async def scenario():
        async with opened(redis_server.url, redis_prefix) as admin, \
                opened(redis_server.url, redis_prefix) as gateway:
            key_id, api_key = await admin.create_key("acme")
            assert api_key.startswith(f"sg_{key_id}_")
            assert await gateway.authenticate(api_key) == "acme"
            assert await admin.revoke_key(key_id) is True
            with pytest.raises(Unauthenticated, match="^API key: unknown or revoked$"):
                await gateway.authenticate(api_key)
            assert await admin.revoke_key(key_id) is False
            assert await admin.revoke_key(new_key()[0]) is False
            with pytest.raises(InvalidArgument, match="^key_id: "):
                await admin.revoke_key("not-an-id")
            with pytest.raises(InvalidArgument, match="^tenant: "):
                await admin.create_key("bad tenant")

    asyncio.run(scenario())


def test_wrong_secret_unknown_id_and_malformed_keys_are_refused(redis_server, redis_prefix):
    async def scenario():
        async with opened(redis_server.url, redis_prefix) as store:
            key_id, api_key = await store.create_key("acme")
            forged = f"sg_{key_id}_{new_key()[1][-43:]}"
            with pytest.raises(Unauthenticated, match="^API key: unknown or revoked$"):
                await store.authenticate(forged)
            with pytest.raises(Unauthenticated, match="^API key: unknown or revoked$"):
                await store.authenticate(new_key()[1])
            with pytest.raises(Unauthenticated, match="^API key: malformed"):
                await store.authenticate(api_key + "x")
            assert await store.authenticate(api_key) == "acme"

    asyncio.run(scenario())


def _all_values(client, prefix):
    """Every key name, hash field/value, set member, list item and string under the prefix."""
    out = []
    for name in client.scan_iter(f"{prefix}:*"):
        out.append(name)
        kind = client.type(name)
        if kind == "hash":
            for field, value in client.hgetall(name).items():
                out += [field, value]
        elif kind == "set":
            out += list(client.smembers(name))
        elif kind == "list":
            out += client.lrange(name, 0, -1)
        elif kind == "string":
            out.append(client.get(name))
        else:
            raise AssertionError(f"unexpected {kind} at {name}")
    return out


def test_list_keys_shows_no_hash_and_the_raw_key_is_nowhere_in_redis(redis_server, redis_prefix):
    async def scenario():
        async with opened(redis_server.url, redis_prefix) as store:
            made = [await store.create_key(t) for t in ("acme", "acme", "beta")]
            await store.revoke_key(made[1][0])
            return made, await store.list_keys("acme"), await store.list_keys(), \
                await store.list_keys("nobody")

    made, acme, everyone, nobody = asyncio.run(scenario())
    assert nobody == []
    assert sorted(row["key_id"] for row in acme) == sorted([made[0][0], made[1][0]])
    assert sorted(row["key_id"] for row in everyone) == sorted(key_id for key_id, _ in made)
    for row in everyone:
        assert set(row) == {"key_id", "tenant", "created_at", "revoked_at"}
        assert isinstance(row["created_at"], float)
        assert (row["revoked_at"] is not None) == (row["key_id"] == made[1][0])
        assert row["tenant"] == ("beta" if row["key_id"] == made[2][0] else "acme")
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    values = _all_values(client, redis_prefix)
    client.close()
    assert len(values) > 10
    for _, api_key in made:
        secret = api_key[-43:]
        assert not any(secret in value for value in values)


# --- jobs -------------------------------------------------------------------------------------


def test_request_id_is_idempotent_per_tenant(redis_server, redis_prefix):
    async def scenario():
        async with opened(redis_server.url, redis_prefix) as store:
            first = await store.create_job(job_fields("a", request_id="r1"))
            again = await store.create_job(job_fields("b", request_id="r1"))
            other_tenant = await store.create_job(job_fields("c", tenant="beta", request_id="r1"))
            no_id = [await store.create_job(job_fields(j)) for j in ("d", "e")]
            raced = await asyncio.gather(*(store.create_job(job_fields(f"x{i}", request_id="r2"))
                                           for i in range(10)))
            return (first, again, other_tenant, no_id, raced, await store.get_job("b"),
                    await store.find_request("acme", "r1"), await store.find_request("beta", "r1"),
                    await store.find_request("acme", "r9"), await store.open_jobs())

    first, again, other_tenant, no_id, raced, job_b, acme_r1, beta_r1, unknown, open_jobs = \
        asyncio.run(scenario())
    assert first == ("a", True) and again == ("a", False) and other_tenant == ("c", True)
    assert no_id == [("d", True), ("e", True)]
    winners = [job_id for job_id, created in raced if created]
    assert len(winners) == 1 and {job_id for job_id, _ in raced} == set(winners)
    assert job_b is None
    assert (acme_r1, beta_r1, unknown) == ("a", "c", None)
    assert sorted(job["job_id"] for job in open_jobs) == sorted(["a", "c", "d", "e", winners[0]])


def test_job_goes_queued_running_finished_with_events_and_typed_fields(redis_server, redis_prefix):
    bill = two_segment_bill("j1", MIDNIGHT + 50)

    async def scenario():
        async with opened(redis_server.url, redis_prefix) as store:
            assert await store.create_job(job_fields("j1", request_id="req")) == ("j1", True)
            queued = await store.get_job("j1")
            await store.start_job("j1", "w1", MIDNIGHT + 10)
            await store.record_progress("j1", 4, MIDNIGHT + 11.5)
            await store.start_job("j1", "w2", MIDNIGHT + 20)  # failover
            running = await store.get_job("j1")
            finished = await store.finish_job("j1", JobState.FINISHED, {
                "finish_reason": "stop", "error": None, "finished_at": MIDNIGHT + 50,
                "prompt_tokens": 10, "completion_tokens": 7, "segments": list(bill.segments),
                "spec": {"draft_tokens": 6, "verified_tokens": 0, "accepted_tokens": 3},
                "text": "héllo wörld ✓", "token_ids": [5, 6, 7, 8, 9, 10, 11]}, bill)
            await store.record_progress("j1", 99, MIDNIGHT + 60)  # late: ignored
            return (queued, running, finished, await store.get_job("j1"),
                    await store.job_events("j1"), await store.open_jobs())

    queued, running, finished, done, events, open_jobs = asyncio.run(scenario())
    assert (queued["state"] == "queued"
            and queued["params"] == {"max_tokens": 16, "temperature": 0.5})
    assert queued["created_at"] == 1000.25 and queued["billed"] is False and queued["workers"] == []
    assert running["state"] == "running" and running["workers"] == ["w1", "w2"]
    assert running["started_at"] == MIDNIGHT + 10
    assert running["progress_completion_tokens"] == 4 and running["progress_at"] == MIDNIGHT + 11.5
    assert finished is True
    assert done["state"] == "finished" and done["billed"] is True and "error" not in done
    assert done["finish_reason"] == "stop" and done["finished_at"] == MIDNIGHT + 50
    assert done["prompt_tokens"] == 10 and done["completion_tokens"] == 7
    assert done["segments"][1] == {"worker": "w2", "gpu_type": "L4", "prompt_tokens": 14,
                                   "completion_tokens": 3, "draft_tokens": 0, "verified_tokens": 0,
                                   "accepted_tokens": 0, "busy_ms": 25, "spec_steps": 0}
    assert done["text"] == "héllo wörld ✓" and done["token_ids"] == [5, 6, 7, 8, 9, 10, 11]
    assert done["progress_completion_tokens"] == 4
    assert [e["event"] for e in events] == ["queued", "dispatched", "dispatched", "finished"]
    assert [e.get("worker") for e in events[1:3]] == ["w1", "w2"]
    assert [e["at"] for e in events] == [1000.25, MIDNIGHT + 10, MIDNIGHT + 20, MIDNIGHT + 50]
    assert events[3]["finish_reason"] == "stop"
    assert open_jobs == []


def test_a_job_keeps_what_an_orphan_s_bill_needs_and_unknown_fields_are_named(
        redis_server, redis_prefix):
    async def scenario():
        async with opened(redis_server.url, redis_prefix) as store:
            await store.create_job(job_fields("j", prompt_tokens=12, plan="pro"))
            with pytest.raises(ValueError, match=r"missing \[\], unknown \['colour'\]$"):
                await store.create_job(job_fields("k", colour="red"))
            without_owner = {k: v for k, v in job_fields("k").items() if k != "owner"}
            with pytest.raises(ValueError, match=r"missing \['owner'\], unknown \[\]$"):
                await store.create_job(without_owner)
            return await store.get_job("j"), await store.get_job("k")

    job, refused = asyncio.run(scenario())
    assert (job["prompt_tokens"], job["plan"], job["state"]) == (12, "pro", "queued")
    assert refused is None


def test_a_final_job_cannot_restart_or_finish_again(redis_server, redis_prefix):
    async def scenario():
        async with opened(redis_server.url, redis_prefix) as store:
            await store.create_job(job_fields("j"))
            assert await store.finish_job("j", JobState.CANCELLED, {"finished_at": 5.0}, None)
            with pytest.raises(TransitionError,
                               match="^job j: cannot go from cancelled to running$"):
                await store.start_job("j", "w1", 6.0)
            assert await store.finish_job("j", JobState.FAILED, {"error": "late"}, None) is False
            job = await store.get_job("j")
            assert job["state"] == "cancelled" and "error" not in job and job["billed"] is False
            assert [e["event"] for e in await store.job_events("j")] == ["queued", "cancelled"]
            assert await store.usage_keys("tenant") == []
            with pytest.raises(ValueError, match="state must be final"):
                await store.finish_job("j", JobState.RUNNING, {}, None)
            with pytest.raises(ValueError, match="unknown fields"):
                await store.finish_job("j", JobState.FAILED, {"state": "x"}, None)

    asyncio.run(scenario())


def test_the_final_record_carries_dispatches_lost_while_redis_was_down(redis_server, redis_prefix):
    bill = Bill("j", "acme", "qwen", MIDNIGHT, 3, 2, (Segment("wü", "H200", 3, 2),))

    async def scenario():
        async with opened(redis_server.url, redis_prefix) as store:
            await store.create_job(job_fields("j"))  # its start_job write never landed
            assert await store.finish_job("j", JobState.FAILED, {"workers": ["wü"], "error": ""},
                                          bill)
            return (await store.get_job("j"), await store.usage_keys("worker"),
                    await store.usage("worker", "wü", "2025-06-02", "2025-06-02"))

    job, workers, usage = asyncio.run(scenario())
    assert job["state"] == "failed" and job["workers"] == ["wü"] and job["finished_at"] == MIDNIGHT
    assert workers == ["wü"]
    assert usage == [("2025-06-02", {"jobs": 1, "prompt_tokens": 3, "segments": 1,
                                     "completion_tokens": 2, "processed_prompt_tokens": 3})]


def test_unknown_jobs_are_not_found_and_never_created(redis_server, redis_prefix):
    async def scenario():
        async with opened(redis_server.url, redis_prefix) as store:
            for call in (store.start_job("nope", "w1", 1.0), store.record_progress("nope", 1, 1.0),
                         store.finish_job("nope", JobState.FAILED, {}, None)):
                with pytest.raises(NotFound, match="^job nope: not found$"):
                    await call
            return await store.get_job("nope"), await store.job_events("nope")

    assert asyncio.run(scenario()) == (None, [])


def test_concurrent_finishes_bill_exactly_once(redis_server, redis_prefix):
    async def scenario():
        stores = [RedisStore(redis_server.url, redis_prefix) for _ in range(4)]
        try:
            await stores[0].create_job(job_fields("j"))
            await stores[1].start_job("j", "w1", MIDNIGHT)
            await stores[2].start_job("j", "w2", MIDNIGHT + 1)
            bill = two_segment_bill("j", MIDNIGHT + 2)
            results = await asyncio.gather(*(
                stores[i % 4].finish_job("j", JobState.FINISHED, {"finished_at": MIDNIGHT + 2},
                                         bill)
                for i in range(20)))
            day = "2025-06-02"
            return (results, await stores[3].usage("tenant", "acme", day, day),
                    await stores[3].usage("worker", "w1", day, day),
                    await stores[0].job_events("j"))
        finally:
            for store in stores:
                await store.close()

    results, tenant, worker, events = asyncio.run(scenario())
    assert sorted(results) == [False] * 19 + [True]
    assert tenant == [("2025-06-02", {"jobs": 1, "prompt_tokens": 10, "completion_tokens": 7,
                                      "draft_tokens": 6, "accepted_tokens": 3})]
    assert worker == [("2025-06-02", {"jobs": 1, "prompt_tokens": 10, "segments": 1,
                                      "completion_tokens": 4, "processed_prompt_tokens": 10,
                                      "draft_tokens": 6, "accepted_tokens": 3, "busy_ms": 40})]
    assert [e["event"] for e in events].count("finished") == 1


def test_a_bill_for_another_tenant_or_job_is_refused(redis_server, redis_prefix):
    async def scenario():
        async with opened(redis_server.url, redis_prefix) as store:
            await store.create_job(job_fields("j"))
            with pytest.raises(ValueError, match="tenant beta, the job of acme"):
                await store.finish_job("j", JobState.FAILED, {}, two_segment_bill("j", 5.0, "beta"))
            with pytest.raises(ValueError, match="for job k, not j"):
                await store.finish_job("j", JobState.FAILED, {}, two_segment_bill("k", 5.0))
            return await store.get_job("j"), await store.usage_keys("tenant")

    job, tenants = asyncio.run(scenario())
    assert job["state"] == "queued" and tenants == []


# --- usage ------------------------------------------------------------------------------------


def test_usage_is_booked_per_utc_day_across_midnight(redis_server, redis_prefix):
    async def scenario():
        async with opened(redis_server.url, redis_prefix) as store:
            assert await run_to_billed(store, "late", MIDNIGHT - 0.5)
            assert await run_to_billed(store, "early", MIDNIGHT + 0.5)
            assert await run_to_billed(store, "next", MIDNIGHT + 3600)
            assert await run_to_billed(store, "other", MIDNIGHT + 7, tenant="beta")
            with pytest.raises(InvalidArgument, match="^dimension: "):
                await store.usage("customer", "acme", "2025-06-01", "2025-06-02")
            with pytest.raises(InvalidArgument, match="^since: "):
                await store.usage("tenant", "acme", "2025-06-03", "2025-06-02")
            return (await store.usage("tenant", "acme", "2025-05-01", "2025-07-01"),
                    await store.usage("tenant", "acme", "2025-06-02", "2025-06-02"),
                    await store.usage("all", "all", "2025-06-01", "2025-06-02"),
                    await store.usage("gpu", "L4", "2025-06-02", "2025-06-02"),
                    [await store.usage_keys(d)
                     for d in ("tenant", "model", "worker", "gpu", "all")])

    acme, acme_day2, everything, l4, keys = asyncio.run(scenario())
    one = {"jobs": 1, "prompt_tokens": 10, "completion_tokens": 7, "draft_tokens": 6,
           "accepted_tokens": 3}
    two = {field: 2 * n for field, n in one.items()}
    three = {field: 3 * n for field, n in one.items()}
    assert acme == [("2025-06-01", one), ("2025-06-02", two)]
    assert acme_day2 == [("2025-06-02", two)]
    assert everything == [("2025-06-01", one), ("2025-06-02", three)]
    assert l4 == [("2025-06-02", {"segments": 3, "completion_tokens": 9,
                                  "processed_prompt_tokens": 42, "busy_ms": 75})]
    assert keys == [["acme", "beta"], ["qwen"], ["w1", "w2"], ["H200", "L4"], ["all"]]
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert client.smembers(f"{redis_prefix}:usage_days") == {"2025-06-01", "2025-06-02"}
    client.close()


# --- Redis down -------------------------------------------------------------------------------


def test_no_redis_fails_fast_with_store_unavailable_and_no_password(redis_prefix):
    port = free_port()

    async def scenario():
        async with opened(f"redis://:s3cretpw@127.0.0.1:{port}/0", redis_prefix,
                          timeout_s=1.0) as store:
            calls = (store.ping(), store.authenticate(new_key()[1]),
                     store.create_job(job_fields("j")),
                     store.usage("all", "all", "2025-01-01", "2025-01-31"))
            for call in calls:
                started = time.monotonic()
                with pytest.raises(StoreUnavailable) as info:
                    await call
                assert time.monotonic() - started < 3
                message = str(info.value)
                assert message.startswith(f"job store (Redis at 127.0.0.1:{port}) is unavailable: ")
                assert "s3cretpw" not in message

    asyncio.run(scenario())


def test_a_redis_that_never_answers_times_out_instead_of_hanging(redis_prefix):
    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]

        async def scenario():
            async with opened(f"redis://127.0.0.1:{port}/0", redis_prefix, timeout_s=0.5) as store:
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}"):
                    await asyncio.wait_for(store.ping(), 10)
                return time.monotonic() - started

        assert asyncio.run(scenario()) < 2


def test_outage_fails_calls_then_the_same_store_recovers_with_totals_intact(tmp_path, redis_prefix):
    server = LocalRedis(tmp_path, persistent=True)  # a stop and start is an outage, not a wipe
    server.start()
    day = "2025-06-02"
    try:
        async def scenario():
            async with opened(server.url, redis_prefix, timeout_s=1.0) as store:
                assert await run_to_billed(store, "before", MIDNIGHT + 5)
                before = await store.usage("tenant", "acme", day, day)
                server.stop()
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match=f"Redis at 127.0.0.1:{server.port}"):
                    await store.usage("tenant", "acme", day, day)
                with pytest.raises(StoreUnavailable):
                    await store.finish_job("before", JobState.FINISHED, {},
                                           two_segment_bill("before", MIDNIGHT + 5))
                assert time.monotonic() - started < 3
                server.start()
                after = await store.usage("tenant", "acme", day, day)
                again = await store.finish_job("before", JobState.FINISHED, {},
                                               two_segment_bill("before", MIDNIGHT + 5))
                assert await run_to_billed(store, "after", MIDNIGHT + 6)
                return before, after, again, await store.usage("tenant", "acme", day, day)

        before, after, again, final = asyncio.run(scenario())
    finally:
        server.stop()
    assert before == after == [(day, {"jobs": 1, "prompt_tokens": 10, "completion_tokens": 7,
                                      "draft_tokens": 6, "accepted_tokens": 3})]
    assert again is False
    assert final == [(day, {"jobs": 2, "prompt_tokens": 20, "completion_tokens": 14,
                            "draft_tokens": 12, "accepted_tokens": 6})]
