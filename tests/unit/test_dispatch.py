"""One job's life in the dispatcher, with a fake worker pool and job store (no Ray, Redis or
gRPC): admission errors, failover with resume, the bound on attempts, refusals, cancellation,
the record each job ends with, and waiting for full workers fairly across tenants."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from scheduler.billing import Billing, settlement
from scheduler.config import SchedulerConfig
from scheduler.dispatch import Dispatcher
from scheduler.errors import InvalidArgument, ResourceExhausted, Unavailable
from scheduler.jobs import JobState
from scheduler.observed import ObservedSpeeds
from scheduler.prices import PriceBook
from scheduler.requests import JobRequest
from scheduler.router import WorkerSnapshot
from scheduler.worker_pool import WorkerLost, WorkerRefused
from sparkgrid.contract import Chunk, Resume, SpecCounts, Usage

REQUEST = JobRequest("p", (5, 6, 7), "m", 10, 0.0, 1.0, 0, 3, (), "")
VOCAB = 100
PRICES = PriceBook.parse({"version": "t1", "default_plan": "basic", "plans": {"basic": {
    "tokens_per_day": 1000, "prices": {"*": {"prompt_per_million": "1000",
                                             "completion_per_million": "3000.5"}}}}})


def snapshot(name, queued=0):
    return WorkerSnapshot(name, "m", "ready", True, 0, queued, 10 * queued, 50.0, None, None)


class Letters:
    """A tokenizer whose token n is the letter chr(96 + n): 1 is "a", 2 is "b", ..."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(96 + i) for i in ids)


class FakePool:
    """Workers named in `scripts`: each a list of chunks to stream, ending in a finish or in
    an exception (WorkerLost/WorkerRefused) raised after the chunks."""

    def __init__(self, scripts, queued=0):
        self.scripts = scripts
        self.queued = queued
        self.calls = []
        self.closed = []
        self.noted = []
        self.strikes = []
        self.observed = ObservedSpeeds()  # the real one: what the dispatcher tells it is checked

    def snapshots(self):
        return [snapshot(n, self.queued) for n in self.scripts if n not in self.closed_for_good()]

    def closed_for_good(self):
        return {c["worker"] for c in self.calls}  # one attempt per worker in these tests

    def note_dispatch(self, worker, job_id, budget_tokens):
        self.noted.append((worker, job_id, budget_tokens))

    def worker_stats(self, name):
        return SimpleNamespace(gpu_type=f"gpu-{name}")  # the one WorkerStats field read

    def model(self, name):
        return SimpleNamespace(vocab_size=VOCAB, tokenizer=Letters())  # the ModelInfo fields read

    def strike(self, worker, reason):
        self.strikes.append((worker, reason))

    async def wait_changed(self, timeout_s):
        await asyncio.sleep(0.001)

    async def cancel(self, worker, job_id):
        return True

    async def generate(self, worker, job_id, prompt_ids, params, resume, budget):
        self.calls.append({"worker": worker, "prompt_ids": prompt_ids, "params": params,
                           "resume": resume, "budget": budget})
        try:
            for item in self.scripts[worker]:
                if isinstance(item, Exception):
                    raise item
                await asyncio.sleep(0)
                yield item
        finally:
            self.closed.append(worker)


class FakeStore:
    def __init__(self):
        self.jobs = {}
        self.admissions = []

    async def tenant_plan(self, tenant):
        return None

    async def create_job(self, fields, admission):
        self.admissions.append(admission)
        self.jobs[fields["job_id"]] = dict(fields, state="queued")
        return fields["job_id"], True

    async def start_job(self, job_id, worker, at):
        self.jobs[job_id]["state"] = "running"

    async def record_progress(self, job_id, completion_tokens, at):
        pass


class Records(Billing):
    """The real billing, with what it would write kept here instead."""

    def __init__(self, store):
        super().__init__(store, PRICES)
        self.records = []

    def settle(self, end):
        self.records.append(settlement(end, self.prices, time.time()))
        return self.records[-1]


