"""The fair queue alone (pure asyncio, no workers): who is let through first when capacity frees,
its bounds, leaving it while waiting (cancel, a cancelled task, the longest wait), and that no
freed slot is lost."""

from __future__ import annotations

import asyncio
import random

import pytest

from scheduler.errors import ResourceExhausted, Unavailable
from scheduler.fair_queue import FairQueue, QueueLimits, QueueRefused


class Slots:
    """A model's capacity as the pool would report it: `free` slots, or None (no worker)."""

    def __init__(self, free):
        self.free = free

    def __call__(self):
        return self.free


def run(coro):
    return asyncio.run(coro)


def test_with_room_and_nobody_waiting_a_job_goes_through_at_once_and_counts_until_released():
    async def go():
        slots = Slots(2)
        queue = FairQueue(slots)
        a, b, c = queue.enter("t"), queue.enter("t"), queue.enter("t")
        assert (a.waiting, b.waiting, c.waiting) == (False, False, True)  # a burst: 2 slots
        assert queue.in_transit == 2 and queue.waiting == 1
        assert await a.wait() is True
        slots.free = 1  # the pool now counts `a` on its worker...
        a.release()  # ...and the queue stops counting it: still no room for c
        assert c.waiting
        slots.free = 2  # a slot freed (another job ended)
        queue.pump()
        assert not c.waiting and await c.wait() is True

    run(go())


def admission_order(queue, slots, tickets):
    """Free one slot at a time, each admitted job taking it for good; tenants in order."""
    order, seen = [], set()
    while queue.waiting:
        slots.free += 1
        queue.pump()
        for t in tickets:
            if not t.waiting and id(t) not in seen:
                order.append(t)
                seen.add(id(t))
                slots.free -= 1  # the pool counts it on a worker now...
                t.release()  # ...and the queue no longer does
    return [t.tenant for t in order]


def test_tenants_take_turns_so_a_flood_delays_another_tenant_s_job_by_at_most_one_job():
    async def go():
        slots = Slots(0)
        queue = FairQueue(slots)
        tickets = [queue.enter("flood") for _ in range(1000)]
        tickets += [queue.enter("one")]
        tickets += [queue.enter("two"), queue.enter("two")]
        order = admission_order(queue, slots, tickets)
        assert order[:6] == ["flood", "one", "two", "flood", "two", "flood"]
        assert order.count("flood") == 1000 and len(order) == 1003
        # Each tenant's own jobs keep their order (a FIFO per tenant).
        flood = [t for t in tickets if t.tenant == "flood"]
        assert sorted(flood, key=lambda t: t.admitted_at) == flood

    run(go())


def test_a_tenant_that_comes_back_joins_the_back_of_the_ring():
    async def go():
        slots = Slots(0)
        queue = FairQueue(slots)
        tickets = [queue.enter("a"), queue.enter("b"), queue.enter("b"), queue.enter("c")]
        slots.free = 1
        queue.pump()  # a's only job: a leaves the ring
        slots.free = 0  # the pool counts it on its worker
        tickets[0].release()
        tickets.append(queue.enter("a"))  # a again: behind b and c, which waited
        order = admission_order(queue, slots, tickets[1:])
        assert order == ["b", "c", "a", "b"]

    run(go())


def test_bounds_refuse_naming_the_limit_with_a_retry_hint_and_leave_the_others_queued():
    async def go():
        queue = FairQueue(Slots(0), QueueLimits(max_waiting_per_tenant=2,
                                                max_waiting_per_model=3))
        queue.enter("a"), queue.enter("a")
        with pytest.raises(QueueRefused) as err:
            queue.enter("a")
        assert err.value.limit == "max_waiting_per_tenant" and err.value.retry_after_s > 0
        assert "max_waiting_per_tenant" in str(err.value)
        assert isinstance(err.value, ResourceExhausted)
        queue.enter("b")  # another tenant still may
        with pytest.raises(QueueRefused) as err:
            queue.enter("c")
        assert err.value.limit == "max_waiting_per_model"
        assert queue.waiting == 3 and queue.waiting_of("a") == 2 and queue.waiting_of("c") == 0

    run(go())


def test_a_zero_bound_refuses_at_once_when_full_but_never_when_there_is_room():
    async def go():
        slots = Slots(1)
        queue = FairQueue(slots, QueueLimits(max_waiting_per_tenant=0))
        assert not queue.enter("a").waiting
        with pytest.raises(QueueRefused):
            queue.enter("a")

    run(go())


