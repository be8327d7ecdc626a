"""A linked worker as the pool calls it: the same methods as a worker actor's handle
(`handle.generate.remote(...)`, `handle.stats.remote()`, ...), carried by the worker's link
instead of Ray, so that routing, failover, leases, audits and billing treat linked and
in-cluster workers alike (`scheduler/link_server.py` runs the link itself).

What goes down is queued for the link's writer; what comes up is handed here by the link's
reader (`took_chunk`, `job_ended`, `took_score`, `took_figures`). Errors are this module's:
`LinkGone` (the link closed: the worker is dead to this scheduler), `LinkCallFailed` (the call
failed on the worker; `cause` is a ValueError when the input was refused), both `LinkError`s;
the pool handles them as it handles the matching Ray errors.

Bounds: at most `MAX_PENDING_CHUNKS` chunks wait per job for the dispatcher to read them, and
at most `MAX_QUEUED_DOWN` messages wait to go down; beyond either, the link is closed (a worker
that floods, or a link that cannot keep up, is a lost worker, and its jobs resume elsewhere).

Knows: the worker contract's JSON, the link's messages. Does not know: gRPC (the server reads
and writes), routing, Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

from protos import worker_pb2 as pb

MAX_PENDING_CHUNKS = 1024
MAX_QUEUED_DOWN = 4096
SILENT_AFTER_S = 5.0
"""A link with no message from its worker for this long is unhealthy and then dropped."""


class LinkError(Exception):
    """A call over a worker link did not give an answer."""


class LinkGone(LinkError):
    """The link closed: the worker is dead to this scheduler."""


class LinkCallFailed(LinkError):
    """The call failed on the worker; `cause` says how (a ValueError: the input was refused)."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class _Ready:
    """An already-known value, awaitable like a Ray object ref."""

    def __init__(self, value):
        self._value = value

    def __await__(self):
        if False:  # a generator that returns at once
            yield
        return self._value


class LinkStream:
    """One job's chunks from a linked worker, iterated like Ray's streaming generator."""

    def __init__(self, handle: LinkHandle, job_id: str):
        self._handle, self.job_id = handle, job_id
        self._queue: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            raise StopAsyncIteration
        return _Ready(item)

    def put(self, item) -> None:
        if not isinstance(item, BaseException) and self._queue.qsize() >= MAX_PENDING_CHUNKS:
            self._handle.close(f"job {self.job_id}: more than {MAX_PENDING_CHUNKS} chunks "
                               "unread")
            return
        self._queue.put_nowait(item)

    def close(self) -> None:
        """The scheduler is done with the job (finished, or given up: then cancelled there)."""
        if not self.closed:
            self.closed = True
            self._handle._streams.pop(self.job_id, None)


class _Method:
    def __init__(self, call):
        self.remote = call


class LinkHandle:
    """The pool's handle of one linked worker."""

    def __init__(self, name: str, stats: dict, tokenizer_files: dict, registration: dict):
        self.name = name
        self.closed: str | None = None  # why the link closed
        self._figures, self._files, self._signed = stats, tokenizer_files, registration
        self._health: str | None = None
        self._heard = time.monotonic()
        self.down: asyncio.Queue = asyncio.Queue()
        """ToWorker messages for the link's writer; None ends the writer."""
        self._streams: dict[str, LinkStream] = {}
        self._scores: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count(1)
        for method in ("stats", "check_health", "renew", "cancel", "score", "tokenizer_files",
                       "registration"):
            setattr(self, method, _Method(getattr(self, "_" + method)))
        self.generate = _Method(self._generate)

    # -- the actor's methods, over the link -------------------------------------------------
    def _generate(self, job_id: str, prompt_ids, params: dict, resume: dict | None,
                  lease_s: float) -> LinkStream:
        stream = LinkStream(self, job_id)
        if self.closed is not None:
            stream.put(LinkGone(f"worker {self.name}: its link closed ({self.closed})"))
            return stream
        self._streams[job_id] = stream
        self._send(pb.ToWorker(generate=pb.Generate(
            job_id=job_id, prompt_ids=list(prompt_ids), params_json=json.dumps(params),
            resume_json=json.dumps(resume) if resume is not None else "", lease_s=lease_s)))
        return stream

    async def _stats(self) -> dict:
        self._check_open()
        return self._figures

    async def _check_health(self) -> None:
        self._check_open()
        silent = time.monotonic() - self._heard
        if silent > SILENT_AFTER_S:
            raise LinkCallFailed(RuntimeError(f"its link has been silent for {silent:.1f} s"))
        if self._health:
            raise LinkCallFailed(RuntimeError(self._health))

    async def _renew(self, job_ids, lease_s: float) -> list:
        self._check_open()
        self._send(pb.ToWorker(renew=pb.Renew(job_ids=list(job_ids), lease_s=lease_s)))
        return []

    async def _cancel(self, job_id: str) -> bool:
        self._check_open()
        self._send(pb.ToWorker(cancel=pb.Cancel(job_id=job_id)))
        return True

    async def _score(self, prompt_ids, token_ids, temperature: float) -> dict:
        self._check_open()
        call_id = next(self._call_ids)
        future = self._scores[call_id] = asyncio.get_running_loop().create_future()
        self._send(pb.ToWorker(score=pb.Score(call_id=call_id, prompt_ids=list(prompt_ids),
                                              token_ids=list(token_ids),
                                              temperature=temperature)))
        try:
            return await future
        finally:
            self._scores.pop(call_id, None)

    async def _tokenizer_files(self) -> dict:
        return self._files

    async def _registration(self) -> dict:
        return self._signed

    # -- what the link's reader hands over --------------------------------------------------
    def heard(self) -> None:
        self._heard = time.monotonic()

    def took_figures(self, stats: dict | None, health: str) -> None:
        if stats is not None:
            self._figures = stats
        self._health = health or None

    def took_chunk(self, job_id: str, chunk: dict) -> None:
        stream = self._streams.get(job_id)
        if stream is None:
            return  # a job given up on (cancelled there): its late chunks are dropped
        stream.put(chunk)

    def job_ended(self, job_id: str, error: str, kind: str) -> None:
        stream = self._streams.get(job_id)
        if stream is not None:
            cause = ValueError(error) if kind == "invalid" else RuntimeError(error)
            stream.put(LinkCallFailed(cause))

    def took_score(self, call_id: int, result: dict | None, error: str) -> None:
        future = self._scores.get(call_id)
        if future is not None and not future.done():
            if error or result is None:
                future.set_exception(LinkCallFailed(RuntimeError(error or "no result")))
            else:
                future.set_result(result)

    def close(self, why: str) -> None:
        """The link is gone: every open call and stream ends with LinkGone."""
        if self.closed is not None:
            return
        self.closed = why
        gone = LinkGone(f"worker {self.name}: its link closed ({why})")
        for stream in list(self._streams.values()):
            stream.put(gone)
        self._streams.clear()
        for future in self._scores.values():
            if not future.done():
                future.set_exception(gone)
        self.down.put_nowait(None)

    def _check_open(self) -> None:
        if self.closed is not None:
            raise LinkGone(f"worker {self.name}: its link closed ({self.closed})")

    def _send(self, message) -> None:
        if self.down.qsize() >= MAX_QUEUED_DOWN:
            self.close(f"more than {MAX_QUEUED_DOWN} messages could not be sent")
            raise LinkGone(f"worker {self.name}: its link cannot keep up")
        self.down.put_nowait(message)
