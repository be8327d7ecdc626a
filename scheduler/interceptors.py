"""What every call of the API passes through: authentication, and domain errors turned into
gRPC status codes (the table of docs/ARCHITECTURE.md).

`ApiInterceptor` wraps each method's handler. Before the method runs it reads the metadata
`authorization: Bearer <api key>`, asks the key store for the key's tenant (every call: a
revoked key stops working at once) and puts the tenant in `TENANT` for the method. The health
and reflection services are public. Errors: a `SchedulerError` becomes its status code with its
message; anything else is logged with an id and the client gets INTERNAL with that id only.

Knows: gRPC metadata, status codes. Does not know: how keys are stored, what methods do.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import time

import grpc

from scheduler.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SchedulerError,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)
TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("tenant")
PUBLIC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
STATUS = (  # most specific first: StoreUnavailable is an Unavailable
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_of(err: SchedulerError) -> grpc.StatusCode:
    return next((code for cls, code in STATUS if isinstance(err, cls)), grpc.StatusCode.INTERNAL)


def bearer_key(metadata) -> str:
    """The API key of `authorization: Bearer <key>`; Unauthenticated when missing or malformed."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        raise Unauthenticated("authorization: missing; send the metadata "
                              "`authorization: Bearer <api key>`")
    scheme, _, key = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated("authorization: expected `Bearer <api key>`")
    return key.strip()


class ApiInterceptor(grpc.aio.ServerInterceptor):
    """`authenticate(api_key) -> tenant` (async) raises Unauthenticated or StoreUnavailable."""

    def __init__(self, authenticate, metrics=None):
        self._authenticate = authenticate
        self._metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        public = details.method.startswith(PUBLIC_SERVICES)
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, public, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, public, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler  # streaming requests: only reflection has them, and it is public

    def _unary(self, behavior, public: bool, method: str):
        async def call(request, context):
            outcome = _Outcome(self._metrics, method)
            try:
                if not public:
                    TENANT.set(await self._authenticate(bearer_key(context.invocation_metadata())))
                return await behavior(request, context)
            except asyncio.CancelledError:
                outcome.code = grpc.StatusCode.CANCELLED
                raise
            except Exception as err:  # noqa: BLE001 - the client must get a status, not a hang
                await _fail(context, outcome, err)
            finally:
                outcome.record()
        return call

    def _stream(self, behavior, public: bool, method: str):
        async def call(request, context):
            outcome = _Outcome(self._metrics, method)
            try:
                if not public:
                    TENANT.set(await self._authenticate(bearer_key(context.invocation_metadata())))
                async for item in behavior(request, context):
                    yield item
            except asyncio.CancelledError:
                outcome.code = grpc.StatusCode.CANCELLED
                raise
            except Exception as err:  # noqa: BLE001
                await _fail(context, outcome, err)
            finally:
                outcome.record()
        return call


class _Outcome:
    """One call's status code and duration, for the metrics (OK unless set otherwise)."""

    def __init__(self, metrics, method: str):
        self.metrics, self.method = metrics, method
        self.code = grpc.StatusCode.OK
        self.start = time.perf_counter()

    def record(self) -> None:
        if self.metrics is not None:
            self.metrics.call(self.method, self.code.name, time.perf_counter() - self.start)


async def _fail(context, outcome: _Outcome, err: Exception) -> None:
    """End the call with the error's status: a domain error's own, else INTERNAL."""
    if isinstance(err, SchedulerError):
        outcome.code = status_of(err)
        await _abort(context, err)
    outcome.code = grpc.StatusCode.INTERNAL
    await _internal(context, err)


async def _abort(context, err: SchedulerError) -> None:
    if isinstance(err, ResourceExhausted) and err.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after-s", f"{err.retry_after_s:g}"),))
    await context.abort(status_of(err), str(err))


async def _internal(context, err: Exception) -> None:
    if isinstance(err, grpc.aio.AbortError):  # a method's own abort: already has its status
        raise err
    incident = secrets.token_hex(4)
    log.exception("internal error %s", incident)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident}; "
                                                  "the scheduler's log has the details)")
