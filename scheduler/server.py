"""The gRPC servicer of `sparkgrid.v1.Inference`: protobuf in, domain types, protobuf out.

Each method reads the caller's tenant (set by `ApiInterceptor`), turns the request message
into domain values, calls the dispatcher, the pool or the store, and turns the answer back
into messages. A client that cancels or disconnects cancels the method's task, which closes
the job's stream and aborts it on its worker.

Knows: the proto messages. Does not know: Ray, Redis, routing.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from scheduler.config import SchedulerConfig
from scheduler.dispatch import Dispatcher
from scheduler.errors import InvalidArgument, NotFound
from scheduler.interceptors import TENANT
from scheduler.ledger import utc_day
from scheduler.reports import USAGE_MAX_DAYS, usage_window
from scheduler.requests import JobRequest

MAX_JOB_ID_CHARS = 64


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, config: SchedulerConfig, dispatcher: Dispatcher, pool, store):
        self.config = config
        self.dispatcher = dispatcher
        self.pool = pool
        self.store = store

    async def Generate(self, request, context):
        job = await self._job_request(request)
        async with aclosing(self.dispatcher.run(TENANT.get(), job)) as pieces:
            async for piece in pieces:
                yield _chunk(piece)

    async def Complete(self, request, context):
        job = await self._job_request(request)
        text, ids, last = [], [], None
        async with aclosing(self.dispatcher.run(TENANT.get(), job, streamed=False)) as pieces:
            async for piece in pieces:
                text.append(piece.text)
                ids.extend(piece.token_ids)
                last = piece
        return pb.Completion(job_id=last.job_id, text="".join(text), token_ids=ids,
                             finish_reason=last.finish_reason, usage=pb.Usage(**last.usage))

    async def Cancel(self, request, context):
        job_id = _job_id_field(request.job_id)
        cancelled, state = await self.dispatcher.cancel(TENANT.get(), job_id)
        return pb.CancelResponse(cancelled=cancelled, state=state)

    async def GetJob(self, request, context):
        job_id = _job_id_field(request.job_id)
        record = await self.store.get_job(job_id)
        if record is None or record["tenant"] != TENANT.get():
            raise NotFound(f"job_id: no job {job_id!r}")
        record.update(self.dispatcher.progress(job_id) or {})
        return _job(record)

    async def ListWorkers(self, request, context):
        TENANT.get()  # authenticated callers only (the interceptor made sure)
        return pb.ListWorkersResponse(workers=[_worker(s, self.pool.observed.figures(
            s.stats.name)) for s in self.pool.stats()])

    async def GetUsage(self, request, context):
        """The tenant's usage per UTC day over `usage_window`: the last 31 days by default,
        at most 366 (so at most that many ledger reads a call)."""
        tenant = TENANT.get()
        since, until = usage_window(request.since, request.until, utc_day(time.time()))
        days = await self.store.usage("tenant", tenant, since, until, max_days=USAGE_MAX_DAYS)
        report = pb.UsageReport(tenant=tenant)
        for day, totals in days:
            report.days.append(pb.UsageDay(day=day, jobs=totals.get("jobs", 0),
                                           prompt_tokens=totals.get("prompt_tokens", 0),
                                           completion_tokens=totals.get("completion_tokens", 0)))
        report.jobs = sum(d.jobs for d in report.days)
        report.prompt_tokens = sum(d.prompt_tokens for d in report.days)
        report.completion_tokens = sum(d.completion_tokens for d in report.days)
        return report

    # -- conversions ---------------------------------------------------------------------------
    async def _job_request(self, request) -> JobRequest:
        fields = {
            "prompt": request.prompt, "max_tokens": request.max_tokens,
            "temperature": request.temperature if request.HasField("temperature") else None,
            "top_p": request.top_p if request.HasField("top_p") else None,
            "top_k": request.top_k,
            "seed": request.seed if request.HasField("seed") else None,
            "stop": list(request.stop), "request_id": request.request_id, "model": request.model,
        }
        # Checking tokenizes the prompt (up to max_prompt_chars): on a thread, so that a long
        # prompt never holds up the event loop and every stream it serves.
        return await asyncio.to_thread(JobRequest.check, fields, self.config, self.pool)


def _chunk(piece) -> pb.GenerateChunk:
    chunk = pb.GenerateChunk(job_id=piece.job_id, text=piece.text, token_ids=piece.token_ids)
    if piece.finish_reason is not None:
        chunk.finish_reason = piece.finish_reason
        chunk.usage.CopyFrom(pb.Usage(**piece.usage))
    return chunk


def _job_id_field(job_id: str) -> str:
    if not job_id or len(job_id) > MAX_JOB_ID_CHARS:
        raise InvalidArgument("job_id", f"expected a job id of 1 to {MAX_JOB_ID_CHARS} characters")
    return job_id


def _job(record: dict) -> pb.Job:
    spec = record.get("spec") or {}
    return pb.Job(
        job_id=record["job_id"], request_id=record.get("request_id", ""),
        model=record.get("model", ""), state=record["state"],
        workers=record.get("workers") or [], finish_reason=record.get("finish_reason", ""),
        usage=pb.Usage(prompt_tokens=record.get("prompt_tokens") or 0,
                       completion_tokens=record.get("completion_tokens") or 0),
        spec=pb.SpecStats(**{k: spec.get(k, 0) for k in
                             ("draft_tokens", "verified_tokens", "accepted_tokens", "spec_steps")}),
        created_at=record.get("created_at") or 0.0, finished_at=record.get("finished_at") or 0.0,
        error=record.get("error", ""))


def _worker(status, observed=None) -> pb.Worker:
    """`status` (a `WorkerStatus`) and what this scheduler observed of it (`Observed`)."""
    s = status.stats
    state = ("quarantined" if status.quarantined
             else "unhealthy" if not status.healthy or s.state in ("failed", "stopped")
             else s.state)
    return pb.Worker(
        name=s.name, node_ip=s.node_ip, gpu_type=s.gpu_type, device_name=s.device_name,
        model=s.model_id, state=state, num_waiting=s.num_waiting, num_running=s.num_running,
        remaining_tokens=s.remaining_tokens, tokens_per_second=s.tokens_per_s,
        mean_accept_length=s.mean_accept_length or 0.0, price_per_hour=s.price_per_hour,
        quarantine_reason=status.quarantined or "",
        operator=status.registered.operator if status.registered else "",
        kind=status.registered.kind if status.registered else "",
        observed_tokens_per_second=(observed and observed.tokens_per_s) or 0.0)
