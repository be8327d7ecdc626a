"""The scheduler's view of the workers: discovery, their figures, and the calls that run jobs.
Every Ray call of the scheduler lives here (the figures boards' in `scheduler.figures`).

- Discovery: the named actors of the Ray namespace `sparkgrid` are listed every
  `discovery_interval_s`; a new one is adopted once its `stats()` answer like a worker's, its
  tokenizer is its model's and (with a `registry`) its operator signed its registration
  (`scheduler.registry`); a lost one (gone from the list, dead when called, its operator
  revoked) is dropped. Linked workers (`scheduler.link_server`) join through `adopt_linked`
  with a `LinkHandle` that the pool calls exactly like an actor's handle.
- Figures: workers push them to the figures boards, and the pool reads the boards' changes
  every `stats_interval_s` (`scheduler.figures`: one call per board, with the staleness bound;
  a worker whose pushes stop is unhealthy). An actor that does not push, and every worker while
  no board answers, is still called for its `stats()` and `check_health()` every interval. The
  pool calls `renew` only on the workers that stream its own jobs. Between two figures, the
  pool counts what it sent each worker and the worker has not yet reported accepting (its
  `requests` counter), so that a burst does not all land on the worker that looked idle.
- Candidates: per model, a `CandidateIndex` of its routable workers, updated as figures arrive
  and jobs are sent (O(log N) each), which the router samples (`snapshots()` hands it over).
- What a worker sends is read through the typed contract (`sparkgrid.contract`): figures
  that do not match it keep a worker out (or mark it unhealthy), a chunk that does not match
  it ends that worker's part of the job (the job resumes elsewhere).

Knows: Ray, the worker actor's methods, the contract. Does not know: gRPC, Redis, routing
policy (the candidate index orders workers; the router decides).
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray

from scheduler.figures import (
    CALL_TIMEOUT_S,
    LIVE_STATES,
    Boards,
    TrackedWorker,
    WorkerStatus,
    WorkerTime,
    stale_after,
)
from scheduler.link_handle import LinkHandle, LinkStream
from scheduler.model_info import ModelInfo
from scheduler.observed import ObservedSpeeds
from scheduler.quarantine import Quarantines
from scheduler.registry import Registry, lent_tokenizer_of, remember_model
from scheduler.router import CandidateIndex, PoolView
from scheduler.worker_errors import FAILED, GONE, NO_ANSWER, WorkerLost, WorkerRefused, first_line
from sparkgrid.board import is_board
from sparkgrid.contract import NAMESPACE, Chunk, ContractError, Resume, SamplingParams, WorkerStats

log = logging.getLogger(__name__)
JOB_LEASE_S = 10.0
"""A worker aborts a job of ours that it has not heard about for this long: every read of the
figures renews the leases of this scheduler's jobs on the workers that stream them, so only a
scheduler that died (or stalled this long) loses them. Ray itself would let an orphaned job
run to `max_tokens`."""
STRIKES_TO_QUARANTINE = 3
"""Jobs a worker may break the rules of before it gets no more (each one already fails over)."""


class WorkerPool:
    """Live workers and their figures; `start()` joins Ray and begins reading them."""

    def __init__(self, ray_address: str, stats_interval_s: float = 0.5,
                 discovery_interval_s: float = 2.0, stall_timeout_s: float = 60.0,
                 tokenizer_pins: dict[str, str] | None = None, figure_boards: int = 1,
                 figures_stale_s: float | None = None, registry: Registry | None = None):
        self.ray_address = ray_address
        self.registry = registry
        """None: any worker actor of the namespace is adopted (see `scheduler.registry`)."""
        self._link_registry: Registry | None = None  # the worker link's, once a worker linked
        self.tokenizer_pins = tokenizer_pins
        """Model -> SHA-256 of its tokenizer.json; None: the first worker of a model sets it."""
        self.stats_interval_s = stats_interval_s
        self.discovery_interval_s = discovery_interval_s
        self.stall_timeout_s = stall_timeout_s
        self.boards = Boards(figure_boards, stats_interval_s,
                             figures_stale_s or stale_after(stats_interval_s))
        """The figures boards; `boards.stale_after_s`: a worker silent that long is unhealthy."""
        self._workers: dict[str, TrackedWorker] = {}
        self._models: dict[str, ModelInfo] = {}
        self._tasks: list[asyncio.Task] = []
        self._time = WorkerTime()
        self._indexes: dict[str, CandidateIndex] = {}  # model -> its routable workers
        self._changed = asyncio.Event()
        self._refused: dict[str, str] = {}  # actor -> why its stats were refused (said once)
        self.quarantines = Quarantines(self._apply_quarantine)
        """Workers sent no jobs, shared with the other schedulers through the store."""
        self.observed = ObservedSpeeds(self._workers.get, self._index)  # what its streams showed

    # -- life ------------------------------------------------------------------------------
    async def start(self) -> None:
        if not ray.is_initialized():
            await asyncio.to_thread(ray.init, address=self.ray_address, namespace=NAMESPACE,
                                    logging_level="ERROR", log_to_driver=False)
        await self.boards.open()
        await self._discover()
        self._tasks = [asyncio.create_task(self._every(self.discovery_interval_s, self._discover)),
                       asyncio.create_task(self._every(self.stats_interval_s, self._read_all))]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _every(self, interval_s: float, fn) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await fn()
            except Exception:  # a bad round must not end the loop
                log.exception("worker pool: %s failed", fn.__name__)

    # -- what the scheduler reads ----------------------------------------------------------
    def snapshots(self) -> PoolView:
        """Per request, for the router: each model's candidate index, and every snapshot."""
        return PoolView(lambda: [self.observed.apply(w.snapshot()) for w in
                                 self._workers.values()], self._indexes)

    def stats(self) -> list[WorkerStatus]:
        """Each worker's latest figures, with its health and the pool's pending count."""
        return [WorkerStatus(w.stats, w.healthy, len(w.sent), w.quarantined, w.registered)
                for w in sorted(self._workers.values(), key=lambda w: w.name)]

    def read_since(self, t: float) -> bool:
        """Whether every worker's figures were read (successfully) after monotonic time `t`
        (a pushed heartbeat confirms the figures held: they are read as of the push)."""
        return all(w.figures_asked > t for w in self._workers.values())

    def worker_stats(self, name: str) -> WorkerStats | None:
        return None if (w := self._workers.get(name)) is None else w.stats

    def model(self, name: str) -> ModelInfo | None:
        return self._models.get(name)

    def models(self) -> list[str]:
        return sorted(self._models)

    async def wait_changed(self, timeout_s: float) -> None:
        """Return when the set of workers or their figures changed (or after `timeout_s`)."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    # -- running a job's part on one worker ------------------------------------------------
    async def generate(self, worker: str, job_id: str, prompt_ids: list[int],
                       params: SamplingParams, resume: Resume | None, budget_tokens: int):
        """Stream the worker's chunks of a job. Raises WorkerLost (resume elsewhere) or
        WorkerRefused (the worker says the input is bad). Closing the iterator early cancels
        the job on the worker."""
        w = self._workers.get(worker)
        if w is None:
            raise WorkerLost(f"worker {worker} is gone")
        entry = next((e for e in w.sent if e[0] == job_id), None) or self.note_dispatch(
            worker, job_id, budget_tokens)
        stream = w.handle.generate.remote(job_id, prompt_ids, params.to_dict(),
                                          None if resume is None else resume.to_dict(),
                                          JOB_LEASE_S)
        w.streaming.add(job_id)
        finished = started = False
        try:
            while not finished:
                chunk = await self._next_chunk(worker, stream)
                if chunk is None:
                    raise WorkerLost(f"worker {worker}: the stream ended without a finish")
                started, finished = True, chunk.finish_reason is not None
                yield chunk
        finally:
            w.streaming.discard(job_id)
            if entry in w.sent:  # not yet seen in the worker's figures
                w.sent.remove(entry)
                if started:  # it was accepted: its next figures count it, which is accounted here
                    w.accepted += 1
                self._index(w)
            if not finished:
                stream.close() if isinstance(stream, LinkStream) else ray.cancel(stream)
                asyncio.ensure_future(self.cancel(worker, job_id))

    def note_dispatch(self, worker: str, job_id: str, budget_tokens: int) -> list | None:
        """Count a job as sent to `worker` from the moment it is routed there, so that the
        routing decisions of a burst see each other (before any of them reaches the worker)."""
        w = self._workers.get(worker)
        if w is None:
            return None
        entry = [job_id, budget_tokens]
        w.sent.append(entry)
        self._index(w)
        return entry

    async def _next_chunk(self, worker: str, stream) -> Chunk | None:
        try:
            ref = await asyncio.wait_for(stream.__anext__(), self.stall_timeout_s)
            return Chunk.from_dict(await ref)
        except ContractError as err:  # a worker that breaks the contract serves nothing more
            log.warning("worker %s sent a bad chunk: %s", worker, err)
            self._mark_unhealthy(worker)
            raise WorkerLost(f"worker {worker} sent a bad chunk ({err})") from None
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            self._mark_unhealthy(worker)
            raise WorkerLost(f"worker {worker}: no output for {self.stall_timeout_s:g} s") from None
        except FAILED as err:
            cause = err.cause if isinstance(err.cause, BaseException) else err
            if isinstance(cause, ValueError):
                raise WorkerRefused(str(cause)) from None
            self._mark_unhealthy(worker)  # WorkerDraining, WorkerFailed: another worker may serve
            raise WorkerLost(f"worker {worker}: {type(cause).__name__}: {cause}") from None
        except GONE as err:
            self._drop(worker)
            raise WorkerLost(f"worker {worker} died: {first_line(err)}") from None
        except NO_ANSWER as err:
            self._mark_unhealthy(worker)
            raise WorkerLost(f"worker {worker}: {first_line(err)}") from None

    async def score(self, worker: str, prompt_ids: list[int], token_ids: list[int],
                    temperature: float, timeout_s: float) -> dict:
        """`worker`'s scores of another worker's output (an audit); raises WorkerLost when it
        cannot give them (gone, busy past `timeout_s`, failed)."""
        w = self._workers.get(worker)
        if w is None:
            raise WorkerLost(f"worker {worker} is gone")
        try:
            return await asyncio.wait_for(
                w.handle.score.remote(prompt_ids, token_ids, temperature), timeout_s)
        except (*NO_ANSWER, asyncio.TimeoutError) as err:
            raise WorkerLost(f"worker {worker} could not score: {first_line(err)}") from None

    async def cancel(self, worker: str, job_id: str) -> bool:
        w = self._workers.get(worker)
        if w is None:
            return False
        try:
            return await asyncio.wait_for(w.handle.cancel.remote(job_id), CALL_TIMEOUT_S)
        except (*NO_ANSWER, asyncio.TimeoutError):
            return False

    # -- discovery and figures --------------------------------------------------------------
    async def _discover(self) -> None:
        named = await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
        names = {a["name"] for a in named if a["namespace"] == NAMESPACE
                 and not is_board(a["name"])}
        registry = self.registry or self._link_registry  # revocations reach linked ones too
        revoked = await registry.revoked() if registry is not None else set()
        for name, w in list(self._workers.items()):  # linked workers are not Ray's to list
            if (operator := getattr(w.registered, "operator", None)) in revoked:
                self._drop(name, f"operator {operator}: its token was revoked")
            elif name not in names and not isinstance(w.handle, LinkHandle):
                self._drop(name)
        await asyncio.gather(*(self._adopt(n) for n in names - set(self._workers)))

    async def adopt_linked(self, handle: LinkHandle, registry: Registry) -> str | None:
        """Adopt a worker whose link `registry` checks; None, or why it is not adopted."""
        if handle.name in self._workers:
            return f"a worker named {handle.name} is serving already"
        self._link_registry = registry
        await self._adopt(handle.name, handle, registry)
        return None if handle.name in self._workers else self._refused.get(handle.name, "?")

    def drop_linked(self, handle: LinkHandle) -> None:
        if (w := self._workers.get(handle.name)) is not None and w.handle is handle:
            self._drop(handle.name)

    async def _adopt(self, name: str, handle=None, registry: Registry | None = None) -> None:
        registry = registry or self.registry
        try:
            if handle is None:
                handle = await asyncio.to_thread(ray.get_actor, name, namespace=NAMESPACE)
            raw = await asyncio.wait_for(handle.stats.remote(), CALL_TIMEOUT_S)
        except (ValueError, *NO_ANSWER, asyncio.TimeoutError, AttributeError):
            return  # gone again, not ready to answer, or no worker: the next round tries again
        try:  # its stats must keep the contract, its tokenizer must be its model's
            stats = WorkerStats.from_dict(raw)
            data, digest = await lent_tokenizer_of(handle, stats, self._models,
                                                   self.tokenizer_pins)
            registered = None if registry is None else await registry.check(
                name, await asyncio.wait_for(handle.registration.remote(), CALL_TIMEOUT_S),
                stats, digest)
            await remember_model(self._models, stats, data, digest)
        except (*NO_ANSWER, asyncio.TimeoutError, OSError, ValueError) as err:  # ContractError too
            if self._refused.get(name) != str(err):  # say it once per reason, not every round
                log.warning("actor %s is not adopted: %s", name, err)
                self._refused[name] = str(err)
            return
        self._refused.pop(name, None)
        if registered is not None:
            stats = registered.pin(stats, name)
        self._workers[name] = w = TrackedWorker(name, handle, stats, accepted=stats.requests,
                                                quarantined=self.quarantines.reason(name),
                                                registered=registered)
        self._index(w)
        log.info("worker %s joined (%s, %s)", name, stats.model_id, stats.gpu_type)
        self._changed.set()

    async def _read_all(self) -> None:
        unpushed = [w for w in self._workers.values() if w.pushed_at is None]
        # those not pushing are polled meanwhile: a slow board holds no one's figures back
        entries, _ = await asyncio.gather(self.boards.read(),  # None: no board answers
                                          asyncio.gather(*(self._read(w) for w in unpushed)))
        now = time.monotonic()
        for name, raw, health, age in entries or ():
            if (w := self._workers.get(name)) is not None:  # else: it is polled once adopted,
                self._pushed(w, raw, health, now - age)  # until it pushes its figures anew
        polled, renewed = [], []
        for w in list(self._workers.values()):
            if w in unpushed:
                continue
            if entries is None or w.pushed_at is None:
                polled.append(w)
                continue
            if w.healthy and now - w.pushed_at > self.boards.stale_after_s:
                log.warning("worker %s: no figures pushed for %.1f s: unhealthy", w.name,
                            now - w.pushed_at)
                w.healthy = False
                self._index(w)
            if w.streaming:
                renewed.append(w)
        await asyncio.gather(*(self._read(w) for w in polled), *(self._renew(w) for w in renewed))
        self._changed.set()

    def _pushed(self, w: TrackedWorker, raw: dict | None, health: str | None, at: float) -> None:
        """A push seen on a board at monotonic time `at`: figures, or (None) a heartbeat (of
        figures this pool never got from the board: it is polled until it has them)."""
        if raw is None and not w.pushed_figures:
            return
        w.pushed_at, w.pushed_figures = at, True
        if raw is not None:
            try:
                stats = WorkerStats.from_dict(raw)
                w.bad_figures = None
            except ContractError as err:  # its figures cannot be trusted: route nothing there
                if w.bad_figures != str(err):
                    log.warning("worker %s: its stats break the contract: %s", w.name, err)
                w.bad_figures = str(err)
        if w.bad_figures is not None or health is not None:  # health: as check_health raised
            w.healthy = False
            self._index(w)
            return
        self._take(w, w.stats if raw is None else stats, min(at, time.monotonic()))

    async def _renew(self, w: TrackedWorker) -> None:
        """Keep this scheduler's jobs alive on `w` (see JOB_LEASE_S)."""
        try:
            await asyncio.wait_for(w.handle.renew.remote(list(w.streaming), JOB_LEASE_S),
                                   CALL_TIMEOUT_S)
        except GONE:
            self._drop(w.name)
        except (*NO_ANSWER, asyncio.TimeoutError):
            pass  # its streams time out if it stays away

    async def _read(self, w: TrackedWorker) -> None:
        """Poll one worker: renew, `stats()`, `check_health()`."""
        asked = time.monotonic()
        try:
            if w.streaming:  # keep this scheduler's jobs alive there (see JOB_LEASE_S)
                await asyncio.wait_for(w.handle.renew.remote(list(w.streaming), JOB_LEASE_S),
                                       CALL_TIMEOUT_S)
            stats = WorkerStats.from_dict(
                await asyncio.wait_for(w.handle.stats.remote(), CALL_TIMEOUT_S))
            await asyncio.wait_for(w.handle.check_health.remote(), CALL_TIMEOUT_S)
        except ContractError as err:  # its figures cannot be trusted: route nothing there
            log.warning("worker %s: its stats break the contract: %s", w.name, err)
            w.healthy = False
            return self._index(w)
        except GONE:
            return self._drop(w.name)
        except FAILED:  # check_health: the engine loop failed or is stuck
            w.healthy = False
            return self._index(w)
        except (*NO_ANSWER, asyncio.TimeoutError):  # no answer: once is noise, twice is a problem
            w.failures += 1
            w.healthy = w.failures < 2
            return self._index(w)
        self._take(w, stats, asked)

    def _take(self, w: TrackedWorker, stats: WorkerStats, asked: float) -> None:
        """Good figures of `w`, as of monotonic time `asked`."""
        if w.registered is not None:  # its name, GPU type and price are the registration's
            stats = w.registered.pin(stats, w.name)
        w.failures, w.healthy = 0, stats.state in LIVE_STATES
        self._time.count(w, stats)
        w.figures_asked = max(w.figures_asked, asked)
        accepted_now = stats.requests
        for _ in range(max(0, accepted_now - w.accepted)):
            if w.sent:
                w.sent.popleft()
        w.accepted = accepted_now
        w.stats = stats
        self._index(w)

    def _index(self, w: TrackedWorker) -> None:
        """Put `w`'s current snapshot in its model's candidate index (O(log N)), if the pool
        still holds it: a read that was in flight when the worker was dropped (revoked, gone)
        must not put it back where the router finds it."""
        if self._workers.get(w.name) is not w:
            return
        snap = self.observed.apply(w.snapshot())
        if w.indexed_model not in (None, snap.model):
            self._indexes[w.indexed_model].remove(w.name)
        self._indexes.setdefault(snap.model, CandidateIndex()).put(snap)
        w.indexed_model = snap.model

    def take_worker_time(self) -> list[tuple[str, dict, str, int, int]]:
        """(worker, registration, day, online ms, active ms) counted since the last call."""
        return self._time.take()

    def give_back_worker_time(self, entries) -> None:
        """Entries `take_worker_time` returned that could not be stored: counted again later."""
        self._time.give_back(entries)

    def strike(self, name: str, reason: str) -> None:
        """`name` broke a rule of its job (budget, vocabulary, text; see `Dispatcher`): the job
        leaves it; at STRIKES_TO_QUARANTINE strikes it is quarantined (no more jobs)."""
        w = self._workers.get(name)
        if w is None:
            return
        w.strikes.append(reason)
        log.warning("worker %s: strike %d: %s", name, len(w.strikes), reason)
        if len(w.strikes) >= STRIKES_TO_QUARANTINE and w.quarantined is None:
            self.quarantines.add(name, f"{len(w.strikes)} strikes; the last: {reason}")

    def _apply_quarantine(self, name: str) -> None:
        w = self._workers.get(name)
        if w is not None and w.quarantined != self.quarantines.reason(name):
            w.quarantined = self.quarantines.reason(name)
            self._index(w)
            self._changed.set()

    def _mark_unhealthy(self, name: str) -> None:
        if (w := self._workers.get(name)) is not None:
            w.healthy = False  # until its next good figures
            self._index(w)

    def _drop(self, name: str, why: str = "dropped by the scheduler") -> None:
        w = self._workers.pop(name, None)
        if w is not None:
            if isinstance(w.handle, LinkHandle):
                w.handle.close(why)
            if w.indexed_model is not None:
                self._indexes[w.indexed_model].remove(name)
            log.info("worker %s left", name)
            self._changed.set()
