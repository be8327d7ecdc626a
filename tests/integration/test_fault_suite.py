"""Faults not covered in `test_scheduler_faults.py`, each alone: Redis that hangs (SIGSTOP, so
calls wait rather than being refused) for a few seconds during a stream, and Redis killed -9
and restarted from its append-only file during a load. Real gRPC, a real local Ray cluster
with the conftest's two workers, the conftest's in-process scheduler on a private append-only
Redis (`persistent_redis`, fsync always), shared by the module so that it stays quick.

(A scheduler killed while a second one keeps serving is tested with the schedulers' leases;
`bench/faults.py` runs all these faults together under a mixed load of three tenants.)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

ray = pytest.importorskip("ray")

from scheduler_common import PROMPT, days_so_far, wait_for  # noqa: E402

from scheduler.client import Client  # noqa: E402
from scheduler.errors import StoreUnavailable  # noqa: E402

pytestmark = pytest.mark.integration
HANG_S = 4.0
"""How long Redis hangs: past the store's socket timeout (2 s), so its calls time out."""


def _redis_pid(server) -> int:
    return server._proc.pid  # LocalRedis offers start/stop only; signals go to its child


def _kill_and_restart(server) -> None:
    """SIGKILL (no shutdown, no last write), then a new redis-server on the same port and data
    directory, which loads the append-only file."""
    os.kill(_redis_pid(server), signal.SIGKILL)
    server._proc.wait(10)
    server._proc = None
    server.start()


def _totals(store_call, tenant: str) -> tuple[int, int, int]:
    days = store_call("usage", "tenant", tenant, *days_so_far())
    return tuple(sum(d.get(f, 0) for _, d in days)
                 for f in ("jobs", "prompt_tokens", "completion_tokens"))


def _totals_once_up(store_call, tenant: str) -> tuple[int, int, int] | None:
    """`_totals`, or None while Redis is still loading its append-only file."""
    try:
        return _totals(store_call, tenant)
    except StoreUnavailable:
        return None


def test_redis_hung_mid_stream_the_stream_ends_cleanly_and_is_billed_what_it_delivered(
        head, persistent_redis, store_call):
    _, key = store_call("create_key", "hung-co")
    with Client(head.endpoint, key) as c:
        stream = c.generate(PROMPT, max_tokens=200, temperature=0, timeout_s=120)
        chunks = [next(stream)]
        assert not chunks[0].finish_reason  # the job runs on while Redis hangs
        job_id, errors = chunks[0].job_id, []

        def read():
            try:
                for chunk in stream:
                    chunks.append(chunk)
            except grpc.RpcError as err:
                errors.append(err)

        reader = threading.Thread(target=read)
        pid = _redis_pid(persistent_redis)
        os.kill(pid, signal.SIGSTOP)
        try:
            reader.start()
            time.sleep(HANG_S)
        finally:
            os.kill(pid, signal.SIGCONT)
        reader.join(90)
        assert not reader.is_alive(), "the stream did not end after Redis came back"
        assert not errors, f"the stream broke: {errors[0].code()} {errors[0].details()}"
        last = chunks[-1]
        delivered = sum(len(x.token_ids) for x in chunks)
        assert last.finish_reason in ("length", "stop") and last.job_id == job_id
        assert last.usage.completion_tokens == delivered > 0
        billed = wait_for(lambda: (j := store_call("get_job", job_id))["state"] == "finished"
                          and j, 30, "the job settled once Redis is back")
        assert billed["billed"] and billed["completion_tokens"] == delivered
        expected = (1, last.usage.prompt_tokens, delivered)
        wait_for(lambda: _totals(store_call, "hung-co") == expected, 10, "the usage booked")
        time.sleep(1.0)  # a retried settle would land by now: it must book nothing more
        assert _totals(store_call, "hung-co") == expected
        assert c.usage().completion_tokens == delivered


def test_redis_restarted_from_its_aof_mid_load_loses_no_acknowledged_bill(
        head, persistent_redis, store_call):
    _, key = store_call("create_key", "aof-co")
    n, got, lock = 24, {}, threading.Lock()

    def one(i: int):
        fields = dict(max_tokens=8 + i % 17, temperature=0, request_id=f"aof-{i}")
        deadline = time.monotonic() + 60
        with Client(head.endpoint, key) as c:
            while True:  # a client retries on UNAVAILABLE, with the same request_id
                try:
                    reply = c.complete(f"# job {i}\ndef f{i}(x):\n", timeout_s=60, **fields)
                    break
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                        raise
                    time.sleep(0.3)
        assert len(reply.token_ids) == reply.usage.completion_tokens
        with lock:
            got[reply.job_id] = (reply.usage.prompt_tokens, reply.usage.completion_tokens)

    def billed_now() -> dict:
        records = {j: store_call("get_job", j) for j in list(got)}
        return {j: r for j, r in records.items() if r and r.get("billed")}

    with ThreadPoolExecutor(6) as ex:
        futures = [ex.submit(one, i) for i in range(n)]
        acked = wait_for(lambda: len(got) >= n // 3 and billed_now(), 60, "bills written")
        before = _totals(store_call, "aof-co")
        _kill_and_restart(persistent_redis)
        after = wait_for(lambda: _totals_once_up(store_call, "aof-co"), 10, "Redis loaded")
        for f in futures:
            f.result(120)
    assert all(a >= b for a, b in zip(after, before)), (before, after)
    for job_id, record in acked.items():
        now = store_call("get_job", job_id)
        assert now["billed"] and now["state"] == record["state"], (job_id, now)
        assert now["completion_tokens"] == record["completion_tokens"]
    expected = (len(got), sum(p for p, _ in got.values()), sum(c for _, c in got.values()))
    wait_for(lambda: _totals(store_call, "aof-co") == expected, 20,
             "every job billed once, exactly what its client received")
    wait_for(lambda: not [j for j in store_call("open_jobs") if j["tenant"] == "aof-co"], 20,
             "no job of the load left open")
