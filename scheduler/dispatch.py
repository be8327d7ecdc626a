"""Running one job: record it, route it, stream it, fail it over, bill it.

`Dispatcher.run(tenant, request)` is an async iterator of `Piece`s (new text and token ids; the
last one has the finish reason and usage). Around the stream:
- the job is recorded (state `queued`) before any work; a repeated `request_id` of the tenant
  gets the first job's result instead of a second run;
- each part runs on the worker the router picks; if that worker dies or its stream breaks, the
  job resumes on another one from the prompt plus the tokens already delivered, with the rest
  of the budget and the same sampling settings (`Resume` tells the new worker how much text the
  client has, so nothing is repeated or lost); after `max_attempts` workers it fails;
- closing the iterator (client gone, deadline, `cancel`) aborts the job on its worker;
- the end is written once, atomically, with the bill counted here from what was delivered
  (`LedgerWriter` retries it while Redis is down; the store's final-state check makes the
  retry safe).

Knows: the job's life, the store's and pool's interfaces. Does not know: gRPC, Ray, redis.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from contextlib import aclosing
from dataclasses import dataclass, field

from scheduler.config import SchedulerConfig
from scheduler.errors import (InvalidArgument, NotFound, ResourceExhausted, StoreUnavailable,
                              Unavailable)
from scheduler.jobs import FINAL, JobState
from scheduler.ledger import Bill, Segment
from scheduler.metrics import Metrics
from scheduler.prices import Plan, PriceBook
from scheduler.quota import Admission
from scheduler.requests import JobRequest
from scheduler.router import Router
from scheduler.worker_pool import WorkerLost, WorkerRefused
from sparkgrid.contract import Chunk, Resume, SpecCounts

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 1.0
REPEAT_POLL_S = 0.2
NO_WORKER_WAIT_S = 10.0  # how long a failover waits for a worker to take the job


@dataclass
class Piece:
    """What the client gets next."""

    job_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: dict | None = None
    """Last piece only: prompt_tokens and completion_tokens, as billed."""


@dataclass(frozen=True)
class Decision:
    """One routing decision, for metrics and benchmarks."""

    job_id: str
    worker: str
    route_s: float
    """Time the router took to choose."""
    overhead_s: float
    """Time from the job's arrival here (its request checked) to this decision: writing the
    job record and routing, the scheduler's own cost before a worker gets the job."""


@dataclass
class _Run:
    """A job in flight on this scheduler."""

    job_id: str
    tenant: str
    request: JobRequest
    plan: Plan
    arrived: float = field(default_factory=time.perf_counter)
    worker: str | None = None
    cancelled: bool = False
    delivered_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    parts: list[_Part] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def delivered_chars(self) -> int:
        return sum(map(len, self.text))

    def segments(self) -> list[Segment]:
        """Each worker's part so far, as the ledger books it."""
        return [part.segment() for part in self.parts]