def chunk(ids, text, finish=None):
    usage = None if finish is None else Usage(prompt_tokens=3, completion_tokens=len(ids))
    return Chunk("j", tuple(ids), text, finish, usage,
                 SpecCounts(draft_tokens=4 * len(ids), verified_tokens=2 * len(ids),
                            accepted_tokens=len(ids)))


def make(scripts, **config):
    pool, store = FakePool(scripts, config.pop("queued", 0)), FakeStore()
    ledger = Records(store)
    cfg = SchedulerConfig(max_attempts=config.pop("max_attempts", 3), **config)
    return Dispatcher(cfg, pool, store, ledger, "test"), pool, store, ledger


async def collect(dispatcher, request=REQUEST, tenant="acme"):
    return [p async for p in dispatcher.run(tenant, request)]


def test_no_ready_worker_is_unavailable_and_records_nothing():
    dispatcher, _, store, ledger = make({})
    with pytest.raises(Unavailable, match="no live worker"):
        asyncio.run(collect(dispatcher))
    assert store.jobs == {} and ledger.records == []


def test_all_queues_full_and_no_waiting_allowed_is_refused_at_once_recording_nothing():
    dispatcher, _, store, ledger = make({"a": [], "b": []}, queued=300, max_queue_per_worker=256,
                                        max_waiting_per_tenant=0)
    with pytest.raises(ResourceExhausted, match="max_waiting_per_tenant") as err:
        asyncio.run(collect(dispatcher))
    assert err.value.retry_after_s > 0 and store.jobs == {} and ledger.records == []


def test_a_job_that_waits_past_the_longest_wait_fails_billed_nothing():
    dispatcher, pool, store, ledger = make({"a": []}, queued=300, max_queue_wait_s=0.05)
    with pytest.raises(ResourceExhausted, match="max_queue_wait_s") as err:
        asyncio.run(collect(dispatcher))
    assert err.value.retry_after_s > 0 and pool.calls == []
    (record,) = ledger.records
    assert record.state is JobState.FAILED and "max_queue_wait_s" in record.fields["error"]
    assert record.bill.prompt_tokens == 0 and record.bill.charge_uusd == 0
    assert store.jobs[record.job_id]["state"] == "queued"  # recorded while it waited


@pytest.mark.parametrize("bad, rule", [
    (chunk(list(range(20, 5020)), "x" * 5000, "stop"),
     "sent 5002 tokens for a job of max_tokens 10"),
    (chunk([3, 8191], "yz"), "sent token id 8191, outside the vocabulary of 100"),
    (chunk([3], "q"), "sent text that is not its tokens' text (at character 2: 'q', the tokens "
                      "decode to 'c')"),
])
def test_a_worker_that_breaks_the_job_s_rules_gets_a_strike_and_the_job_moves(bad, rule):
    """Over-budget or out-of-vocabulary chunks are never delivered nor billed: the job resumes
    on another worker from what was delivered before."""
    dispatcher, pool, _, ledger = make({
        "cheat": [chunk([1, 2], "ab"), bad],
        "honest": [chunk([3], "c"), chunk([4], "d", "stop")],
    })
    pieces = asyncio.run(collect(dispatcher))
    assert pool.strikes == [("cheat", rule)]
    assert [t for p in pieces for t in p.token_ids] == [1, 2, 3, 4]
    assert "".join(p.text for p in pieces) == "abcd"  # the scheduler's own decoding
    (record,) = ledger.records
    assert record.state is JobState.FINISHED and record.fields["workers"] == ["cheat", "honest"]
    assert record.bill.completion_tokens == 4 <= REQUEST.max_tokens
    assert pool.calls[1]["resume"] == Resume(token_ids=(1, 2), num_chars=2)


