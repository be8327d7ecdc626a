"""The engine loop of a worker: one thread that owns an `LLMEngine`, steps it while there is
work, and publishes the figures a worker reports.

Callers on other threads (the Ray actor's event loop) never touch the engine: `submit`,
`cancel` and `drain` queue a command that the loop thread runs between two steps, and each
returns a `concurrent.futures.Future` with the command's result or error. Every increment of a
request goes to the `sink` given at submit time, called on the loop thread; the last one has a
finish reason. If the loop dies, every open sink gets the exception instead.

Knows: the engine's public API, time, threads. Does not know: Ray, gRPC, which worker a job
goes to (`worker/actor.py` wraps this for Ray).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from sparkgrid.contract import Chunk, Resume, SamplingParams, SpecCounts, Usage
from sparkgrid.costs import SPSTable
from worker.engine.config import EngineConfig
from worker.engine.verify_policy import RowCostTable
from worker.worker_config import WorkerConfig

RECENT_REQUESTS = 256
"""Finished requests over which the mean accepted length is reported."""


def build_engine(config: WorkerConfig):
    """The worker's engine: weights loaded, SPS(B) profiled (or read from its cache)."""
    from worker.engine.engine import LLMEngine

    engine_config = EngineConfig(device=config.device, dtype=config.dtype, policy=config.policy,
                                 max_batch_tokens=config.max_batch_tokens,
                                 max_num_seqs=config.max_num_seqs,
                                 profile_sps=config.draft is not None,
                                 sps_cache_dir=config.sps_cache_dir,
                                 draft_vocab_size=config.draft_vocab_size)
    engine = LLMEngine.from_pretrained(config.target, config.draft, engine_config)
    if engine.sps is not None and config.emulate_slowdown > 1:
        # An emulated slower device is slower in everything it reports, its profile included
        # (which the prefix policy then plans with, as it would on such a device).
        engine.sps = SPSTable(engine.sps.batch_tokens,
                              [s / config.emulate_slowdown for s in engine.sps.steps_per_second])
        rows = engine.step_cost
        engine.step_cost = RowCostTable(
            rows.rows, [t * config.emulate_slowdown for t in rows.plain_seconds],
            [t * config.emulate_slowdown for t in rows.full_seconds], rows.gamma)
    return engine


class WorkerDraining(RuntimeError):
    """The worker is draining or stopped: it finishes running work and accepts no new."""


class WorkerFailed(RuntimeError):
    """The engine loop died or never loaded; the message says why."""


@dataclass
class StepReport:
    """What one engine step did, for metrics."""

    seconds: float
    """Wall time of the step, emulated slowdown included."""
    new_tokens: int
    """Tokens committed to requests in this step."""
    verify_tokens: int
    """Tokens of this step's target verify forward (0 for a prefill-only step)."""
    finished: list[tuple[str, float | None]] = field(default_factory=list)
    """(finish reason, mean accepted length or None) of each request that finished."""


