"""Several schedulers on one Redis: a second scheduler started beside a live one fails none of
its jobs; a rolling restart (start the new one, drain the old one with a grace, stop it)
bills a long stream fully; a scheduler killed mid-job has its job settled by the live one
within its lease plus a sweep, billed its prompt and the last progress noted; a lease Redis
lost is taken again. Real gRPC, a real local Ray cluster with the module's two workers, a
real private Redis.

The fixtures (`cluster`, `workers`, `persistent_redis`) are in `conftest.py`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from procs import Lines  # noqa: E402
from scheduler_common import PROMPT, wait_for  # noqa: E402

from scheduler.client import Client  # noqa: E402

pytestmark = pytest.mark.integration
PREFIX = "lease-test"
LEASE_S = 3.0
"""Short, so that a dead scheduler's job is settled within seconds (renewed every 1 s)."""


def _config(redis_url: str):
    from scheduler.config import SchedulerConfig

    return SchedulerConfig(redis_url=redis_url, redis_prefix=PREFIX, grpc_port=0,
                           max_tokens_cap=1500, discovery_interval_s=0.5, stats_interval_s=0.25,
                           ledger_retry_s=0.2, lease_s=LEASE_S)


def _scheduler(redis_url: str):
    from scheduler.head import SchedulerThread

    running = SchedulerThread(_config(redis_url))
    wait_for(lambda: len(running.scheduler.pool.stats()) >= 2, 30, "both workers adopted")
    return running


@pytest.fixture(scope="module")
def second(cluster, workers, persistent_redis):
    """A scheduler that stays up through the module (the "other live one")."""
    running = _scheduler(persistent_redis.url)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def api_key(second):
    return second.call(second.scheduler.store.create_key("roll-co"))[1]


def _record(sched, job_id):
    return sched.call(sched.scheduler.store.get_job(job_id))


def test_a_rolling_restart_fails_no_job_and_bills_a_long_stream_fully(
        second, api_key, persistent_redis):
    old = _scheduler(persistent_redis.url)
    with Client(second.endpoint, api_key) as watcher:
        before = watcher.usage()
    with Client(old.endpoint, api_key) as c:
        # greedy, PROMPT runs to max_tokens: about 15 s here, so it outlasts what follows
        stream = c.generate(PROMPT, max_tokens=1500, temperature=0, timeout_s=240)
        got = [next(stream)]
        job_id = got[0].job_id
        new = _scheduler(persistent_redis.url)  # started while the old one streams
        try:
            time.sleep(LEASE_S / 3 + 0.5)  # a sweep of each other scheduler has passed
            state = _record(new, job_id)["state"]
            assert state == "running", f"{state}: not taken for an orphan, nor yet ended"
            stopping = threading.Thread(target=old.stop, kwargs={"grace_s": 120})
            stopping.start()  # the drain: no new calls, the running stream goes on
            with Client(new.endpoint, api_key) as c2:  # the new one serves meanwhile
                other = c2.complete(PROMPT, max_tokens=8, temperature=0, timeout_s=60)
            got += list(stream)
            stopping.join(150)
            assert not stopping.is_alive()
        finally:
            new.stop()
    received = sum(len(x.token_ids) for x in got)
    assert got[-1].finish_reason in ("length", "stop") and received > 100
    assert got[-1].usage.completion_tokens == received
    record = _record(second, job_id)
    assert record["state"] == "finished" and record["completion_tokens"] == received
    assert "settled_by" not in record
    with Client(second.endpoint, api_key) as watcher:
        after = watcher.usage()
    assert after.jobs == before.jobs + 2
    assert after.completion_tokens == (before.completion_tokens + received
                                       + other.usage.completion_tokens)
    owners = {old.scheduler.owner, new.scheduler.owner, second.scheduler.owner}
    live = second.call(second.scheduler.store.live_owners(owners))
    assert live == {second.scheduler.owner}  # both stopped ones released theirs


def _start_head(redis_url: str, home) -> tuple[subprocess.Popen, str]:
    cmd = [str(Path(sys.executable).with_name("sparkgrid")), "head", "--ray-address",
           ray.get_runtime_context().gcs_address, "--redis-url", redis_url, "--redis-prefix",
           PREFIX, "--grpc-port", "0", "--metrics-port", "-1", "--lease", f"{LEASE_S:g}s",
           "--max-tokens-cap", "1500",
           "--allow-unregistered"]  # the module's workers have no operator (not tested here)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SPARKGRID_HOME": str(home)})
    line = Lines(proc).until("serving sparkgrid.v1.Inference", 120)[-1]
    port = re.search(r":(\d+) \(", line).group(1)
    return proc, f"127.0.0.1:{port}"


def test_a_killed_scheduler_s_job_is_settled_by_the_live_one_within_its_lease(
        second, api_key, persistent_redis, tmp_path):
    proc, endpoint = _start_head(persistent_redis.url, tmp_path)
    try:
        with Client(second.endpoint, api_key) as watcher:
            wait_for(lambda: watcher.workers(), 30, "workers")
            before = watcher.usage()
        c = Client(endpoint, api_key)
        wait_for(lambda: c.workers(), 30, "workers seen by the killed-to-be head")
        stream = c.generate(PROMPT, max_tokens=1200, temperature=0, timeout_s=120)
        first = next(stream)
        received = len(first.token_ids)
        started = time.monotonic()
        while time.monotonic() - started < 2.5:  # past two progress notes (one a second)
            received += len(next(stream).token_ids)
        proc.kill()  # SIGKILL: no drain, no release of its lease
        killed_at = time.monotonic()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # the live scheduler settles it once the lease lapses (<= LEASE_S) at its next sweep
    record = wait_for(lambda: (r := _record(second, first.job_id))["state"] == "failed" and r,
                      LEASE_S + LEASE_S / 3 + 5, "the orphan settled by the live scheduler")
    assert time.monotonic() - killed_at <= LEASE_S + LEASE_S / 3 + 5
    assert record["settled_by"] == second.scheduler.owner and "lease" in record["error"]
    assert record["prompt_tokens"] > 0
    assert 0 < record["completion_tokens"] == record["progress_completion_tokens"] <= received
    with Client(second.endpoint, api_key) as watcher:
        after = wait_for(lambda: (u := watcher.usage()).jobs == before.jobs + 1 and u, 10,
                         "billed")
    assert after.completion_tokens == before.completion_tokens + record["completion_tokens"]
    assert after.prompt_tokens == before.prompt_tokens + record["prompt_tokens"]


def test_a_lease_redis_lost_is_taken_again_and_said_loudly(second, caplog):
    import logging

    store, owner = second.scheduler.store, second.scheduler.owner
    lost_before = second.scheduler.leases_lost
    with caplog.at_level(logging.ERROR, logger="scheduler.head"):
        second.call(store.release_lease(owner))  # as if Redis lost it (a restart, a flush)
        wait_for(lambda: second.scheduler.leases_lost == lost_before + 1, 3 * LEASE_S,
                 "the loss noticed")
    assert second.call(store.live_owners([owner])) == {owner}
    assert any("LEASE LOST" in r.getMessage() for r in caplog.records)
