"""Billing: what a job's end is billed (exact money, one rounding, from what was delivered),
the record it leaves, an orphan's end, and the writer that retries while the store is down.
Both paths against one job: test_dispatch.py; an orphan settled twice in Redis:
test_billing_redis.py."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import pytest

from scheduler import billing
from scheduler.billing import UNKNOWN, Billing, JobEnd, Part, charge_uusd, orphan_end, settlement
from scheduler.errors import StoreUnavailable
from scheduler.jobs import JobState
from scheduler.ledger import Segment, increments
from scheduler.prices import PriceBook
from sparkgrid.contract import Chunk, SpecCounts, Usage

NOON = datetime(2026, 3, 14, 12, tzinfo=timezone.utc).timestamp()


def book(**plan_changes):
    plan = {"tokens_per_day": 10, "prices": {"*": {"prompt_per_million": "0.10",
                                                   "completion_per_million": "0.40"},
                                             "org/big": {"prompt_per_million": "2.5",
                                                         "completion_per_million": "10"}}}
    plan.update(plan_changes)
    return PriceBook.parse({"version": "v1", "default_plan": "std", "plans": {
        "std": plan, "pro": {"prices": {"*": {"prompt_per_million": "1",
                                              "completion_per_million": "3"}}}}})


TWO_PARTS = (Segment("w1", "H200", 10, 4, draft_tokens=6, accepted_tokens=3, spec_steps=2,
                     busy_ms=40),
             Segment("w2", "L4", 14, 3, verified_tokens=2, busy_ms=25))


def end(**changes) -> JobEnd:
    fields = dict(job_id="j1", tenant="acme", model="org/big", plan="pro",
                  state=JobState.FINISHED, prompt_tokens=10, segments=TWO_PARTS,
                  finish_reason="stop", workers=("w1", "w2"), text="héllo",
                  token_ids=tuple(range(7)))
    return JobEnd(**{**fields, **changes})


def test_a_charge_is_exact_and_rounded_half_even_once_per_job():
    b = book()
    std = b.plan("std")
    # 1 prompt token at $0.10/M = 0.1 micro-dollars; 5 of them 0.5 -> 0 (half to even),
    # 15 -> 1.5 -> 2
    assert charge_uusd(std, "any", 5, 0) == 0
    assert charge_uusd(std, "any", 15, 0) == 2
    assert charge_uusd(std, "any", 10**6, 10**6) == 500_000  # $0.10 + $0.40
    assert charge_uusd(std, "org/big", 1000, 2000) == 2_500 + 20_000  # the model's own price
    # one rounding per job, not per token kind: 0.5 + 0.4 = 0.9 -> 1 (two roundings would give 0)
    assert charge_uusd(std, "any", 5, 1) == 1


def test_a_job_is_billed_its_prompt_and_what_its_segments_delivered_at_its_plan_s_prices():
    done = settlement(end(), book(), NOON)
    bill = done.bill
    assert (done.job_id, done.state) == ("j1", JobState.FINISHED)
    assert (bill.job_id, bill.tenant, bill.model, bill.finished_at) == \
           ("j1", "acme", "org/big", NOON)
    assert (bill.prompt_tokens, bill.completion_tokens, bill.segments) == (10, 7, TWO_PARTS)
    assert bill.charge_uusd == 10 * 1 + 7 * 3  # "pro": $1/M and $3/M for any model
    spec = {"draft_tokens": 6, "verified_tokens": 2, "accepted_tokens": 3, "spec_steps": 2}
    assert done.fields == {
        "finish_reason": "stop", "error": "", "finished_at": NOON, "prompt_tokens": 10,
        "completion_tokens": 7, "charge_uusd": 31, "plan": "pro", "price_version": "v1",
        "segments": [s.__dict__ for s in TWO_PARTS], "spec": spec, "text": "héllo",
        "workers": ["w1", "w2"], "token_ids": list(range(7))}
    assert billing.usage(10, TWO_PARTS) == {"prompt_tokens": 10, "completion_tokens": 7}
    # a plan the book no longer has (or none): the default plan's prices, named in the record
    for plan in ("gone", None):
        other = settlement(end(plan=plan), book(), NOON)
        assert other.fields["plan"] == "std" and other.bill.charge_uusd == 25 + 70


def test_a_job_that_ended_unfinished_with_nothing_delivered_is_billed_nothing():
    """Failed or cancelled before any token reached the client (no worker, its scheduler gone,
    the client left): nothing billed, not even the prompt. Finished with no token (the model
    stopped at once): the prompt is billed, as the client got its (empty) answer."""
    for state in (JobState.FAILED, JobState.CANCELLED):
        done = settlement(end(state=state, segments=(), error="no worker", workers=(),
                              text="", token_ids=()), book(), NOON)
        bill = done.bill
        assert (bill.prompt_tokens, bill.completion_tokens, bill.charge_uusd) == (0, 0, 0)
        assert done.fields["prompt_tokens"] == 0 and done.fields["spec"]["draft_tokens"] == 0
    empty = settlement(end(state=JobState.FINISHED, segments=(Segment("w1", "L4", 10, 0),),
                           text="", token_ids=()), book(), NOON)
    assert (empty.bill.prompt_tokens, empty.bill.charge_uusd) == (10, 10)
    some = settlement(end(state=JobState.FAILED, segments=(Segment("w1", "L4", 10, 2),)),
                      book(), NOON)
    assert (some.bill.prompt_tokens, some.bill.completion_tokens) == (10, 2)


def test_an_orphan_fails_billed_for_its_last_progress_and_leaves_its_record_s_text_alone():
    record = {"job_id": "o1", "tenant": "acme", "model": "m", "owner": "sched-dead",
              "prompt_tokens": 8, "plan": "pro", "workers": ["w1"], "progress_completion_tokens": 5}
    orphan = orphan_end(record, "pro")
    assert (orphan.state, orphan.prompt_tokens, orphan.plan) == (JobState.FAILED, 8, "pro")
    assert orphan.segments == (Segment(UNKNOWN, UNKNOWN, 0, 5),)
    assert "sched-dead" in orphan.error and "stopped" in orphan.error
    done = settlement(orphan, book(), NOON)
    assert done.bill.charge_uusd == 8 + 15 and done.fields["completion_tokens"] == 5
    for kept in ("text", "token_ids", "workers"):  # None: the store leaves the record's own
        assert done.fields[kept] is None
    # booked so that every dimension still adds up: the tokens to the worker "unknown"
    assert increments(done.bill)[("worker", UNKNOWN, "2026-03-14")]["completion_tokens"] == 5
    # no progress noted yet (and a record from before the prompt was kept): nothing delivered
    bare = orphan_end({"job_id": "o2", "tenant": "acme", "model": "m", "owner": "x"}, None)
    assert (bare.prompt_tokens, bare.segments) == (0, ())
    assert settlement(bare, book(), NOON).bill.charge_uusd == 0


def test_a_part_books_what_was_delivered_and_the_worker_s_latest_spec_totals(monkeypatch):
    clock = iter([100.0, 100.25, 100.5])
    monkeypatch.setattr(billing.time, "monotonic", lambda: next(clock))
    part = Part("w1", "H200", 12)
    part.add(Chunk("j", (1, 2), "ab", spec=SpecCounts(4, 2, 1, 1)))
    part.add(Chunk("j", (3,), "c", "stop", Usage(prompt_tokens=12, completion_tokens=3),
                   SpecCounts(8, 4, 2, 2)))
    assert part.segment() == Segment("w1", "H200", 12, 3, draft_tokens=8, verified_tokens=4,
                                     accepted_tokens=2, spec_steps=2, busy_ms=500)


class FlakyStore:
    """Down for the first `down` writes; then keeps each write. A job id `bad` is refused."""

    def __init__(self, down=0):
        self.down = down
        self.written = []

    async def finish_job(self, job_id, state, fields, bill, orphan_of=None):
        if job_id == "bad":
            raise ValueError("finish_job: the bill is for job x, not bad")
        if self.down:
            self.down -= 1
            raise StoreUnavailable("job store (Redis at h:1) is unavailable: down")
        self.written.append((job_id, state, fields, bill))
        return True


def test_settle_returns_at_once_and_the_writer_retries_while_the_store_is_down():
    store = FlakyStore(down=2)

    async def scenario():
        biller = Billing(store, book(), retry_s=0.01)
        biller.start()
        try:
            done = biller.settle(end())
            assert biller.pending == 1 and store.written == []  # queued, not yet written
            biller.settle(end(job_id="bad"))  # a bug in one write never stops the writer
            biller.settle(end(job_id="j2"))
            assert await biller.flush(5)
            return done
        finally:
            await biller.stop()

    done = asyncio.run(scenario())
    assert [w[0] for w in store.written] == ["j1", "j2"]
    assert store.written[0] == (done.job_id, done.state, done.fields, done.bill)


def test_a_writer_that_cannot_write_says_so_when_flushed():
    async def scenario():
        biller = Billing(FlakyStore(down=10**6), book(), retry_s=0.01)
        biller.start()
        try:
            biller.settle(end())
            return await biller.flush(0.1), biller.pending
        finally:
            await biller.stop()

    flushed, pending = asyncio.run(scenario())
    assert flushed is False and pending == 0  # taken by the writer, which still retries it


class OpenJobs(FlakyStore):
    def __init__(self, records, plans, live=()):
        super().__init__()
        self.records, self.plans, self.live = records, plans, set(live)
        self.orphans_of = {}

    async def open_jobs(self):
        return self.records

    async def live_owners(self, owners):
        return self.live & set(owners)

    async def finish_job(self, job_id, state, fields, bill, orphan_of=None):
        self.orphans_of[job_id] = orphan_of
        return await super().finish_job(job_id, state, fields, bill)

    async def tenant_plan(self, tenant):
        return self.plans.get(tenant)


def test_settle_orphans_settles_other_schedulers_open_jobs_at_their_admitted_plan():
    base = {"model": "m", "prompt_tokens": 4, "progress_completion_tokens": 2,
            "created_at": time.time()}
    records = [{**base, "job_id": "mine", "tenant": "acme", "owner": "me"},
               {**base, "job_id": "a", "tenant": "acme", "owner": "dead", "plan": "std"},
               {**base, "job_id": "b", "tenant": "beta", "owner": "dead"},  # an older record
               {**base, "job_id": "c", "tenant": "acme", "owner": "alive"}]  # its lease is live
    store = OpenJobs(records, {"acme": "pro", "beta": "pro"}, live={"alive"})

    async def scenario():
        biller = Billing(store, book())
        biller.start()
        try:
            return await biller.settle_orphans("me")
        finally:
            await biller.stop()

    assert asyncio.run(scenario()) == ["a", "b"]
    plans = {job_id: (state, fields["plan"], bill.charge_uusd)
             for job_id, state, fields, bill in store.written}
    # "a" was admitted under "std" (its tenant is on "pro" now): 0.4 + 0.8 micro-dollars, 1;
    # "b" has no plan kept (a record from before plans were): the tenant's plan now, 4 + 6
    assert plans == {"a": (JobState.FAILED, "std", 1), "b": (JobState.FAILED, "pro", 10)}
    # written only while the owner's lease is still gone (the store checks), marked as swept
    assert store.orphans_of == {"a": "dead", "b": "dead"}
    assert {fields["settled_by"] for _, _, fields, _ in store.written} == {"me"}


def test_a_job_end_names_a_bad_field():
    with pytest.raises(ValueError, match="prompt_tokens"):
        settlement(end(prompt_tokens=-1), book(), NOON)
    with pytest.raises(ValueError, match="tenant"):
        settlement(end(tenant=""), book(), NOON)


def test_a_lapsed_owner_is_settled_at_the_second_sweep_and_own_strays_at_the_first():
    """An owner whose lease is gone gets one sweep interval to renew it (an outage longer than
    the lease lapses every lease at once); a job of this scheduler's that it neither runs nor
    has a bill for, older than STRAY_AFTER_S, is settled: billed nothing if it never ran."""
    old = time.time() - billing.STRAY_AFTER_S - 1
    base = {"model": "m", "prompt_tokens": 4, "progress_completion_tokens": 2, "tenant": "acme"}
    records = [{**base, "job_id": "gone", "owner": "dead", "created_at": old},
               {**base, "job_id": "stray", "owner": "me", "created_at": old, "state": "queued"},
               {**base, "job_id": "held", "owner": "me", "created_at": old, "state": "running"},
               {**base, "job_id": "new", "owner": "me", "created_at": time.time()}]
    store = OpenJobs(records, {})

    async def scenario():
        biller = Billing(store, book())
        biller.start()
        try:
            first = await biller.settle_orphans("me", lambda j: j == "held", confirm_s=0.2)
            store.records = [r for r in records if r["job_id"] == "gone"]
            await asyncio.sleep(0.25)
            second = await biller.settle_orphans("me", lambda j: j == "held", confirm_s=0.2)
            return first, second
        finally:
            await biller.stop()

    first, second = asyncio.run(scenario())
    assert first == ["stray"] and second == ["gone"]
    written = {job_id: (fields, bill) for job_id, _, fields, bill in store.written}
    assert written["stray"][1].prompt_tokens == written["stray"][1].completion_tokens == 0
    assert "lost track" in written["stray"][0]["error"] and store.orphans_of["stray"] is None
    assert written["gone"][1].completion_tokens == 2 and store.orphans_of["gone"] == "dead"


def test_a_workers_figure_the_ledger_refuses_still_leaves_its_part_billed():
    part = Part("w1", "", 10)  # an empty GPU type
    part.add(Chunk("j", (1, 2, 3), "abc"))
    segment = part.segment()
    assert (segment.worker, segment.gpu_type, segment.completion_tokens) == ("w1", UNKNOWN, 3)
