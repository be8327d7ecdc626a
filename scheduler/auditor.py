"""The auditor: re-scores a share of untrusted workers' jobs on a trusted worker, off the
client's path, and quarantines a worker whose output is not the target's.

- Which jobs: every finished job that one untrusted worker served from start to end (a job that
  failed over mixes workers' output and is not audited). A worker's first `first_jobs` such
  jobs are all audited (a new worker is audited heavily), then each with probability `rate`.
- Who audits: a worker the platform trusts (`--trusted-workers`: GPUs it runs itself) that
  serves the same model and can take a job now, never the audited worker itself. Audits wait in
  a bounded queue and run one at a time on spare capacity: when no trusted worker is free, or
  the queue is full, the audit is skipped and counted as such (never the client's wait).
- The verdict (`scheduler/audit.py`): greedy jobs token by token up to the measured tolerance;
  sampled jobs by their z statistic, and the worker's sampled jobs pooled. A failed audit
  quarantines the worker at once, with the job and the reason (`WorkerPool.quarantines`: kept
  in Redis for every scheduler, its payout withheld from then on).
- The ledger: each verdict (passed or failed; an undecided audit is none) is counted in the
  worker's daily ledger cell through `record` (`RedisStore.record_audit`: one Redis write), so
  every scheduler's audits add up in reports and survive restarts. The write runs beside the
  audits, never in their way: one that fails (Redis down) is logged and dropped, and when
  `WRITES_LIMIT` writes are pending a further verdict is logged and not counted.

Knows: which jobs to audit, the pool's and the verdict's interfaces. Does not know: Ray
(`WorkerPool.score` makes the call), Redis, gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass

from scheduler.audit import Pool, judge
from scheduler.errors import StoreUnavailable
from scheduler.router import routable
from scheduler.worker_pool import WorkerLost
from sparkgrid.contract import GREEDY_BELOW

log = logging.getLogger(__name__)
QUEUE_LIMIT = 256
SCORE_TIMEOUT_S = 60.0
WRITES_LIMIT = 64
"""Verdicts whose ledger write may be pending at once (Redis slow or down)."""


@dataclass(frozen=True)
class AuditJob:
    """A finished job as the auditor needs it."""

    job_id: str
    worker: str
    model: str
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    temperature: float


class Auditor:
    def __init__(self, pool, trusted: frozenset[str], rate: float = 0.02, first_jobs: int = 20,
                 rng: random.Random | None = None, record=None):
        """`record`: async (worker, passed, at unix seconds) that counts a verdict in the
        ledger (`RedisStore.record_audit`); None counts verdicts in memory only."""
        self.pool, self.trusted = pool, frozenset(trusted)
        self.record = record
        self._writes: set[asyncio.Task] = set()
        self.rate, self.first_jobs = rate, first_jobs
        self._rng = rng or random.Random()
        self._queue: asyncio.Queue[AuditJob] = asyncio.Queue(QUEUE_LIMIT)
        self._seen: Counter[str] = Counter()  # jobs of each worker offered for audit
        self._pools: dict[str, Pool] = {}  # each worker's sampled evidence
        self.counts: Counter[str] = Counter()
        """audited, passed, failed, undecided, skipped_busy, skipped_full, per the whole run."""
        self.per_worker: dict[str, Counter] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.trusted:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._writes, return_exceptions=True)

    def offer(self, job: AuditJob) -> bool:
        """Consider a finished job (returns at once); True when it was queued for an audit."""
        if not self.trusted or job.worker in self.trusted or not job.token_ids:
            return False
        self._seen[job.worker] += 1
        if self._seen[job.worker] > self.first_jobs and self._rng.random() >= self.rate:
            return False
        try:
            self._queue.put_nowait(job)
            return True
        except asyncio.QueueFull:
            self._count(job.worker, "skipped_full")
            return False

    async def _run(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self.audit(job)
            except Exception:  # a bug must not stop the audits
                log.exception("audit of job %s failed", job.job_id)

    async def audit(self, job: AuditJob) -> bool | None:
        """Audit one job now: True passed, False failed (the worker is quarantined), None not
        decided (no trusted worker free, too little to judge)."""
        auditor = self._free_trusted(job)
        if auditor is None:
            self._count(job.worker, "skipped_busy")
            return None
        try:
            scores = await self.pool.score(auditor, list(job.prompt_ids), list(job.token_ids),
                                           job.temperature, SCORE_TIMEOUT_S)
        except WorkerLost as err:
            log.warning("audit of job %s skipped: %s", job.job_id, err)
            self._count(job.worker, "skipped_busy")
            return None
        verdict = judge(scores, job.temperature)
        passed = verdict.passed
        if job.temperature >= GREEDY_BELOW and passed is not False:
            pooled = self._pools.setdefault(job.worker, Pool()).add(scores)
            if pooled is False:
                passed = False
                verdict = type(verdict)(False, f"its sampled jobs together are less likely "
                                               f"under the target than chance allows (pooled "
                                               f"z = {self._pools[job.worker].z:.2f})",
                                        self._pools[job.worker].z)
        self._count(job.worker, "audited")
        self._count(job.worker, {True: "passed", False: "failed", None: "undecided"}[passed])
        if passed is not None:
            self._write(job.worker, passed)
        if passed is False:
            reason = f"failed the audit of job {job.job_id} on {auditor}: {verdict.reason}"
            log.warning("worker %s %s", job.worker, reason)
            self.pool.quarantines.add(job.worker, reason)
        return passed

    def _free_trusted(self, job: AuditJob) -> str | None:
        """A trusted worker of the job's model that can take work now, least loaded first."""
        ready = [w for w in self.pool.snapshots() if w.name in self.trusted and w.model ==
                 job.model and w.name != job.worker and routable(w)]
        return min(ready, key=lambda w: (w.queued_requests, w.name)).name if ready else None

    def _write(self, worker: str, passed: bool) -> None:
        """Count the verdict in the ledger, beside the audits (see the module's docstring)."""
        if self.record is None:
            return
        if len(self._writes) >= WRITES_LIMIT:
            log.warning("audit verdict on worker %s not counted in the ledger: %d writes "
                        "pending", worker, len(self._writes))
            return
        task = asyncio.create_task(self._record(worker, passed, time.time()))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _record(self, worker: str, passed: bool, at: float) -> None:
        try:
            await self.record(worker, passed, at)
        except StoreUnavailable as err:
            log.warning("audit verdict on worker %s not counted in the ledger: %s", worker, err)
        except Exception:  # dropped too: a ledger write must never stop the audits
            log.exception("audit verdict on worker %s not counted in the ledger", worker)

    def _count(self, worker: str, what: str) -> None:
        self.counts[what] += 1
        self.per_worker.setdefault(worker, Counter())[what] += 1
