"""Running one job: record it, route it, stream it, fail it over, bill it.

`Dispatcher.run(tenant, request)` is an async iterator of `Piece`s (new text and token ids; the
last one has the finish reason and usage). Around the stream:
- the job is recorded (state `queued`) before any work; a repeated `request_id` of the tenant
  gets the first job's result instead of a second run;
- when every worker of the model is full, the job waits in its tenant's FIFO of the model's
  `FairQueue` (`fair_queue.py`: round-robin across tenants, bounded); its place is taken before
  the job is recorded (a refusal records nothing) and held until the router has counted it on
  a worker. Capacity frees as jobs end here or the pool's figures change (`pool.wait_changed`).
  A job that never left the queue (cancelled, closed, timed out) is billed nothing;
- each part runs on the worker the router picks; if that worker dies or its stream breaks, the
  job resumes on another one from the prompt plus the tokens already delivered, with the rest
  of the budget and the same sampling settings (`Resume` tells the new worker how much text the
  client has, so nothing is repeated or lost); after `max_attempts` workers it fails;
- closing the iterator (client gone, deadline, `cancel`) aborts the job on its worker;
- its end (finished, failed, cancelled) goes to `billing.settle` with what was delivered:
  each worker's part is measured as it streams (`billing.Part`), and the bill is made and
  written once there.

Knows: the job's life, the store's and pool's interfaces. Does not know: prices, how a job is
billed, gRPC, Ray, redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import deque
from contextlib import aclosing

from scheduler.auditor import AuditJob
from scheduler.billing import Billing, Part, usage
from scheduler.config import SchedulerConfig
from scheduler.errors import (
    InvalidArgument,
    NotFound,
    StoreUnavailable,
    Unavailable,
)
from scheduler.fair_queue import FairQueue, QueueLimits, QueueRefused, Ticket
from scheduler.job_run import Decision, Piece, Run
from scheduler.jobs import FINAL, JobState
from scheduler.ledger import spec_totals
from scheduler.metrics import Metrics
from scheduler.quota import Admission
from scheduler.requests import JobRequest
from scheduler.router import Router, room
from scheduler.text_check import ContentCheck
from scheduler.worker_pool import WorkerLost, WorkerRefused
from sparkgrid.contract import Chunk, Resume

log = logging.getLogger(__name__)
PROGRESS_NOTES = "after every chunk a client is sent, one write in flight per job"
"""How a job's delivered tokens are noted in the store (its bill, should this scheduler die):
in the background after each streamed chunk, coalesced, so a note lags by the chunks of one
Redis round trip and a hung Redis never holds a stream. A `Complete` notes nothing."""
REPEAT_POLL_S = 0.2
NO_WORKER_WAIT_S = 10.0  # how long a failover waits for a worker to take the job
WATCH_S = 0.25  # while jobs wait, the queues are pumped at least this often


class Dispatcher:
    def __init__(self, config: SchedulerConfig, pool, store, billing: Billing, owner: str,
                 metrics: Metrics | None = None, router: Router | None = None, auditor=None):
        self.config = config
        self.auditor = auditor  # an `Auditor`, or None: no audits
        self.metrics = metrics or Metrics(config.policy)
        self.pool = pool
        self.store = store
        self.billing = billing
        self.owner = owner
        self.router = router or Router(config.policy)
        self._runs: dict[str, Run] = {}
        self._limits = QueueLimits(config.max_waiting_per_tenant, config.max_waiting_per_model,
                                   config.max_queue_wait_s)
        self._queues: dict[str, FairQueue] = {}
        self._watcher: asyncio.Task | None = None
        self.decisions: deque[Decision] = deque(maxlen=100_000)
        """The latest routing decisions, oldest first."""

    # -- the public operations ---------------------------------------------------------------
    async def run(self, tenant: str, request: JobRequest, streamed: bool = True):
        """Pieces of the job's output; raises a SchedulerError before or during the stream."""
        arrived = time.perf_counter()
        queue = self._queue(request.model)  # Unavailable when no live worker serves the model
        ticket = self._enter(queue, tenant, request.model)  # QueueRefused past a bound
        try:
            new_id = secrets.token_hex(12)
            plan = await self.billing.plan(tenant)
            now = time.time()
            admission = Admission(plan.limits, len(request.prompt_ids) + request.max_tokens, now)
            job_id, created = await self.store.create_job({
                "job_id": new_id, "tenant": tenant, "model": request.model,
                "request_id": request.request_id, "params": request.params(),
                "prompt_sha256": hashlib.sha256(request.prompt.encode()).hexdigest(),
                "owner": self.owner, "created_at": now,
                # what an orphan's bill needs, should this scheduler die (`billing.orphan_end`)
                "prompt_tokens": len(request.prompt_ids), "plan": plan.name}, admission)
            if not created and job_id != new_id:  # (the same id: a retried write that had landed)
                ticket.release()
                yield await self._repeat(tenant, job_id, request)
                return
            run = Run(job_id, tenant, request, plan, arrived, ticket=ticket, streamed=streamed)
            self._runs[job_id] = run
            state, finish_reason = JobState.FAILED, None
            try:
                await self._admit(run)
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
                self.billing.settle(run.end(state, finish_reason))
                if self.auditor is not None and state is JobState.FINISHED and \
                        len(set(run.workers)) == 1:  # one worker's output, whole: auditable
                    self.auditor.offer(AuditJob(job_id, run.workers[0], request.model,
                                                request.prompt_ids, tuple(run.delivered_ids),
                                                request.temperature))
        finally:
            ticket.release()
            queue.pump()  # the slot this job held on a worker may be free now

    async def cancel(self, tenant: str, job_id: str) -> tuple[bool, str]:
        """Abort a running job of the tenant; (cancelled now?, state after)."""
        run = self._runs.get(job_id)
        if run is not None and run.tenant == tenant:
            run.cancelled = True
            if run.ticket is not None:
                run.ticket.cancel()  # a waiting job leaves the queue (and is billed nothing)
            if run.worker is not None:
                await self.pool.cancel(run.worker, job_id)
            return True, JobState.CANCELLED.value
        record = await self.store.get_job(job_id)
        if record is None or record["tenant"] != tenant:
            raise NotFound(f"job_id: no job {job_id!r}")
        return False, record["state"]

    def holds(self, job_id: str) -> bool:
        """Whether the job waits or runs here (an open job of ours that does not is a stray)."""
        return job_id in self._runs

    def progress(self, job_id: str) -> dict | None:
        """Live figures of a job running here (the store has them only once it ends)."""
        run = self._runs.get(job_id)
        if run is None:
            return None
        return {"workers": list(run.workers), "completion_tokens": len(run.delivered_ids),
                "prompt_tokens": len(run.request.prompt_ids), "spec": spec_totals(run.segments())}

    # -- running ------------------------------------------------------------------------------
    async def _attempts(self, run: Run):
        req = run.request
        tried: set[str] = set()
        while True:
            if run.cancelled:  # asked while it was being routed or failed over: it stops here
                yield self._last_piece(run, "abort")
                return
            if len(tried) >= self.config.max_attempts:
                raise Unavailable(f"job {run.job_id} failed after {len(tried)} attempts: "
                                  + "; ".join(run.errors))
            worker = await self._choose(run, frozenset(tried))
            if run.ticket is not None:  # the pool counts the job on its worker now
                run.ticket.release()
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

    async def _choose(self, run: Run, exclude: frozenset[str]) -> str:
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

    async def _one_part(self, run: Run, worker: str):
        req = run.request
        budget = req.max_tokens - len(run.delivered_ids)
        resume = (Resume(token_ids=tuple(run.delivered_ids), num_chars=run.delivered_chars())
                  if run.delivered_ids else None)
        run.worker = worker
        run.workers.append(worker)
        await self._store_quietly(self.store.start_job(run.job_id, worker, time.time()))
        if run.cancelled:  # during that write: the worker never gets the job
            yield self._last_piece(run, "abort")
            return
        stats = self.pool.worker_stats(worker)
        part = Part(worker, stats.gpu_type if stats is not None else "unknown",
                    len(req.prompt_ids) + len(run.delivered_ids))
        run.parts.append(part)
        stream = self.pool.generate(worker, run.job_id, list(req.prompt_ids), req.params(budget),
                                    resume, budget)
        inflight = self.metrics.inflight.labels(worker)
        inflight.inc()
        try:
            async for chunk in stream:
                if run.cancelled and chunk.finish_reason is None:
                    # the worker may not have heard the cancel yet: nothing more is delivered
                    # (or billed); closing the stream cancels the job there
                    yield self._last_piece(run, "abort")
                    return
                if chunk.token_ids and not run.delivered_ids:
                    self.metrics.ttft.labels(req.model).observe(time.perf_counter() - run.arrived)
                if chunk.finish_reason == "abort" and not run.cancelled:
                    raise WorkerLost(f"worker {worker} aborted the job by itself")
                if (broken := self._broken_rule(run, chunk)) is not None:
                    self.pool.strike(worker, broken)  # nothing of this chunk is delivered
                    raise WorkerLost(f"worker {worker} {broken}")
                run.delivered_ids.extend(chunk.token_ids)
                run.text.append(chunk.text)
                self.pool.observed.saw(part, chunk)  # before part.add moves part.last
                part.add(chunk)
                if chunk.finish_reason is not None:
                    yield self._last_piece(run, chunk.finish_reason, chunk.text, chunk.token_ids)
                    return
                yield Piece(run.job_id, chunk.text, list(chunk.token_ids))
                if run.streamed:
                    self._note_progress(run)
        finally:
            run.worker = None
            inflight.dec()
            await stream.aclose()

    def _broken_rule(self, run: Run, chunk: Chunk) -> str | None:
        """What is wrong with a worker's chunk, or None: the scheduler never delivers (so never
        bills) more than the job's max_tokens, nor a token outside the model's vocabulary, nor
        text other than its own decoding of the delivered tokens (`scheduler/text_check.py`)."""
        total = len(run.delivered_ids) + len(chunk.token_ids)
        if total > run.request.max_tokens:
            return (f"sent {total} tokens for a job of max_tokens {run.request.max_tokens}")
        info = self.pool.model(run.request.model)
        if run.content is None and info is not None:
            run.content = ContentCheck(info.tokenizer, info.vocab_size, run.request.prompt_ids,
                                       run.request.stop)
        return (run.content.check(chunk.token_ids, chunk.text, chunk.finish_reason is not None)
                if run.content is not None else None)

    def _last_piece(self, run: Run, reason: str, text: str = "", token_ids=()) -> Piece:
        return Piece(run.job_id, text, list(token_ids), reason,
                     usage(run.prompt_tokens(), run.segments(), reason != "abort"))

    # -- waiting for capacity -------------------------------------------------------------------
    def _room(self, model: str) -> int | None:
        """Free request slots on the model's ready workers (the pool counts what this scheduler
        dispatched at once); None when no live worker serves it."""
        return room(self.pool.snapshots(), model, self.config.max_queue_per_worker)

    def _queue(self, model: str) -> FairQueue:
        queue = self._queues.get(model)
        if queue is None:
            if self._room(model) is None:  # (no queue, nor metric label, for unserved models)
                raise Unavailable(f"model {model}: no live worker serves it now")
            queue = self._queues[model] = FairQueue(lambda: self._room(model), self._limits,
                                                    f"model {model}")
            self.metrics.queued.labels(model).set_function(lambda: queue.waiting)
        return queue

    def _enter(self, queue: FairQueue, tenant: str, model: str) -> Ticket:
        try:
            ticket = queue.enter(tenant)
        except QueueRefused as err:
            self.metrics.queue_refusals.labels(model, err.limit).inc()
            raise
        if ticket.waiting and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.create_task(self._watch_pool())
        return ticket

    async def _admit(self, run: Run) -> None:
        """Wait for the job's turn; a job cancelled meanwhile goes on to end at once."""
        try:
            admitted = await run.ticket.wait()
        except (QueueRefused, Unavailable) as err:
            run.errors.append(str(err))  # for the job's record
            if isinstance(err, QueueRefused):
                self.metrics.queue_refusals.labels(run.request.model, err.limit).inc()
            raise
        if admitted:
            run.admitted = True
            self.metrics.queue_wait.labels(run.request.model).observe(run.ticket.waited_s())

    async def _watch_pool(self) -> None:
        """While jobs wait: let them through as the pool's figures change."""
        while any(queue.waiting for queue in self._queues.values()):
            await self.pool.wait_changed(WATCH_S)
            for queue in list(self._queues.values()):
                try:
                    queue.pump()
                except Exception:  # a bad round must not strand the waiting jobs
                    log.exception("pumping the queue of %s failed", queue.what)

    async def _store_quietly(self, write) -> bool:
        """A write during the job (the final record repeats it): Redis down must not stop it."""
        try:
            await write
            return True
        except StoreUnavailable as err:
            log.warning("job store: %s (the final record will carry it)", err)
            return False

    def _note_progress(self, run: Run) -> None:
        """Note the tokens sent so far (see PROGRESS_NOTES); returns at once."""
        if run.progress_write is None or run.progress_write.done():
            run.progress_write = asyncio.create_task(self._write_progress(run))

    async def _write_progress(self, run: Run) -> None:
        noted = -1
        while noted != len(run.delivered_ids):
            noted = len(run.delivered_ids)
            if not await self._store_quietly(self.store.record_progress(run.job_id, noted,
                                                                        time.time())):
                return  # Redis is away: the next chunk tries again

    # -- a repeated request_id ------------------------------------------------------------------
    async def _repeat(self, tenant: str, job_id: str, request: JobRequest) -> Piece:
        """The first job's result, once it has one (the caller's deadline bounds the wait).
        A repeat must ask for what the first asked: another prompt, model or parameter is
        refused, naming the field (as a payment API refuses a reused idempotency key)."""
        checked = False
        while True:
            record = await self.store.get_job(job_id)
            if record is None or record["tenant"] != tenant:
                raise NotFound(f"request_id: its job {job_id} is gone")
            if not checked:
                _same_request(record, request)
                checked = True
            if JobState(record["state"]) in FINAL:
                break
            await asyncio.sleep(REPEAT_POLL_S)
        if record["state"] == JobState.FAILED.value:
            raise Unavailable(f"request_id: its job {job_id} failed: {record.get('error', '')}")
        return Piece(job_id, record.get("text", ""), list(record.get("token_ids") or []),
                     record.get("finish_reason") or "abort",
                     {"prompt_tokens": record.get("prompt_tokens", 0),
                      "completion_tokens": record.get("completion_tokens", 0)},)



def _same_request(record: dict, request: JobRequest) -> None:
    """InvalidArgument naming the first field in which `request` differs from the job that
    first used its request_id (jobs recorded before prompts were hashed skip that check)."""
    first = {"model": record.get("model"), "prompt": record.get("prompt_sha256"),
             **(record.get("params") or {})}
    now = {"model": request.model,
           "prompt": hashlib.sha256(request.prompt.encode()).hexdigest(),
           **request.params().to_dict()}
    for name, value in now.items():
        was = first.get(name)
        if name == "prompt" and was is None:
            continue
        if (list(was) if isinstance(was, (list, tuple)) else was) != \
                (list(value) if isinstance(value, (list, tuple)) else value):
            raise InvalidArgument(name, f"request_id {request.request_id!r} was first used "
                                        f"with another {name}; a repeat must ask the same")
