"""Audit verdicts reach the ledger: each passed or failed verdict is handed to the auditor's
`record` once (an undecided audit is not), what one verdict adds to a worker's day, and a
ledger write that fails or hangs never stops or holds up the audits."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from scheduler.auditor import AuditJob, Auditor
from scheduler.errors import StoreUnavailable
from scheduler.ledger import AUDIT_FIELDS, audit_verdict

PASS, FAIL, UNDECIDED = {"gap": [0.0, 0.2]}, {"gap": [0.0, 9.0]}, {"gap": []}


class FakePool:
    """One free trusted worker whose scores are given in turn; quarantines kept in a dict."""

    def __init__(self, scores: list[dict]):
        self._scores = list(scores)
        self.quarantined: dict[str, str] = {}
        self.quarantines = SimpleNamespace(add=self.quarantined.__setitem__)

    def snapshots(self):
        return [SimpleNamespace(name="trusted", model="m", state="ready", healthy=True,
                                queued_requests=0)]

    async def score(self, auditor, prompt_ids, token_ids, temperature, timeout_s):
        return self._scores.pop(0)


def job(i: int, worker: str = "w1") -> AuditJob:
    return AuditJob(f"j{i}", worker, "m", (1, 2), (3, 4), 0.0)


def audit_all(scores: list[dict], record) -> tuple[list, Auditor]:
    async def go():
        auditor = Auditor(FakePool(scores), frozenset({"trusted"}), record=record)
        verdicts = [await auditor.audit(job(i)) for i in range(len(scores))]
        await auditor.stop()  # waits for the pending ledger writes
        return verdicts, auditor

    return asyncio.run(go())


def test_one_verdict_adds_an_audited_job_and_a_failed_one_a_failed_audit():
    assert audit_verdict(True) == {"audited_jobs": 1}
    assert audit_verdict(False) == {"audited_jobs": 1, "failed_audits": 1}
    assert set(audit_verdict(False)) == set(AUDIT_FIELDS)
    with pytest.raises(ValueError, match="^audit verdict: passed must be True or False"):
        audit_verdict(None)


def test_each_passed_or_failed_verdict_is_recorded_once_and_undecided_ones_are_not():
    written = []

    async def record(worker, passed, at):
        written.append((worker, passed, at > 0))

    verdicts, auditor = audit_all([PASS, UNDECIDED, FAIL], record)
    assert verdicts == [True, None, False]
    assert written == [("w1", True, True), ("w1", False, True)]
    assert auditor.per_worker["w1"]["audited"] == 3  # the in-memory counts are unchanged
    assert "w1" in auditor.pool.quarantined


def test_a_ledger_write_that_fails_is_logged_and_dropped_and_the_audits_go_on(caplog):
    async def record(worker, passed, at):
        raise StoreUnavailable("job store (Redis at 127.0.0.1:1) is unavailable: refused")

    with caplog.at_level(logging.WARNING, logger="scheduler.auditor"):
        verdicts, auditor = audit_all([PASS, FAIL], record)
    assert verdicts == [True, False] and auditor.per_worker["w1"]["failed"] == 1
    dropped = [r.getMessage() for r in caplog.records if "not counted in the ledger" in r.message]
    assert len(dropped) == 2 and "unavailable" in dropped[0]


def test_a_ledger_write_that_hangs_does_not_hold_up_the_next_audit():
    async def go():
        release, started = asyncio.Event(), []

        async def record(worker, passed, at):
            started.append(passed)
            await release.wait()

        auditor = Auditor(FakePool([PASS, PASS]), frozenset({"trusted"}), record=record)
        # A write awaited inline would wait forever here: fail instead of hanging.
        verdicts = [await asyncio.wait_for(auditor.audit(job(i)), 30) for i in (0, 1)]
        pending = len(auditor._writes)  # both writes still waiting on "Redis"
        release.set()
        await auditor.stop()
        return verdicts, pending, started, len(auditor._writes)

    verdicts, pending, started, left = asyncio.run(go())
    assert verdicts == [True, True] and pending == 2
    assert started == [True, True] and left == 0


def test_without_record_verdicts_stay_in_memory():
    verdicts, auditor = audit_all([PASS], None)
    assert verdicts == [True] and auditor.per_worker["w1"]["passed"] == 1