def test_a_job_waiting_past_the_longest_wait_fails_and_leaves_the_queue():
    async def go():
        queue = FairQueue(Slots(0), QueueLimits(max_queue_wait_s=0.05))
        ticket = queue.enter("a")
        with pytest.raises(QueueRefused) as err:
            await ticket.wait()
        assert err.value.limit == "max_queue_wait_s" and "0.05 s" in str(err.value)
        assert queue.waiting == 0 and ticket.waited_s() >= 0.05
        ticket.release()  # (what its job's end does: nothing more)
        assert queue.waiting == 0 and queue.in_transit == 0

    run(go())


def test_cancel_ends_a_wait_and_the_others_keep_their_turns():
    async def go():
        slots = Slots(0)
        queue = FairQueue(slots)
        a, b1, b2, c = (queue.enter(t) for t in ("a", "b", "b", "c"))
        waiter = asyncio.create_task(b1.wait())
        await asyncio.sleep(0)
        b1.cancel()
        assert await waiter is False and queue.waiting == 3
        b1.release()
        assert admission_order(queue, slots, [a, b2, c]) == ["a", "b", "c"]

    run(go())


def test_a_task_cancelled_while_waiting_leaves_the_queue_at_once():
    async def go():
        slots = Slots(0)
        queue = FairQueue(slots)
        gone = queue.enter("a")
        stays = queue.enter("b")
        task = asyncio.create_task(gone.wait())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert queue.waiting == 1 and queue.waiting_of("a") == 0
        slots.free = 1
        queue.pump()
        assert not stays.waiting and queue.in_transit == 1

    run(go())


def test_a_slot_admitted_to_a_job_whose_task_is_cancelled_passes_to_the_next_one():
    """The lost wakeup: admitted, then cancelled before it ran; its slot must not be lost."""
    async def go():
        slots = Slots(0)
        queue = FairQueue(slots)
        first, second = queue.enter("a"), queue.enter("b")
        task = asyncio.create_task(first.wait())
        await asyncio.sleep(0)
        slots.free = 1
        queue.pump()  # first admitted: its task is woken, not yet run...
        task.cancel()  # ...and cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not second.waiting and queue.in_transit == 1
        assert await second.wait() is True

    run(go())


def test_with_no_live_worker_new_jobs_and_waiting_ones_are_unavailable():
    async def go():
        slots = Slots(0)
        queue = FairQueue(slots)
        ticket = queue.enter("a")
        slots.free = None
        queue.pump()
        with pytest.raises(Unavailable, match="no live worker"):
            await ticket.wait()
        with pytest.raises(Unavailable):
            queue.enter("b")
        assert queue.waiting == 0

    run(go())


def test_under_random_churn_every_job_is_admitted_once_and_room_is_never_overshot():
    """Tasks enter, wait, hold their slot a while and leave, some cancelled, while capacity
    grows: admitted jobs never exceed the room, and no job waits forever."""
    async def go():
        rng = random.Random(7)
        slots = Slots(1)
        held = []  # jobs on workers (counted in `slots`)
        queue = FairQueue(lambda: None if slots.free is None else slots.free - len(held))
        done, overshoot = [], []

        async def job(i):
            ticket = queue.enter(f"t{i % 4}")
            if await ticket.wait():
                if queue.in_transit + len(held) > slots.free:
                    overshoot.append(i)
                held.append(i)  # the pool counts it on a worker...
                ticket.release()  # ...then the queue stops counting it
                try:
                    await asyncio.sleep(rng.random() / 500)
                finally:
                    held.remove(i)
                    queue.pump()
                done.append(i)

        tasks = []
        for i in range(300):
            tasks.append(asyncio.create_task(job(i)))
            if rng.random() < 0.1:
                tasks[rng.randrange(len(tasks))].cancel()
            if rng.random() < 0.05:
                slots.free += 1
                queue.pump()
            await asyncio.sleep(0)
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        assert overshoot == []
        cancelled = [i for i, task in enumerate(tasks) if task.cancelled()]
        assert sorted(done + cancelled) == list(range(300)) and len(done) > 200
        assert queue.waiting == 0 and queue.in_transit == 0

    run(go())


@pytest.mark.parametrize("field, value", [("max_waiting_per_tenant", -1),
                                          ("max_waiting_per_model", 1.5),
                                          ("max_queue_wait_s", 0)])
def test_bad_limits_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        QueueLimits(**{field: value})
