"""The bill journal: settlements waiting for Redis survive the scheduler's death (a real
process killed with SIGKILL), a live scheduler's journal is left alone, and a torn line is
skipped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from scheduler.bill_journal import BillJournal
from scheduler.billing import JobEnd, settlement
from scheduler.jobs import JobState
from scheduler.ledger import Segment
from scheduler.prices import PriceBook

BOOK = PriceBook.parse({"version": "v1", "default_plan": "std", "plans": {"std": {"prices": {
    "*": {"prompt_per_million": "1", "completion_per_million": "3"}}}}})


def bill(job_id: str, completion: int = 5):
    end = JobEnd(job_id, "acme", "m", "std", JobState.FINISHED, 7,
                 (Segment("w1", "H200", 7, completion, draft_tokens=3, busy_ms=9),),
                 finish_reason="stop", workers=("w1",), text="héllo", token_ids=(1, 2, 3))
    return settlement(end, BOOK, 1_700_000_000.0)


def test_open_bills_of_a_closed_journal_are_taken_over_exactly(tmp_path):
    first = BillJournal(tmp_path, "scheduler-a")
    a, b, c = bill("ja"), bill("jb", 9), bill("jc")
    for s in (a, b, c):
        first.add(s)
    first.done("jb")
    first._file.close()  # the process dies: its lock goes, its file stays
    second = BillJournal(tmp_path, "scheduler-b")
    adopted = second.adopt_dead()
    assert [s.job_id for s in adopted] == ["ja", "jc"]
    assert adopted[0] == a and adopted[1] == c  # bill, fields and state round-trip exactly
    assert not (tmp_path / "scheduler-a.jsonl").exists()
    assert second.open == {"ja", "jc"}
    second.done("ja")
    second.done("jc")
    second.close()
    assert list(tmp_path.iterdir()) == []  # nothing open: no file left


def test_a_live_schedulers_journal_is_left_alone(tmp_path):
    live = BillJournal(tmp_path, "scheduler-a")
    live.add(bill("ja"))
    other = BillJournal(tmp_path, "scheduler-b")
    assert other.adopt_dead() == []
    assert live.open == {"ja"} and (tmp_path / "scheduler-a.jsonl").exists()
    with pytest.raises(OSError, match="held by another scheduler"):
        BillJournal(tmp_path, "scheduler-a")


def test_a_journal_survives_sigkill_and_a_torn_line_is_skipped(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {os.getcwd()!r})
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_bill_journal import bill
        from scheduler.bill_journal import BillJournal
        j = BillJournal({str(tmp_path)!r}, "scheduler-dead")
        j.add(bill("j1")); j.add(bill("j2", 11)); j.done("j1")
        j._file.write('{{"op": "bill", "settlem')  # a write cut short by the kill
        j._file.flush()
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert BillJournal(tmp_path, "scheduler-probe").adopt_dead() == []  # still alive
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    adopted = BillJournal(tmp_path, "scheduler-new").adopt_dead()
    assert [(s.job_id, s.bill.completion_tokens) for s in adopted] == [("j2", 11)]


def test_bills_waiting_for_a_down_store_are_journaled_and_a_new_scheduler_writes_them(tmp_path):
    """The writer journals what waits once a write fails; the scheduler dies (its journal
    stays, unlocked); the next one on this host takes the bills over and writes them."""
    import asyncio

    from test_billing import FlakyStore, end

    from scheduler.billing import Billing

    down = FlakyStore(down=10**6)

    async def first_life():
        journal = BillJournal(tmp_path, "scheduler-a")
        biller = Billing(down, BOOK, retry_s=0.01, journal=journal)
        biller.start()
        biller.settle(end(job_id="j1", plan="std", model="m"))
        await asyncio.sleep(0.1)  # the first write fails: j1 goes to disk
        biller.settle(end(job_id="j2", plan="std", model="m"))  # during the outage: to disk
        await biller.stop()
        journal._file.close()  # the process dies: no `done`, the lock goes
        return journal.open

    assert asyncio.run(first_life()) == {"j1", "j2"}
    up = FlakyStore()

    async def second_life():
        journal = BillJournal(tmp_path, "scheduler-b")
        biller = Billing(up, BOOK, retry_s=0.01, journal=journal)
        biller.start()
        assert await biller.flush(5)
        await biller.stop()
        journal.close()

    asyncio.run(second_life())
    assert sorted(job_id for job_id, *_ in up.written) == ["j1", "j2"]
    assert [(b.completion_tokens, b.charge_uusd) for *_, b in up.written] == \
        [(s.bill.completion_tokens, s.bill.charge_uusd)
         for s in (settlement(end(job_id=j, plan="std", model="m"), BOOK, 0) for j in ("j1", "j2"))]
    assert list(tmp_path.iterdir()) == []  # every bill written: no journal left
