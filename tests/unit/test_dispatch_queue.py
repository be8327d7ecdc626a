"""Waiting for full workers, fairly across tenants, in the dispatcher (with the fake pool and
store of `test_dispatch.py`): a flooding tenant delays another's job by at most one of its own, a
burst never overshoots the workers' queues, a waiting job that is cancelled or abandoned leaves
the queue billed nothing, and room shown by the pool lets the next one go."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from test_dispatch import REQUEST, FakePool, FakeStore, Records, chunk, collect, snapshot

from scheduler.config import SchedulerConfig
from scheduler.dispatch import Dispatcher
from scheduler.errors import Unavailable
from scheduler.jobs import JobState


class BusyPool(FakePool):
    """One worker, "w", counting each job from its routing to its end (as the real pool does),
    plus `elsewhere` requests of other schedulers (or none: `gone`; see `figures`). Each job
    runs `hold_s`, then finishes; `order`: the tenants of the jobs as the worker got them."""

    def __init__(self, store, hold_s):
        super().__init__({"w": []})
        self.store, self.hold_s, self.changed = store, hold_s, asyncio.Event()
        self.on_worker, self.order, self.most, self.elsewhere, self.gone = set(), [], 0, 0, False

    def snapshots(self):
        return [] if self.gone else [snapshot("w", len(self.on_worker) + self.elsewhere)]

    def note_dispatch(self, worker, job_id, budget_tokens):
        self.on_worker.add(job_id)
        self.most = max(self.most, len(self.on_worker))

    def figures(self, elsewhere=0, gone=False):
        self.elsewhere, self.gone = elsewhere, gone
        self.changed.set()

    async def wait_changed(self, timeout_s):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout_s)
        self.changed.clear()

    async def generate(self, worker, job_id, prompt_ids, params, resume, budget):
        self.order.append(self.store.jobs[job_id]["tenant"])
        try:
            await asyncio.sleep(self.hold_s)
            yield chunk([1], "a", "stop")
        finally:
            self.on_worker.discard(job_id)


def make_busy(hold_s=0.002, **config):
    store = FakeStore()
    pool, ledger = BusyPool(store, hold_s), Records(store)
    return Dispatcher(SchedulerConfig(**config), pool, store, ledger, "test"), pool, store, ledger


def gauge(dispatcher, name, **labels):
    return dispatcher.metrics.registry.get_sample_value(name, {"model": "m", **labels})


def test_a_flooding_tenant_delays_another_tenant_s_job_by_at_most_one_of_its_own():
    async def go():
        dispatcher, pool, _, ledger = make_busy(max_queue_per_worker=1)
        flood = [asyncio.create_task(collect(dispatcher, tenant="flood")) for _ in range(30)]
        await asyncio.sleep(0)  # one on the worker, 29 waiting (no longer refused)
        waiting = gauge(dispatcher, "sparkgrid_scheduler_queued_jobs")
        one = asyncio.create_task(collect(dispatcher, tenant="one"))
        await asyncio.wait_for(asyncio.gather(*flood, one), 30)
        return dispatcher, pool, ledger, waiting

    dispatcher, pool, ledger, waiting = asyncio.run(go())
    assert waiting == 29 and pool.order[:3] == ["flood", "flood", "one"]  # FIFO: "one" 31st
    assert len(pool.order) == 31 and pool.most == 1  # never more than the worker's queue
    assert {(r.state, r.bill.prompt_tokens) for r in ledger.records} == {(JobState.FINISHED, 3)}
    assert gauge(dispatcher, "sparkgrid_scheduler_queued_jobs") == 0
    assert gauge(dispatcher, "sparkgrid_scheduler_queue_wait_seconds_count") == 31


def test_a_burst_never_overshoots_the_workers_queues():
    async def go():
        dispatcher, pool, *_ = make_busy(max_queue_per_worker=3)
        await asyncio.wait_for(asyncio.gather(
            *(collect(dispatcher, tenant=f"t{i % 4}") for i in range(40))), 30)
        return pool

    pool = asyncio.run(go())
    assert pool.most == 3 and len(pool.order) == 40


def test_a_waiting_job_cancelled_or_whose_client_goes_leaves_the_queue_billed_nothing():
    async def go():
        dispatcher, pool, store, ledger = make_busy(hold_s=0.2, max_queue_per_worker=1)
        first = asyncio.create_task(collect(dispatcher))
        await asyncio.sleep(0)
        stream = dispatcher.run("acme", REQUEST)
        cancelled = asyncio.create_task(stream.__anext__())
        gone = asyncio.create_task(collect(dispatcher, tenant="other"))
        await asyncio.sleep(0)
        assert gauge(dispatcher, "sparkgrid_scheduler_queued_jobs") == 2
        waiting = [j for j, rec in store.jobs.items() if rec["state"] == "queued"]
        answer = await dispatcher.cancel("acme", waiting[0])
        piece = await cancelled
        await stream.aclose()
        gone.cancel()  # what a client that disconnects (or its deadline) does
        with pytest.raises(asyncio.CancelledError):
            await gone
        left = gauge(dispatcher, "sparkgrid_scheduler_queued_jobs")
        await first
        return pool, ledger, answer, piece, left

    pool, ledger, answer, piece, left = asyncio.run(go())
    assert answer == (True, "cancelled") and left == 0 and piece.finish_reason == "abort"
    assert piece.usage == {"prompt_tokens": 0, "completion_tokens": 0}
    assert pool.order == ["acme"]  # only the first job reached the worker
    ends = sorted((r.state.value, r.bill.prompt_tokens, r.bill.charge_uusd) for r in ledger.records)
    assert ends == [("cancelled", 0, 0), ("cancelled", 0, 0), ("finished", 3, 6000)]


def test_a_waiting_job_goes_when_the_pool_shows_room_and_fails_when_its_workers_go():
    async def go():
        dispatcher, pool, *_ = make_busy(max_queue_per_worker=2)
        pool.figures(elsewhere=2)  # other schedulers' jobs fill the worker
        job = asyncio.create_task(collect(dispatcher))
        await asyncio.sleep(0.05)
        assert not job.done() and pool.order == []
        pool.figures(elsewhere=1)  # a slot freed there
        assert (await asyncio.wait_for(job, 5))[-1].finish_reason == "stop"
        pool.figures(elsewhere=2)
        job = asyncio.create_task(collect(dispatcher))
        await asyncio.sleep(0.05)
        pool.figures(elsewhere=2, gone=True)  # the model's last worker went
        with pytest.raises(Unavailable, match="no live worker"):
            await asyncio.wait_for(job, 5)
        return pool

    assert asyncio.run(go()).order == ["acme"]
