"""The worker link on the head: the door for workers outside the platform's Ray cluster
(`protos/worker.proto`, service `sparkgrid.v1.WorkerLink`, on its own port, TLS unless told).

A link: the operator token in the call's metadata is checked first (a missing, malformed,
unknown or revoked one ends the call UNAUTHENTICATED); then the worker's `Hello`: its
registration must be signed with that very token (PERMISSION_DENIED otherwise: no operator can
speak for another's worker), for the kind `linked`, for the model and tokenizer the worker
serves; the registration is written to Redis like an in-cluster worker's (a name another
operator registered is PERMISSION_DENIED). Then the worker joins the pool through a
`LinkHandle`, and from there routing, failover, leases, audits, billing and draining treat it
like any worker. The link's end (the worker's process gone, the network cut, the worker silent
past the pool's stale bound, its operator revoked: the pool's discovery round sees that and
closes the link) drops it from the pool: its jobs resume
elsewhere from the tokens already delivered.

Knows: gRPC, the link's messages, the token check. Does not know: routing, how a job runs.
"""

from __future__ import annotations

import asyncio
import json
import logging

import grpc

from protos import worker_pb2 as pb
from protos import worker_pb2_grpc
from scheduler.errors import SchedulerError, Unauthenticated
from scheduler.link_handle import LinkHandle
from scheduler.registry import Registry
from sparkgrid.contract import ContractError, WorkerStats
from sparkgrid.registration import Registration, token_id_of

log = logging.getLogger(__name__)
HELLO_TIMEOUT_S = 30.0


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class LinkServicer(worker_pb2_grpc.WorkerLinkServicer):
    """Serves `WorkerLink.Link` for one scheduler's pool."""

    def __init__(self, pool, store):
        self.pool = pool
        self.store = store
        self.registry = Registry(store, kind="linked")
        self.links: dict[str, LinkHandle] = {}  # worker -> its open link

    async def Link(self, request_iterator, context):  # noqa: N802 (gRPC's name)
        try:
            operator, token = await self._operator(context)
            handle = await self._hello(context, operator, token)
        except _Refused as err:
            log.warning("worker link from %s refused: %s", context.peer(), err)
            await context.abort(err.code, str(err))
            return
        self.links[handle.name] = handle
        log.info("worker %s linked (operator %s, from %s)", handle.name, operator,
                 context.peer())
        reader = asyncio.create_task(self._read(context, handle))
        try:
            await context.write(pb.ToWorker(welcome=pb.Welcome(worker=handle.name,
                                                               operator=operator)))
            while (message := await handle.down.get()) is not None:
                await context.write(message)
        except (grpc.aio.AioRpcError, asyncio.CancelledError, RuntimeError) as err:
            handle.close(f"the link failed: {type(err).__name__}")
        finally:
            reader.cancel()
            handle.close(handle.closed or "the link ended")
            self.links.pop(handle.name, None)
            self.pool.drop_linked(handle)
            log.info("worker %s unlinked: %s", handle.name, handle.closed)
        if "revoked" in (handle.closed or ""):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, handle.closed)

    async def _operator(self, context) -> tuple[str, str]:
        metadata = dict(context.invocation_metadata() or ())
        header = metadata.get("authorization", "")
        if not header.startswith("Bearer "):
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "operator token: missing; send the "
                           "metadata `authorization: Bearer <token>`")
        token = header.removeprefix("Bearer ").strip()
        try:
            return await self.store.authenticate_operator(token), token
        except Unauthenticated as err:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, str(err)) from None
        except SchedulerError as err:  # Redis down: the worker retries
            raise _Refused(grpc.StatusCode.UNAVAILABLE, str(err)) from None

    async def _hello(self, context, operator: str, token: str) -> LinkHandle:
        try:
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise _Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"hello: none within {HELLO_TIMEOUT_S:g} s") from None
        if first is grpc.aio.EOF or first.WhichOneof("message") != "hello":
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "hello: the first message of a "
                           "link must be its Hello")
        hello = first.hello
        raw = _json(hello.registration_json, "hello.registration_json")
        stats = _json(hello.stats_json, "hello.stats_json")
        try:
            if Registration.token_id_in(raw) != token_id_of(token):
                raise _Refused(grpc.StatusCode.PERMISSION_DENIED, "registration: signed for "
                               f"another operator's token, not {operator}'s")
            WorkerStats.from_dict(stats)
        except (ValueError, ContractError) as err:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        name = raw.get("worker") if isinstance(raw.get("worker"), str) else ""
        if name in self.links:
            raise _Refused(grpc.StatusCode.ALREADY_EXISTS, f"worker {name}: a link of that name "
                           "is open already")
        handle = LinkHandle(name, stats, dict(hello.tokenizer_files), raw)
        why = await self.pool.adopt_linked(handle, self.registry)
        if why is not None:
            code = (grpc.StatusCode.PERMISSION_DENIED
                    if "another operator" in why or "signature" in why
                    else grpc.StatusCode.ALREADY_EXISTS if "serving already" in why
                    else grpc.StatusCode.INVALID_ARGUMENT)
            raise _Refused(code, f"worker {name}: {why}")
        return handle

    async def _read(self, context, handle: LinkHandle) -> None:
        """Hand what comes up to the handle, until the link ends."""
        try:
            while (message := await context.read()) is not grpc.aio.EOF:
                handle.heard()
                kind = message.WhichOneof("message")
                if kind == "figures":
                    figures = message.figures
                    stats = (_json(figures.stats_json, "figures.stats_json")
                             if figures.stats_json else None)
                    handle.took_figures(stats, figures.health_error)
                elif kind == "chunk":
                    handle.took_chunk(message.chunk.job_id,
                                      _json(message.chunk.chunk_json, "chunk.chunk_json"))
                elif kind == "ended":
                    handle.job_ended(message.ended.job_id, message.ended.error,
                                     message.ended.kind)
                elif kind == "score":
                    score = message.score
                    handle.took_score(score.call_id, _json(score.result_json, "score")
                                      if score.result_json else None, score.error)
            handle.close("the worker ended the link")
        except _Refused as err:
            handle.close(f"it sent a bad message: {err}")
        except (grpc.aio.AioRpcError, RuntimeError) as err:
            handle.close(f"the link failed: {type(err).__name__}")


def _json(text: str, field: str):
    try:
        value = json.loads(text)
    except ValueError as err:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: not JSON ({err})") from None
    if not isinstance(value, dict):
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: expected a JSON object")
    return value


async def start_link_server(pool, store, host: str, port: int, tls: tuple[bytes, bytes] | None
                            ) -> tuple[grpc.aio.Server, int, LinkServicer]:
    """The link's own gRPC server, started; (server, bound port, servicer). `tls`: (PEM
    certificate chain, PEM key), or None for plaintext."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                                      ("grpc.keepalive_time_ms", 20_000),
                                      ("grpc.keepalive_timeout_ms", 10_000),
                                      ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                                      ("grpc.keepalive_permit_without_calls", 1)])
    servicer = LinkServicer(pool, store)
    worker_pb2_grpc.add_WorkerLinkServicer_to_server(servicer, server)
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, grpc.ssl_server_credentials([tls[::-1]]))
             if tls is not None else server.add_insecure_port(address))
    if not bound:
        raise OSError(f"worker_link_port: cannot listen on {address}")
    await server.start()
    return server, bound, servicer