class EngineLoop:
    """Runs one engine on its own thread. `load` builds the engine (on that thread)."""

    def __init__(self, config: WorkerConfig, load: Callable[[], object],
                 on_step: Callable[[StepReport], None] | None = None,
                 on_publish: Callable[[dict], None] | None = None):
        self.config = config
        self._load = load
        self._on_step = on_step or (lambda report: None)
        self._on_publish = on_publish or (lambda figures: None)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, Callable] = {}
        self._drain_waiters: list[Future] = []
        self._state = "loading"
        self._error: BaseException | None = None
        self._stopping = False
        self._started_at = time.time()
        self._heartbeat = self._ready_at = time.monotonic()
        self._recent_steps: deque[tuple[float, int]] = deque()  # (monotonic end time, new tokens)
        self._recent_accept: deque[float] = deque(maxlen=RECENT_REQUESTS)
        self._totals = {"requests": 0, "generated_tokens": 0}  # steps: the engine's own counter
        self._figures: dict = {}
        self.engine = None
        self._thread = threading.Thread(target=self._run, name=f"engine-{config.name}", daemon=True)

    # -- called from any thread -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def state(self) -> str:
        """`loading`, `ready`, `draining`, `failed` or `stopped`."""
        return self._state

    def submit(self, job_id: str, prompt: str | list[int], params: SamplingParams,
               sink: Callable[[Chunk | BaseException], None],
               resume: Resume | None = None) -> Future:
        """Queue a job (`resume`: continue one another worker began); the future resolves once
        the engine has accepted it (or raises ValueError naming the bad field, WorkerDraining,
        WorkerFailed)."""
        if not isinstance(job_id, str) or not job_id:
            raise ValueError(f"job_id: expected a non-empty string, got {job_id!r}")
        return self._command(lambda: self._add(job_id, prompt, params, sink, resume))

    def cancel(self, job_id: str) -> Future:
        """Abort a job between steps and free its cache; resolves True if it was running."""
        return self._command(lambda: self._abort(job_id))

    def score(self, prompt_ids: list[int], token_ids: list[int], temperature: float) -> Future:
        """An audit of another worker's output: the target's scores of `token_ids` after
        `prompt_ids` (`audit_score.score_tokens`, as a dict), computed between two steps."""
        from worker.engine.audit_score import score_tokens

        def run() -> dict:
            if self.engine is None:
                raise WorkerFailed(f"worker {self.config.name}: the engine is not loaded")
            return score_tokens(self.engine.runner.model, list(prompt_ids), list(token_ids),
                                float(temperature)).to_dict()
        return self._command(run)

    def drain(self) -> Future:
        """Accept no new jobs; resolves (with the figures) once running work has finished."""
        fut: Future = Future()

        def start_draining():
            if self._state == "ready":
                self._state = "draining"
            self._drain_waiters.append(fut)
            return None
        self._command(start_draining)
        return fut

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop: open jobs are aborted. Waits up to `timeout` for the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check_health(self) -> None:
        """Raise WorkerFailed when the loop died or failed to load, or is stuck in one step."""
        if self._error is not None:
            raise WorkerFailed(f"worker {self.config.name}: engine failed: {self._error!r}")
        if self._state == "loading":
            return
        if not self._thread.is_alive() and not self._stopping:
            raise WorkerFailed(f"worker {self.config.name}: the engine loop is not running")
        silent = time.monotonic() - self._heartbeat
        if silent > self.config.stuck_after_s:
            raise WorkerFailed(f"worker {self.config.name}: the engine loop has not advanced for "
                               f"{silent:.0f} s (limit {self.config.stuck_after_s:g} s)")

    def figures(self) -> dict:
        """The latest published queue and throughput figures, plus state and uptime."""
        figures = dict(self._figures)
        figures.update(state=self._state, uptime_s=time.time() - self._started_at,
                       error=None if self._error is None else repr(self._error))
        return figures

    def _command(self, fn: Callable) -> Future:
        fut: Future = Future()
        if self._error is not None or self._stopping:
            fut.set_exception(self._unavailable())
            return fut
        self._commands.put((fn, fut))
        self._wake.set()
        return fut

    def _unavailable(self) -> Exception:
        if self._error is not None:
            return WorkerFailed(f"worker {self.config.name}: engine failed: {self._error!r}")
        return WorkerDraining(f"worker {self.config.name} is stopped")

    # -- the loop thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._load()
            self._state = "ready" if self._state == "loading" else self._state
            self._ready_at = time.monotonic()
            self._publish()
            while not self._stopping:
                self._heartbeat = time.monotonic()
                self._run_commands()
                if self.engine.has_unfinished():
                    self._step()
                else:
                    self._publish()
                    self._resolve_drained()
                    self._wake.wait(0.5)
                    self._wake.clear()
            self._shut_down(WorkerDraining(f"worker {self.config.name} stopped"))
        except BaseException as err:  # the loop must report any death, never vanish silently
            self._error = err
            self._state = "failed"
            self._shut_down(WorkerFailed(f"worker {self.config.name}: engine failed: {err!r}"))

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except Exception as err:  # the caller's input was bad: it gets the error
                fut.set_exception(err)

    def _add(self, job_id, prompt, params, sink, resume) -> None:
        if self._state != "ready":
            raise WorkerDraining(f"worker {self.config.name} is {self._state}: it accepts no "
                                 "new jobs")
        self.engine.add_request(prompt, params, req_id=job_id, resume=resume)
        self._sinks[job_id] = sink
        self._totals["requests"] += 1

    def _abort(self, job_id: str) -> bool:
        out = self.engine.abort(job_id)
        if out is None:
            return False
        self._deliver([out])
        return True

    def _step(self) -> None:
        before = self.engine.counters.verify_tokens
        start = time.monotonic()
        outputs = self.engine.step()
        elapsed = time.monotonic() - start
        # a slower device, honestly: the step takes F x as long
        if self.config.emulate_slowdown > 1:
            time.sleep((self.config.emulate_slowdown - 1) * elapsed)
            elapsed = time.monotonic() - start
        new_tokens = sum(len(o.token_ids) for o in outputs)
        self._recent_steps.append((time.monotonic(), new_tokens))
        self._totals["generated_tokens"] += new_tokens
        finished = self._deliver(outputs)
        self._on_step(StepReport(elapsed, new_tokens, self.engine.counters.verify_tokens - before,
                                 finished))

    def _deliver(self, outputs) -> list[tuple[str, float | None]]:
        """Account for `outputs`, publish the figures, then hand each chunk to its sink: a
        caller that reads the stats after its chunk sees the state that chunk left."""
        finished, sends = [], []
        for out in outputs:
            sink = self._sinks.get(out.req_id)
            stats = out.stats
            spec = SpecCounts(draft_tokens=stats.draft_tokens_proposed,
                              verified_tokens=stats.tokens_verified,
                              accepted_tokens=stats.tokens_accepted,
                              spec_steps=len(stats.accept_lengths))
            usage = None
            if out.finished:
                mal = stats.mean_accept_length if stats.accept_lengths else None
                usage = Usage(prompt_tokens=stats.prompt_tokens,
                              completion_tokens=stats.completion_tokens)
                finished.append((out.finish_reason, mal))
                if mal is not None:
                    self._recent_accept.append(mal)
                self._sinks.pop(out.req_id, None)
            chunk = Chunk(out.req_id, tuple(out.token_ids), out.text,
                          out.finish_reason if out.finished else None, usage, spec)
            if sink is not None:
                sends.append((sink, chunk))
        self._publish()
        for sink, chunk in sends:
            sink(chunk)
        return finished

    def _resolve_drained(self) -> None:
        if self._drain_waiters and not self._sinks:
            for fut in self._drain_waiters:
                fut.set_result(self.figures())
            self._drain_waiters.clear()

    def _shut_down(self, reason: Exception) -> None:
        """Abort what is open; every sink and waiting caller learns `reason`."""
        if self._state != "failed":
            self._state = "stopped"
        for sink in self._sinks.values():
            sink(reason)
        self._sinks.clear()
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                break
            fut.set_exception(reason)
        for fut in self._drain_waiters:
            fut.set_result(self.figures())
        self._drain_waiters.clear()

    def _publish(self) -> None:
        """Recompute the reported figures (on the loop thread, the only reader of the engine)."""
        engine, now = self.engine, time.monotonic()
        window = self.config.rate_window_s
        while self._recent_steps and self._recent_steps[0][0] < now - window:
            self._recent_steps.popleft()
        span = min(window, now - self._ready_at)
        waiting, running = list(engine.waiting), list(engine.running)
        alloc = engine.kv.allocator
        self._figures = {
            "num_waiting": len(waiting),
            "num_running": len(running),
            "remaining_tokens": sum(r.params.max_tokens - len(r.output_ids)
                                    for r in waiting + running),
            "tokens_per_s": sum(n for _, n in self._recent_steps) / span if span > 0 else 0.0,
            "mean_accept_length": (sum(self._recent_accept) / len(self._recent_accept)
                                   if self._recent_accept else None),
            "batch_size": len(running),
            "cache_used_fraction": alloc.num_used_blocks / alloc.num_blocks,
            "cache_reserved_fraction": alloc.num_reserved_blocks / alloc.num_blocks,
            "sps": engine.sps,
            "steps": engine.counters.steps,
            **self._totals,
        }
        self._on_publish(self._figures)
