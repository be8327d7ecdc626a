"""Waiting for full workers, end to end: real gRPC, a real local Ray cluster with one worker on
the shipped model, a real Redis, and a scheduler that counts that worker full at one request
(`max_queue_per_worker=1`), so that every further job waits in its tenant's queue.

A tenant that floods the queue delays another tenant's job by at most one of its own; past a
bound a request is refused naming it; a waiting job whose deadline passes leaves the queue and
is billed nothing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

ray = pytest.importorskip("ray")

from scheduler_common import PROMPT, days_so_far, wait_for  # noqa: E402

from scheduler.client import Client  # noqa: E402
from scheduler.config import SchedulerConfig  # noqa: E402
from scheduler.head import SchedulerThread  # noqa: E402
from scheduler.redis_store import RedisStore  # noqa: E402

pytestmark = pytest.mark.integration
FLOOD = 6  # one on the worker, the rest waiting
PER_TENANT = FLOOD - 1


@pytest.fixture(scope="module")
def full_head(cluster, make_worker, persistent_redis):
    make_worker("q-1")
    config = SchedulerConfig(redis_url=persistent_redis.url, redis_prefix="queue-test",
                             grpc_port=0, max_tokens_cap=512, discovery_interval_s=0.5,
                             stats_interval_s=0.25, ledger_retry_s=0.2, max_queue_per_worker=1,
                             max_waiting_per_tenant=PER_TENANT)
    running = SchedulerThread(config)
    wait_for(lambda: len(running.scheduler.pool.stats()) >= 1, 30, "the worker adopted")
    store = RedisStore(config.redis_url, prefix=config.redis_prefix)
    keys = {t: running.call(store.create_key(t))[1] for t in ("flood", "one", "late")}
    yield running, keys, store
    running.call(store.close())
    running.stop()


def queued(head) -> int:
    """Jobs waiting now, as the scheduler's metrics say."""
    return int(sum(s.value for m in head.scheduler.metrics.registry.collect()
                   if m.name == "sparkgrid_scheduler_queued_jobs" for s in m.samples))


def test_a_flood_delays_another_tenant_by_at_most_one_job_and_is_bounded(full_head):
    head, keys, store = full_head

    def run(tenant, i, **fields):
        with Client(head.endpoint, keys[tenant]) as c:
            return list(c.generate(f"# {i}\n" + PROMPT, temperature=0, **fields))

    with ThreadPoolExecutor(FLOOD + 2) as ex:
        # 400 tokens: greedy, the shipped pair writes no end-of-sequence token that soon, so
        # every flood job keeps the worker busy for as long as 400 tokens take
        flood = [ex.submit(run, "flood", i, max_tokens=400, timeout_s=300)
                 for i in range(FLOOD)]
        wait_for(lambda: queued(head) == PER_TENANT, 60, "the flood waiting")
        with pytest.raises(grpc.RpcError) as err:  # one more of the flood: past its bound
            run("flood", 99, max_tokens=4, timeout_s=60)
        one = ex.submit(run, "one", 0, max_tokens=24, timeout_s=300)
        # A job whose deadline passes while it waits (behind a flood job and `one`) leaves:
        # at least 424 tokens ahead of it, and a deadline well short of them (with 128-token
        # floods and one second, a fast CPU ran it before its deadline and billed it)
        with pytest.raises(grpc.RpcError) as late:
            run("late", 0, max_tokens=4, timeout_s=0.25)
        flood_jobs = {f.result()[-1].job_id for f in flood}
        one_job = one.result()[-1].job_id

    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_waiting_per_tenant" in err.value.details()
    assert float(dict(err.value.trailing_metadata())["retry-after-s"]) > 0
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    order = [d.job_id for d in head.scheduler.dispatcher.decisions]
    routed_before = [j for j in order[:order.index(one_job)] if j in flood_jobs]
    assert len(routed_before) <= 2 < FLOOD  # the running one and at most one more
    # The late job was recorded while it waited, then cancelled and billed nothing.
    usage = wait_for(lambda: (u := head.call(store.usage("tenant", "late", *days_so_far())))
                     and u, 10, "the late job settled")
    assert sum(d["jobs"] for _, d in usage) == 1
    assert sum(d.get("prompt_tokens", 0) + d.get("completion_tokens", 0) for _, d in usage) == 0
    assert queued(head) == 0
