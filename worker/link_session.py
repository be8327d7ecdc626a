"""One worker link: a worker's side of the `WorkerLink.Link` stream (`protos/worker.proto`).

A `LinkSession` dials the head (TLS unless told otherwise), sends `Hello` (the registration,
signed afresh with the operator token, the tokenizer files and the figures), waits for
`Welcome`, then serves the head's orders with the worker it is given:

- `Generate` streams the job's chunks up, one `JobChunk` each; a job the worker refuses ends
  with `JobEnded` of kind `invalid` (a ValueError, the input was bad) and one it cannot run with
  kind `failed`; `Cancel`, `Renew` and `Score` are forwarded (`Score` answered by its
  `ScoreResult`);
- figures: every `figures_poll_s` the worker's stats and health are read, and `Figures` go up
  when they changed, else an empty one (a heartbeat) at least every `heartbeat_s`.

Everything going up passes one bounded queue that feeds the stream's request iterator, so a head
that reads slowly makes the job streams wait instead of this process's memory grow.

A link that drops (the head unreachable, the stream ended or reset) is a dead worker to the
head, which resumes its jobs elsewhere: the session cancels those jobs on the worker and dials
again after a backoff (`backoff_first_s` doubling to `backoff_max_s`, full jitter), with a new
`Hello`. Answers that no retry can change end `run()` with `LinkRefused`, whose text says what
to fix: the token (UNAUTHENTICATED), the worker's name or registration (PERMISSION_DENIED,
ALREADY_EXISTS before the first welcome), the hello (INVALID_ARGUMENT), the head's certificate
or its TLS (before the first welcome; a head that welcomed this worker once is dialled again).

The worker is anything with the methods of `Worker` (the Ray actor behind an adapter in
`worker/link.py`, a fake in the tests): it raises ValueError for bad input and `WorkerGone` once
the worker is dead, which ends the session.

Knows: gRPC, the worker link's messages, the order of a link. Does not know: Ray, the engine,
what the head does with what it is sent.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import grpc

from protos import worker_pb2 as pb
from protos import worker_pb2_grpc as pb_grpc
from sparkgrid.registration import Registration

FATAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
         grpc.StatusCode.INVALID_ARGUMENT}
"""Answers that end the session at any time; ALREADY_EXISTS and TLS failures end it only
before its first welcome (later they are a stale link of its own, or a head restarting)."""
CERTIFICATE_WORDS = ("certificate", "CERTIFICATE")
NOT_TLS_WORDS = ("WRONG_VERSION_NUMBER",)
UNREACHABLE_WORDS = ("failed to connect", "Connection refused", "errors resolving",
                     "Name or service not known", "No route to host", "timed out",
                     "Deadline Exceeded")
MAX_ORDER_BYTES = 64 << 20
"""Largest message taken from the head (a `Generate` carries a whole prompt's token ids)."""


class WorkerGone(Exception):
    """The worker behind the link died: the link ends (its jobs resume elsewhere)."""


class LinkRefused(Exception):
    """The head refused the link for a reason that retrying cannot fix; the text says what to
    fix and names the option."""


class Worker(Protocol):
    """What the session needs of a worker (`worker/link.py` adapts the Ray actor to it)."""

    def generate(self, job_id: str, prompt_ids: list[int], params: dict, resume: dict | None,
                 lease_s: float | None) -> AsyncIterator[dict]: ...
    async def cancel(self, job_id: str) -> bool: ...
    async def renew(self, job_ids: list[str], lease_s: float) -> list[str]: ...
    async def score(self, prompt_ids: list[int], token_ids: list[int],
                    temperature: float) -> dict: ...
    async def tokenizer_files(self) -> dict[str, bytes]: ...
    async def stats(self) -> dict: ...
    async def check_health(self) -> None: ...


@dataclass(frozen=True)
class Head:
    """Where the worker link of the platform's head is, and how this worker proves itself."""

    address: str
    """HOST:PORT of the head's worker link (`up.json`'s `worker_link`)."""
    token: str
    """The operator token; sent as `authorization: Bearer <token>` and signs the registration."""
    ca_file: str | None = None
    """PEM root certificates that the head's certificate must chain to; None: the system's."""
    plaintext: bool = False
    """No TLS (a head on this machine or a private network only)."""

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.plaintext:
            return None
        return grpc.ssl_channel_credentials(
            Path(self.ca_file).read_bytes() if self.ca_file else None)


@dataclass(frozen=True)
class LinkSettings:
    """The session's clocks and sizes (the tests shorten them)."""

    queue_size: int = 256
    """Messages waiting to go up; a full queue makes the job streams wait."""
    figures_poll_s: float = 0.5
    """How often the worker's stats and health are read."""
    heartbeat_s: float = 1.0
    """Most time between two `Figures` (the head drops a link silent for 5 s)."""
    backoff_first_s: float = 0.5
    """The first reconnection's most delay; it doubles per failed try up to `backoff_max_s`."""
    backoff_max_s: float = 30.0
    welcome_timeout_s: float = 30.0
    """How long the head may take to answer a hello before the try counts as failed."""
    keepalive_s: float = 20.0
    """HTTP/2 pings: a head that vanished without closing the connection is noticed."""


class _Dropped(Exception):
    """This connection is over; dial again. `key`: what makes two drops the same news."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key or message


class LinkSession:
    """One worker's link to the head: `await run()` until `stop()`, `LinkRefused` or
    `WorkerGone`."""

    def __init__(self, worker: Worker, record: Registration, head: Head,
                 settings: LinkSettings = LinkSettings(), say: Callable[[str], None] = print):
        if record.kind != "linked":
            raise ValueError(f"registration.kind: expected 'linked', got {record.kind!r}")
        self.worker = worker
        self.record = record
        self.head = head
        self.settings = settings
        self.say = say
        self.name = record.worker
        self.welcome: pb.Welcome | None = None
        """The head's latest welcome; None before the first."""
        self.hellos = 0
        """Hellos sent (one per connection tried)."""
        self.outbox: asyncio.Queue | None = None
        """The current connection's queue of messages going up."""
        self._stopping = asyncio.Event()
        self._jobs: dict[str, asyncio.Task] = {}
        self._side_tasks: set[asyncio.Task] = set()
        self._said: set[str] = set()  # what was said during this outage (each is said once)
        self._tokenizer_files: dict[str, bytes] | None = None

    def stop(self) -> None:
        """End the session: the link is closed and `run()` returns."""
        self._stopping.set()

    async def run(self) -> None:
        """Keep the link up until `stop()`; raises LinkRefused or WorkerGone."""
        failures = 0
        while not self._stopping.is_set():
            welcomed = self.welcome
            try:
                await self._connect_once()
            except _Dropped as drop:
                self._say_once(drop.key, f"link {self.name}: {drop}")
            if self.welcome is not welcomed:  # this connection was welcomed: a new outage
                failures = 0
            limit = min(self.settings.backoff_max_s, self.settings.backoff_first_s * 2 ** failures)
            failures += 1
            try:  # full jitter: many workers dropped at once do not dial back together
                await asyncio.wait_for(self._stopping.wait(), random.uniform(0, limit))
            except asyncio.TimeoutError:
                pass

    # -- one connection --------------------------------------------------------------------
    async def _connect_once(self) -> None:
        """Dial, say hello, serve until the link ends (raises _Dropped) or `stop()` (returns)."""
        s = self.settings
        options = [("grpc.keepalive_time_ms", int(s.keepalive_s * 1000)),
                   ("grpc.keepalive_timeout_ms", int(s.keepalive_s * 500)),
                   ("grpc.max_receive_message_length", MAX_ORDER_BYTES),
                   ("grpc.max_send_message_length", -1)]
        credentials = self.head.credentials()
        channel = (grpc.aio.insecure_channel(self.head.address, options=options)
                   if credentials is None else
                   grpc.aio.secure_channel(self.head.address, credentials, options=options))
        self.outbox = outbox = asyncio.Queue(s.queue_size)
        call = None
        try:
            await outbox.put(pb.FromWorker(hello=await self._hello()))
            self.hellos += 1
            call = pb_grpc.WorkerLinkStub(channel).Link(
                _drain(outbox), metadata=(("authorization", f"Bearer {self.head.token}"),))
            serving = asyncio.create_task(self._serve(call, outbox))
            stopping = asyncio.create_task(self._stopping.wait())
            try:
                await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (serving, stopping):
                    task.cancel()
                await asyncio.gather(serving, stopping, return_exceptions=True)
            if not serving.cancelled():
                serving.result()  # the link ended on its own: why
        except grpc.aio.AioRpcError as err:
            raise self._verdict(err.code(), err.details() or "") from None
        finally:
            await self._drop_jobs()
            if call is not None:
                call.cancel()
            await channel.close(grace=None)

    async def _hello(self) -> pb.Hello:
        if self._tokenizer_files is None:
            self._tokenizer_files = await self.worker.tokenizer_files()
        signed = replace(self.record, issued_at=time.time()).sign(self.head.token)
        return pb.Hello(registration_json=json.dumps(signed), tokenizer_files=self._tokenizer_files,
                        stats_json=json.dumps(await self.worker.stats()))

    async def _serve(self, call, outbox: asyncio.Queue) -> None:
        try:
            first = await asyncio.wait_for(call.read(), self.settings.welcome_timeout_s)
        except asyncio.TimeoutError:
            raise _Dropped(f"the head at {self.head.address} did not answer the hello in "
                           f"{self.settings.welcome_timeout_s:g} s; dialling again") from None
        if first is grpc.aio.EOF:
            raise _Dropped("the head ended the link before its welcome; dialling again")
        if first.WhichOneof("message") != "welcome":
            raise _Dropped(f"the head sent {first.WhichOneof('message')} before its welcome "
                           "(a head of another version?); dialling again")
        self.welcome = first.welcome
        self._said.clear()
        self.say(f"link {self.name}: linked to {self.head.address} as worker "
                 f"{first.welcome.worker} of operator {first.welcome.operator}")
        figures = asyncio.create_task(self._send_figures(outbox))
        orders = asyncio.create_task(self._take_orders(call, outbox))
        try:
            done, _ = await asyncio.wait({figures, orders}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # WorkerGone, AioRpcError, _Dropped
        finally:
            for task in (figures, orders):
                task.cancel()
            await asyncio.gather(figures, orders, return_exceptions=True)

    async def _take_orders(self, call, outbox: asyncio.Queue) -> None:
        while True:
            order = await call.read()
            if order is grpc.aio.EOF:
                raise _Dropped("the head ended the link; dialling again")
            kind = order.WhichOneof("message")
            if kind == "generate":
                job = order.generate
                if job.job_id in self._jobs:  # the head's mistake: the first run goes on
                    await outbox.put(_ended(job.job_id, "invalid",
                                            "job_id: this job already runs on this link"))
                else:
                    self._jobs[job.job_id] = asyncio.create_task(self._run_job(job, outbox))
            elif kind == "cancel":
                self._aside(self.worker.cancel(order.cancel.job_id))
            elif kind == "renew":
                self._aside(self.worker.renew(list(order.renew.job_ids), order.renew.lease_s))
            elif kind == "score":
                self._aside(self._score(order.score, outbox))
            # a second welcome, or an order newer than this worker: nothing to do

    async def _run_job(self, job: pb.Generate, outbox: asyncio.Queue) -> None:
        finished = False
        try:
            params = json.loads(job.params_json) if job.params_json else {}
            resume = json.loads(job.resume_json) if job.resume_json else None
            async for chunk in self.worker.generate(job.job_id, list(job.prompt_ids), params,
                                                    resume, job.lease_s or None):
                finished = chunk.get("finish_reason") is not None
                await outbox.put(pb.FromWorker(chunk=pb.JobChunk(
                    job_id=job.job_id, chunk_json=json.dumps(chunk))))
                if finished:
                    break
            if not finished:
                await outbox.put(_ended(job.job_id, "failed",
                                        "the worker's stream ended without a finish"))
        except ValueError as err:  # the input was refused (json.JSONDecodeError is one too)
            await outbox.put(_ended(job.job_id, "invalid", str(err)))
        except Exception as err:  # WorkerGone, WorkerDraining, WorkerFailed: another may serve
            await outbox.put(_ended(job.job_id, "failed", f"{type(err).__name__}: {err}"))
        finally:
            self._jobs.pop(job.job_id, None)

    async def _score(self, order: pb.Score, outbox: asyncio.Queue) -> None:
        try:
            result = await self.worker.score(list(order.prompt_ids), list(order.token_ids),
                                             order.temperature)
            answer = pb.ScoreResult(call_id=order.call_id, result_json=json.dumps(result))
        except Exception as err:
            answer = pb.ScoreResult(call_id=order.call_id,
                                    error=f"{type(err).__name__}: {err}")
        await outbox.put(pb.FromWorker(score=answer))

    async def _send_figures(self, outbox: asyncio.Queue) -> None:
        s = self.settings
        sent_stats, sent_health, sent_at = None, "", time.monotonic()
        while True:
            await asyncio.sleep(s.figures_poll_s)
            stats, health = await self._figures()
            stats_json = "" if stats is None else json.dumps(stats)
            changed = bool(stats_json) and stats_json != sent_stats
            # a figure sent now keeps the next poll from coming too late for the heartbeat
            if changed or health != sent_health or \
                    time.monotonic() - sent_at >= s.heartbeat_s - s.figures_poll_s / 2:
                await outbox.put(pb.FromWorker(figures=pb.Figures(
                    stats_json=stats_json if changed else "", health_error=health)))
                sent_stats = stats_json if changed else sent_stats
                sent_health, sent_at = health, time.monotonic()

    async def _figures(self) -> tuple[dict | None, str]:
        """The worker's stats (None when it could not say) and why it is unhealthy ('' if not);
        WorkerGone when it is dead."""
        try:
            stats = await self.worker.stats()
        except WorkerGone:
            raise
        except Exception as err:
            return None, f"stats: {type(err).__name__}: {err}"
        try:
            await self.worker.check_health()
        except WorkerGone:
            raise
        except Exception as err:
            return stats, str(err) or type(err).__name__
        return stats, ""

    def _aside(self, coroutine) -> None:
        """Run a forwarded order beside the stream (its failure is the head's to notice)."""
        task = asyncio.create_task(coroutine)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_done)

    def _side_done(self, task: asyncio.Task) -> None:
        self._side_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            err = task.exception()
            message = f"link {self.name}: an order failed: {type(err).__name__}: {err}"
            self._say_once(message, message)

    async def _drop_jobs(self) -> None:
        """The link is gone, and the head resumes its jobs elsewhere: stop them here."""
        dropped = list(self._jobs)
        tasks = list(self._jobs.values()) + list(self._side_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._jobs.clear()
        results = await asyncio.gather(*(self.worker.cancel(job_id) for job_id in dropped),
                                       return_exceptions=True)
        gone = next((r for r in results if isinstance(r, WorkerGone)), None)
        if gone is not None:
            raise gone

    # -- why a connection ended ------------------------------------------------------------
    def _verdict(self, code: grpc.StatusCode, details: str) -> Exception:
        """LinkRefused for an answer that retrying cannot change, else _Dropped."""
        address, first = self.head.address, self.welcome is None
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return LinkRefused(f"--token: refused by the head: {details}; ask the platform for a "
                               "new token")
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return LinkRefused(f"--name {self.name}: refused by the head: {details}; a worker "
                               "name belongs to the operator that registered it first")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return LinkRefused(f"the head refused this worker's hello: {details}")
        if code == grpc.StatusCode.ALREADY_EXISTS:
            if first:
                return LinkRefused(f"--name {self.name}: the head already has a link of that "
                                   f"worker name open ({details}); choose another --name, or "
                                   "stop the worker that holds it")
            return _Dropped("the head still holds this worker's previous link; dialling again")
        if code == grpc.StatusCode.UNAVAILABLE and any(w in details for w in CERTIFICATE_WORDS):
            message = (f"--ca: the head's certificate is not trusted ({details}); give the "
                       "certificate of the CA that signed it with --ca FILE")
            return LinkRefused(message) if first else _Dropped(message)
        if code == grpc.StatusCode.UNAVAILABLE and any(w in details for w in NOT_TLS_WORDS):
            message = (f"--join {address}: the head does not speak TLS there ({details}); is it "
                       "the worker link's port? (--plaintext is for a head without TLS)")
            return LinkRefused(message) if first else _Dropped(message)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and \
                any(w in details for w in UNREACHABLE_WORDS):
            hint = "; is it a head with TLS? (without --plaintext)" if self.head.plaintext else ""
            return _Dropped(f"head {address}: nothing answers ({details}); dialling again with "
                            f"backoff until it does{hint}", key="unreachable")
        return _Dropped(f"the link dropped ({code.name}: {details}); dialling again")

    def _say_once(self, key: str, message: str) -> None:
        """Say it once per outage: a head that stays down is not a line per try."""
        if key not in self._said:
            self._said.add(key)
            self.say(message)


def _ended(job_id: str, kind: str, error: str) -> pb.FromWorker:
    return pb.FromWorker(ended=pb.JobEnded(job_id=job_id, kind=kind, error=error))


async def _drain(outbox: asyncio.Queue) -> AsyncIterator[pb.FromWorker]:
    """The stream's request iterator: what the outbox holds, as gRPC can send it."""
    while True:
        yield await outbox.get()