class Dispatcher:
    def __init__(self, config: SchedulerConfig, pool, store, ledger_writer: LedgerWriter,
                 owner: str, prices: PriceBook, metrics: Metrics | None = None,
                 router: Router | None = None):
        self.config = config
        self.prices = prices
        self.metrics = metrics or Metrics(config.policy)
        self.pool = pool
        self.store = store
        self.ledger = ledger_writer
        self.owner = owner
        self.router = router or Router(config.policy)
        self._runs: dict[str, _Run] = {}
        self.decisions: deque[Decision] = deque(maxlen=100_000)
        """The latest routing decisions, oldest first."""

    # -- the public operations ---------------------------------------------------------------
    async def run(self, tenant: str, request: JobRequest):
        """Pieces of the job's output; raises a SchedulerError before or during the stream."""
        arrived = time.perf_counter()
        self._check_capacity(request.model)
        new_id = secrets.token_hex(12)
        plan = self.prices.plan(await self.store.tenant_plan(tenant))
        now = time.time()
        admission = Admission(plan.limits, len(request.prompt_ids) + request.max_tokens, now)
        job_id, created = await self.store.create_job({
            "job_id": new_id, "tenant": tenant, "model": request.model,
            "request_id": request.request_id, "params": request.params(),
            "owner": self.owner, "created_at": now}, admission)
        if not created and job_id != new_id:  # (the same id: a retried write that had landed)
            yield await self._repeat(tenant, job_id)
            return
        run = _Run(job_id, tenant, request, plan, arrived)
        self._runs[job_id] = run
        state, finish_reason = JobState.FAILED, None
        try:
            async with aclosing(self._attempts(run)) as pieces:
                async for piece in pieces:
                    finish_reason = piece.finish_reason
                    yield piece
            state = JobState.CANCELLED if finish_reason == "abort" else JobState.FINISHED
        except (asyncio.CancelledError, GeneratorExit):
            state, finish_reason = JobState.CANCELLED, "abort"
            raise
        finally:
            self._runs.pop(job_id, None)
            self.ledger.finish(self._final_record(run, state, finish_reason))

    async def cancel(self, tenant: str, job_id: str) -> tuple[bool, str]:
        """Abort a running job of the tenant; (cancelled now?, state after)."""
        run = self._runs.get(job_id)
        if run is not None and run.tenant == tenant:
            run.cancelled = True
            if run.worker is not None:
                await self.pool.cancel(run.worker, job_id)
            return True, JobState.CANCELLED.value
        record = await self.store.get_job(job_id)
        if record is None or record["tenant"] != tenant:
            raise NotFound(f"job_id: no job {job_id!r}")
        return False, record["state"]

    def progress(self, job_id: str) -> dict | None:
        """Live figures of a job running here (the store has them only once it ends)."""
        run = self._runs.get(job_id)
        if run is None:
            return None
        return {"workers": list(run.workers), "completion_tokens": len(run.delivered_ids),
                "prompt_tokens": len(run.request.prompt_ids), "spec": _spec_totals(run.segments())}

    # -- running ------------------------------------------------------------------------------
    async def _attempts(self, run: _Run):
        req = run.request
        tried: set[str] = set()
        while True:
            if len(tried) >= self.config.max_attempts:
                raise Unavailable(f"job {run.job_id} failed after {len(tried)} attempts: "
                                  + "; ".join(run.errors))
            worker = await self._choose(run, frozenset(tried))
            tried.add(worker)
            try:
                async with aclosing(self._one_part(run, worker)) as pieces:
                    async for piece in pieces:
                        yield piece
                return
            except WorkerLost as err:
                run.errors.append(str(err))
                log.warning("job %s: %s; resuming elsewhere", run.job_id, err)
                self.metrics.failovers.labels(req.model).inc()
                if len(run.delivered_ids) >= req.max_tokens or run.cancelled:
                    yield self._last_piece(run, "abort" if run.cancelled else "length")
                    return
            except WorkerRefused as err:
                raise InvalidArgument.from_message(str(err)) from None

    async def _choose(self, run: _Run, exclude: frozenset[str]) -> str:
        budget = run.request.max_tokens - len(run.delivered_ids)
        deadline = time.monotonic() + (NO_WORKER_WAIT_S if run.workers else 0)
        while True:
            start = time.perf_counter()
            chosen = self.router.choose(self.pool.snapshots(), run.request.model, budget, exclude)
            if chosen is not None:
                now = time.perf_counter()
                self.decisions.append(Decision(run.job_id, chosen.name, now - start,
                                               now - run.arrived))
                self.metrics.routed_to(chosen.name)
                self.pool.note_dispatch(chosen.name, run.job_id, budget)
                return chosen.name
            if time.monotonic() >= deadline:
                why = "; ".join(run.errors) or "none is ready"
                raise Unavailable(f"model {run.request.model}: no live worker can take job "
                                  f"{run.job_id} ({why})")
            await self.pool.wait_changed(0.5)

    async def _one_part(self, run: _Run, worker: str):
        req = run.request
        budget = req.max_tokens - len(run.delivered_ids)
        resume = (Resume(token_ids=tuple(run.delivered_ids), num_chars=run.delivered_chars())
                  if run.delivered_ids else None)
        run.worker = worker
        run.workers.append(worker)
        await self._store_quietly(self.store.start_job(run.job_id, worker, time.time()))
        stats = self.pool.worker_stats(worker)
        part = _Part(worker, stats.gpu_type if stats is not None else "unknown",
                     len(req.prompt_ids) + len(run.delivered_ids))
        run.parts.append(part)
        last_progress = time.monotonic()
        stream = self.pool.generate(worker, run.job_id, list(req.prompt_ids), req.params(budget),
                                    resume, budget)
        inflight = self.metrics.inflight.labels(worker)
        inflight.inc()
        try:
            async for chunk in stream:
                if chunk.token_ids and not run.delivered_ids:
                    self.metrics.ttft.labels(req.model).observe(time.perf_counter() - run.arrived)
                if chunk.finish_reason == "abort" and not run.cancelled:
                    raise WorkerLost(f"worker {worker} aborted the job by itself")
                run.delivered_ids.extend(chunk.token_ids)
                run.text.append(chunk.text)
                part.add(chunk)
                if chunk.finish_reason is not None:
                    yield self._last_piece(run, chunk.finish_reason, chunk.text, chunk.token_ids)
                    return
                yield Piece(run.job_id, chunk.text, list(chunk.token_ids))
                if time.monotonic() - last_progress >= PROGRESS_EVERY_S:
                    last_progress = time.monotonic()
                    await self._store_quietly(self.store.record_progress(
                        run.job_id, len(run.delivered_ids), time.time()))
        finally:
            run.worker = None
            inflight.dec()
            await stream.aclose()

    def _last_piece(self, run: _Run, reason: str, text: str = "", token_ids=()) -> Piece:
        return Piece(run.job_id, text, list(token_ids), reason, self._usage(run))

    @staticmethod
    def _usage(run: _Run) -> dict:
        return {"prompt_tokens": len(run.request.prompt_ids),
                "completion_tokens": len(run.delivered_ids)}

    def _check_capacity(self, model: str) -> None:
        workers = [w for w in self.pool.snapshots()
                   if w.model == model and w.state == "ready" and w.healthy]
        if not workers:
            raise Unavailable(f"model {model}: no live worker serves it now")
        if all(w.queued_requests >= self.config.max_queue_per_worker for w in workers):
            raise ResourceExhausted(f"model {model}: every worker's queue is full "
                                    f"({self.config.max_queue_per_worker} requests); retry later",
                                    retry_after_s=1.0)

    async def _store_quietly(self, write) -> None:
        """A write during the job (the final record repeats it): Redis down must not stop it."""
        try:
            await write
        except StoreUnavailable as err:
            log.warning("job store: %s (the final record will carry it)", err)

    def _final_record(self, run: _Run, state: JobState, finish_reason: str | None) -> dict:
        usage = self._usage(run)
        now = time.time()
        charge = self.prices.charge_uusd(run.plan, run.request.model, usage["prompt_tokens"],
                                         usage["completion_tokens"])
        segments = tuple(run.segments())
        bill = Bill(run.job_id, run.tenant, run.request.model, now, usage["prompt_tokens"],
                    usage["completion_tokens"], segments, charge)
        fields = {"finish_reason": finish_reason or "", "finished_at": now,
                  "charge_uusd": charge, "plan": run.plan.name, "price_version": self.prices.version,
                  "error": "; ".join(run.errors) if state is JobState.FAILED else "",
                  "workers": list(run.workers), "segments": [s.__dict__ for s in segments],
                  "spec": _spec_totals(segments), "text": "".join(run.text),
                  "token_ids": list(run.delivered_ids), **usage}
        return {"job_id": run.job_id, "state": state, "fields": fields, "bill": bill}

    # -- a repeated request_id ------------------------------------------------------------------
    async def _repeat(self, tenant: str, job_id: str) -> Piece:
        """The first job's result, once it has one (the caller's deadline bounds the wait)."""
        while True:
            record = await self.store.get_job(job_id)
            if record is None or record["tenant"] != tenant:
                raise NotFound(f"request_id: its job {job_id} is gone")
            if JobState(record["state"]) in FINAL:
                break
            await asyncio.sleep(REPEAT_POLL_S)
        if record["state"] == JobState.FAILED.value:
            raise Unavailable(f"request_id: its job {job_id} failed: {record.get('error', '')}")
        return Piece(job_id, record.get("text", ""), list(record.get("token_ids") or []),
                     record.get("finish_reason") or "abort",
                     {"prompt_tokens": record.get("prompt_tokens", 0),
                      "completion_tokens": record.get("completion_tokens", 0)},)