def test_a_lost_worker_s_job_resumes_elsewhere_from_the_delivered_tokens():
    dispatcher, pool, _, ledger = make({
        "a": [chunk([1, 2], "ab"), chunk([3], ""), WorkerLost("a died")],
        "b": [chunk([4], "cd"), chunk([5], "e", "stop")],
    })
    pieces = asyncio.run(collect(dispatcher))
    first, second = pool.calls
    assert second["worker"] != first["worker"]
    assert second["resume"] == Resume(token_ids=(1, 2, 3), num_chars=2)
    assert first["resume"] is None
    assert second["params"].max_tokens == second["budget"] == 10 - 3
    assert second["prompt_ids"] == first["prompt_ids"] == [5, 6, 7]
    assert second["params"].seed == first["params"].seed == 3
    assert [t for p in pieces for t in p.token_ids] == [1, 2, 3, 4, 5]
    assert "".join(p.text for p in pieces) == "abcde"
    assert pieces[-1].usage == {"prompt_tokens": 3, "completion_tokens": 5}
    (record,) = ledger.records
    assert record.state is JobState.FINISHED and record.fields["workers"] == ["a", "b"]
    # 3 prompt tokens at $1000/M and 5 completion tokens at $3000.5/M: 3000 + 15002.5 micro-dollars,
    # rounded half-even once; the quota reserved prompt + max_tokens.
    assert record.bill.charge_uusd == 18002 and record.fields["price_version"] == "t1"
    (admission,) = dispatcher.store.admissions
    assert admission.reserve_tokens == 3 + 10 and admission.limits.tokens_per_day == 1000
    bill = record.bill
    assert [(s.worker, s.completion_tokens, s.prompt_tokens) for s in bill.segments] == \
           [("a", 3, 3), ("b", 2, 6)]
    # A chunk's spec figures are the worker's running totals: each part's last one counts.
    assert record.fields["spec"] == {"draft_tokens": 4 + 4, "verified_tokens": 2 + 2,
                                        "accepted_tokens": 1 + 1, "spec_steps": 0}
    assert [n[0] for n in pool.noted] == ["a", "b"]  # each routing counted at once, pending


def test_after_max_attempts_the_job_fails_naming_each_failure_and_bills_what_was_delivered():
    lost = lambda n: [chunk([n], chr(96 + n)), WorkerLost(f"{n} broke")]  # noqa: E731
    dispatcher, pool, _, ledger = make({"a": lost(1), "b": lost(2), "c": lost(3), "d": lost(4)},
                                       max_attempts=3)

    async def run():
        got = []
        with pytest.raises(Unavailable) as err:
            async for piece in dispatcher.run("acme", REQUEST):
                got.append(piece)
        return got, err.value

    got, err = asyncio.run(run())
    assert len(pool.calls) == 3 and "after 3 attempts" in str(err)
    assert str(err).count("broke") == 3 and len(got) == 3
    (record,) = ledger.records
    assert record.state is JobState.FAILED and record.bill.completion_tokens == 3


def test_a_worker_that_refuses_the_input_fails_the_job_with_the_field_named():
    dispatcher, pool, _, ledger = make({"a": [WorkerRefused("max_tokens: too many")],
                                        "b": [chunk([1], "a", "stop")]})
    with pytest.raises(InvalidArgument) as err:
        asyncio.run(collect(dispatcher))
    assert err.value.field == "max_tokens" and len(pool.calls) == 1
    assert ledger.records[0].state is JobState.FAILED


def test_an_abort_the_scheduler_did_not_ask_for_counts_as_a_lost_worker():
    dispatcher, pool, _, ledger = make({"a": [chunk([1], "a"), chunk([], "", "abort")],
                                        "b": [chunk([2], "b", "length")]})
    pieces = asyncio.run(collect(dispatcher))
    assert [p.finish_reason for p in pieces][-1] == "length" and len(pool.calls) == 2
    assert ledger.records[0].state is JobState.FINISHED