class _Part:
    """One worker's part of a job, as the scheduler saw it."""

    def __init__(self, worker: str, gpu_type: str, prompt_tokens: int):
        self.worker, self.gpu_type, self.prompt_tokens = worker, gpu_type, prompt_tokens
        self.started = time.monotonic()
        self.last = self.started
        self.completion_tokens = 0
        self.spec = SpecCounts()

    def add(self, chunk: Chunk) -> None:
        self.completion_tokens += len(chunk.token_ids)
        self.spec = chunk.spec  # a running total: the latest chunk's
        self.last = time.monotonic()

    def segment(self) -> Segment:
        return Segment(self.worker, self.gpu_type, self.prompt_tokens, self.completion_tokens,
                       draft_tokens=self.spec.draft_tokens,
                       verified_tokens=self.spec.verified_tokens,
                       accepted_tokens=self.spec.accepted_tokens,
                       spec_steps=self.spec.spec_steps,
                       busy_ms=round(1000 * (self.last - self.started)))


def _spec_totals(segments) -> dict:
    return {k: sum(getattr(s, k) for s in segments)
            for k in ("draft_tokens", "verified_tokens", "accepted_tokens", "spec_steps")}


class LedgerWriter:
    """Writes each job's end to the store, retrying while the store is down; the store's
    final-state check makes a retried write bill nothing twice."""

    def __init__(self, store, retry_s: float = 1.0):
        self.store = store
        self.retry_s = retry_s
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def finish(self, record: dict) -> None:
        self._queue.put_nowait(record)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued record is written (True), or `timeout_s` passes (False)."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            record = await self._queue.get()
            while True:
                try:
                    await self.store.finish_job(record["job_id"], record["state"],
                                                record["fields"], record["bill"])
                    break
                except StoreUnavailable as err:
                    log.warning("ledger: job %s not yet written (%s); retrying",
                                record["job_id"], err)
                    await asyncio.sleep(self.retry_s)
                except Exception:  # a bug or a vanished job: log it, never stop the writer
                    log.exception("ledger: job %s could not be written", record["job_id"])
                    break
            self._queue.task_done()