def test_closing_the_stream_cancels_the_job_on_its_worker_and_bills_what_was_delivered():
    dispatcher, pool, _, ledger = make({"a": [chunk([1], "a"), chunk([2], "b"),
                                              chunk([3], "c", "length")]})

    async def run():
        stream = dispatcher.run("acme", REQUEST)
        first = await stream.__anext__()
        await stream.aclose()  # what a disconnecting client's cancelled call does
        return first

    asyncio.run(run())
    assert pool.closed == ["a"]
    (record,) = ledger.records
    assert record.state is JobState.CANCELLED and record.bill.completion_tokens == 1
    assert record.fields["finish_reason"] == "abort"


def test_a_cancel_stops_the_job_where_it_is_even_if_the_worker_runs_on():
    """The fake worker ignores the cancel (as one that has not heard it yet does): nothing it
    sends afterwards is delivered or billed, and the job ends cancelled."""
    dispatcher, pool, _, ledger = make({"a": [chunk([1], "a"), chunk([2], "b"),
                                              chunk([3], "c", "stop")]})

    async def run():
        stream = dispatcher.run("acme", REQUEST)
        first = await stream.__anext__()
        cancelled = await dispatcher.cancel("acme", first.job_id)
        return [first] + [p async for p in stream], cancelled

    pieces, cancelled = asyncio.run(run())
    assert cancelled == (True, "cancelled")
    assert [t for p in pieces for t in p.token_ids] == [1]
    assert pieces[-1].finish_reason == "abort" and pool.closed == ["a"]
    (record,) = ledger.records
    assert record.state is JobState.CANCELLED and record.bill.completion_tokens == 1


class OrphanStore:
    """What a scheduler starting after the job's one died finds: the job's record, open."""

    def __init__(self, record):
        self.record = record

    async def open_jobs(self):
        return [self.record]

    async def live_owners(self, owners):
        return set()  # the job's scheduler died: its lease lapsed

    async def tenant_plan(self, tenant):
        raise AssertionError("the plan the job was admitted under is in its record")


def test_a_job_is_billed_the_same_by_its_scheduler_and_as_an_orphan_of_a_dead_one():
    lost = lambda n: [chunk([n], chr(96 + n)), WorkerLost(f"{n} broke")]  # noqa: E731
    dispatcher, _, store, ledger = make({"a": lost(1), "b": lost(2), "c": lost(3)})
    with pytest.raises(Unavailable):
        asyncio.run(collect(dispatcher))
    (by_scheduler,) = ledger.records
    # Had the scheduler died instead, its last progress note would have said 3 tokens.
    record = dict(store.jobs[by_scheduler.job_id], progress_completion_tokens=3)
    orphans = Records(OrphanStore(record))
    assert asyncio.run(orphans.settle_orphans("the-next-scheduler")) == [by_scheduler.job_id]
    (as_orphan,) = orphans.records

    def billed(s):
        return (s.job_id, s.state, s.bill.tenant, s.bill.model, s.bill.prompt_tokens,
                s.bill.completion_tokens, s.bill.charge_uusd,
                {k: s.fields[k] for k in ("prompt_tokens", "completion_tokens", "charge_uusd",
                                          "plan", "price_version")})

    # 3 prompt tokens at $1000/M and 3 delivered at $3000.5/M: 3000 + 9001.5, rounded once
    assert billed(as_orphan) == billed(by_scheduler) == (
        by_scheduler.job_id, JobState.FAILED, "acme", "m", 3, 3, 12002,
        {"prompt_tokens": 3, "completion_tokens": 3, "charge_uusd": 12002, "plan": "basic",
         "price_version": "t1"})
    assert "stopped" in as_orphan.fields["error"] and "broke" in by_scheduler.fields["error"]
    # an orphan's record keeps the text and workers it has; its tokens go to "unknown"
    assert {"text", "token_ids", "workers"}.isdisjoint(
        k for k, v in as_orphan.fields.items() if v is not None)
    assert [(s.worker, s.completion_tokens) for s in as_orphan.bill.segments] == [("unknown", 3)]
