"""The job half of the job store (`RedisStore` is made of it): job records, their output and
events, schedulers' leases, and how long what a job leaves is kept.

Keys (under the store's prefix, beside those listed in `redis_store.py`):
    job:{job_id}                  hash: the job record (see `get_job`); once final, expires
                                  after `keep_jobs_s`
    job_output:{job_id}           hash: text, token_ids of a final job (the privacy-sensitive
                                  part: its own key, so that it expires sooner, `keep_text_s`)
    job_events:{job_id}           list of JSON events {at, event, ...}; expires with the record
    request:{tenant}:{request_id} string: the job id a client's request id created; expires
                                  with that job's record
    open_jobs                     set of job ids not yet final
    tenant_open:{tenant}          set of the tenant's job ids not yet final (its concurrency)
    scheduler:{owner}             string, with a TTL: the lease of a live scheduler, renewed by
                                  it; an open job whose owner has none is an orphan

Retention is set by the finishing script when a job becomes final (0: kept forever); open
jobs never expire. The ledger (`usage:*`) never expires.

Knows: Redis commands through the store's connection, the job key layout, record encoding.
Does not know: gRPC, Ray, routing, what a job is billed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

from scheduler import keys
from scheduler.errors import InvalidArgument, NotFound, ResourceExhausted
from scheduler.jobs import FINAL, TRANSITIONS, JobState, check_transition
from scheduler.ledger import Bill, increments, utc_day
from scheduler.quota import CONCURRENCY_RETRY_S, RATE_WINDOW_S, Admission, Limits, refusal

CREATE_FIELDS = ("job_id", "tenant", "model", "request_id", "params", "owner", "created_at")
CREATE_OPTIONAL = ("prompt_tokens", "plan", "prompt_sha256")
"""What `create_job` may also set: what the job's bill needs should its scheduler die."""
FINISH_FIELDS = frozenset({"finish_reason", "error", "finished_at", "prompt_tokens",
                           "completion_tokens", "segments", "spec", "text", "token_ids", "workers",
                           "charge_uusd", "plan", "price_version", "settled_by"})
"""What `finish_job` may set. `workers` too: a dispatch write lost while Redis was down is
carried by the final record, which the caller retries until it lands. `settled_by`: the
scheduler that settled an orphan."""
OUTPUT_FIELDS = ("text", "token_ids")
"""What `finish_job` writes to `job_output:{id}` rather than the record."""
INT_FIELDS = frozenset({"prompt_tokens", "completion_tokens", "progress_completion_tokens",
                        "charge_uusd", "reserved"})
FLOAT_FIELDS = frozenset({"created_at", "started_at", "finished_at", "progress_at"})
JSON_FIELDS = frozenset({"workers", "segments", "spec", "token_ids", "params"})
FINAL_STATES = sorted(s.value for s in FINAL)


def _encode(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, default=lambda obj: dataclasses.asdict(obj))


def _decode_job(raw: dict[str, str]) -> dict:
    job = {}
    for name, text in raw.items():
        if name in INT_FIELDS:
            job[name] = int(text)
        elif name in FLOAT_FIELDS:
            job[name] = float(text)
        elif name in JSON_FIELDS:
            job[name] = json.loads(text)
        elif name == "billed":
            job[name] = text == "1"
        else:
            job[name] = text
    return job


def _event(at: float, event: str, **details) -> str:
    return json.dumps({"at": at, "event": event, **{k: v for k, v in details.items() if v}})


def _seconds(value: float) -> int:
    """A retention in whole seconds for EXPIRE (0: forever; a fraction rounds up)."""
    return math.ceil(value) if value > 0 else 0


class JobStore:
    """The job methods of `RedisStore` (which provides `_redis`, `_reachable`, `_k`, `_p`,
    the registered scripts and `keep_text_s`/`keep_jobs_s`)."""

    # --- creating and running -------------------------------------------------------------------

    async def create_job(self, fields: dict,
                         admission: Admission | None = None) -> tuple[str, bool]:
        """(job_id, True) for a new queued job; (the earlier job's id, False) when the tenant's
        request_id (or the job id) is already known, and then nothing is created. With an
        `admission`, the tenant's quota and concurrency are checked and the job's tokens
        reserved in the same step (`ResourceExhausted` with a retry hint when refused; nothing
        is created). A request_id whose job ended and whose output has expired is refused
        (`InvalidArgument` naming request_id); one whose record expired is free again."""
        missing = [name for name in CREATE_FIELDS if name not in fields]
        extra = sorted(set(fields) - set(CREATE_FIELDS) - set(CREATE_OPTIONAL))
        if missing or extra:
            raise ValueError(f"create_job: fields must be {CREATE_FIELDS}, and may be "
                             f"{CREATE_OPTIONAL}; missing {missing}, unknown {extra}")
        keys.check_tenant(fields["tenant"])
        job_id, request_id = fields["job_id"], fields["request_id"]
        record = {**fields, "state": JobState.QUEUED.value, "workers": [], "billed": "0"}
        tenant, now = fields["tenant"], admission.now if admission else time.time()
        script_keys = [self._k("job", job_id), self._k("job_events", job_id), self._k("open_jobs"),
                       self._k("request", tenant, request_id) if request_id else "",
                       *self._quota_keys(tenant, admission or Admission(Limits(), 0, now)),
                       self._k("tenant_open", tenant)]
        header = {"job_id": job_id, "prefix": self._p,
                  "event": _event(fields["created_at"], JobState.QUEUED.value),
                  "quota": _quota_args(admission)}
        args = [json.dumps(header, ensure_ascii=False)]
        for name, value in record.items():
            args += [name, _encode(value)]
        with self._reachable():
            answer = await self._create_job(keys=script_keys, args=args)
        if answer[0] == "" and answer[2] == "expired":
            raise InvalidArgument("request_id", (
                f"{request_id!r} names job {answer[3]}, which has ended and whose output was "
                f"deleted after its retention period; send the request with a new request_id"))
        if answer[0] == "":
            retry = float(answer[3])
            raise ResourceExhausted(refusal(tenant, answer[2], admission, retry),
                                    retry_after_s=retry)
        return answer[0], bool(answer[1])

    def _quota_keys(self, tenant: str, admission: Admission) -> list[str]:
        return [self._k("quota", tenant, admission.day), self._k("quota", tenant, admission.month),
                self._k("rate", tenant)]

    async def open_job_count(self, tenant: str) -> int:
        """The tenant's jobs not yet final (what `max_concurrent_jobs` counts)."""
        with self._reachable():
            return await self._redis.scard(self._k("tenant_open", tenant))

    async def start_job(self, job_id: str, worker: str, at: float) -> None:
        """Records that `worker` was given the job: queued -> running, or a failover of a
        running job. `TransitionError` when the job is already final, `NotFound` if unknown."""
        sources = [s.value for s in JobState if JobState.RUNNING in TRANSITIONS[s]]
        sources.append(JobState.RUNNING.value)  # a failover: running stays running
        with self._reachable():
            answer = await self._start_job(
                keys=[self._k("job", job_id), self._k("job_events", job_id)],
                args=[worker, repr(at), _event(at, "dispatched", worker=worker), *sources])
        self._raise_refusal(job_id, answer, JobState.RUNNING)

    async def record_progress(self, job_id: str, completion_tokens: int, at: float) -> None:
        """Notes tokens delivered so far (ignored once the job is final)."""
        with self._reachable():
            answer = await self._progress(keys=[self._k("job", job_id)],
                                          args=[completion_tokens, repr(at), *FINAL_STATES])
        if answer == 0:
            raise NotFound(f"job {job_id}: not found")

    # --- settling -------------------------------------------------------------------------------

    async def finish_job(self, job_id: str, state: JobState, fields: dict,
                         bill: Bill | None, orphan_of: str | None = None) -> bool:
        """Settles the job in `state` with `fields` and books `bill` (made by `billing.py`), all
        at once, and sets how long what it leaves is kept. False (and nothing changed) when
        the job was already final, so a retry never bills twice: also a retry after a call
        whose reply was lost (StoreUnavailable) but which had landed, and a second scheduler
        settling the same orphan. With `orphan_of` (the owner the job was read under), also
        False unless the job still has that owner and the owner's lease is gone."""
        state = JobState(state)
        _check_finish(job_id, state, fields, bill)
        script_keys, args = self._finish_args(job_id, state, fields, bill, orphan_of)
        with self._reachable():
            answer = await self._finish_job(keys=script_keys, args=args)
        if answer[0] in ("final", "owner", "live"):
            return False
        if answer[0] == "tenant":
            raise ValueError(f"finish_job: the bill is for tenant {bill.tenant}, "
                             f"the job of {answer[1]}")
        self._raise_refusal(job_id, answer, state)
        return True

    def _finish_args(self, job_id: str, state: JobState, fields: dict, bill: Bill | None,
                     orphan_of: str | None):
        """KEYS and ARGV of `FINISH_JOB`."""
        finished_at = fields.get("finished_at", bill.finished_at if bill else time.time())
        record = {**fields, "finished_at": finished_at, **({"billed": "1"} if bill else {})}
        output = []
        for name in OUTPUT_FIELDS:
            if record.get(name) is not None:
                output += [name, _encode(record[name])]
            record.pop(name, None)
        usage = increments(bill) if bill else {}
        header = {"job_id": job_id, "prefix": self._p, "state": state.value,
                  "tenant": bill.tenant if bill else "",
                  "event": _event(finished_at, state.value,
                                  finish_reason=fields.get("finish_reason"),
                                  error=fields.get("error")),
                  "final": FINAL_STATES,
                  "allowed": [s.value for s in JobState if state in TRANSITIONS[s]],
                  "day": utc_day(bill.finished_at) if bill else "",
                  "quota_used": bill.prompt_tokens + bill.completion_tokens if bill else 0,
                  "usage": [{"member": key, "incr": {f: str(n) for f, n in amounts.items()}}
                            for (_, key, _), amounts in usage.items()],
                  "output": output, "orphan_of": orphan_of or "",
                  "keep_jobs": _seconds(self.keep_jobs_s),
                  "keep_text": _seconds(self.keep_text_s)}
        script_keys = [self._k("job", job_id), self._k("job_events", job_id), self._k("open_jobs"),
                       self._k("usage_days"), self._k("job_output", job_id)]
        for dimension, key, day in usage:
            script_keys += [self._k("usage", dimension, key, day), self._k("usage_keys", dimension)]
        args = [json.dumps(header, ensure_ascii=False)]
        for name, value in record.items():
            if value is not None:
                args += [name, _encode(value)]
        return script_keys, args

    @staticmethod
    def _raise_refusal(job_id: str, answer: list, new: JobState) -> None:
        if answer[0] == "missing":
            raise NotFound(f"job {job_id}: not found")
        if answer[0] == "refused":
            check_transition(job_id, JobState(answer[1]), new)

    async def note_event(self, job_id: str, event: str, **details) -> None:
        """Adds an event to a job's list (only while the job's record exists)."""
        with self._reachable():
            if await self._redis.exists(self._k("job", job_id)):
                await self._redis.rpush(self._k("job_events", job_id),
                                        _event(time.time(), event, **details))

    # --- reading --------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> dict | None:
        """The job record decoded (ints, floats, JSON fields parsed, billed a bool), with its
        `text` and `token_ids` once final while they are kept (`text_expired` True after), or
        None (unknown, or its record expired)."""
        with self._reachable():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self._k("job", job_id))
                pipe.hgetall(self._k("job_output", job_id))
                raw, output = await pipe.execute()
        if not raw:
            return None
        stored = raw.pop("output", None) == "1"
        job = _decode_job({**raw, **output})
        if stored and not output:
            job["text_expired"] = True
        return job

    async def job_events(self, job_id: str) -> list[dict]:
        """The job's events, oldest first ([] for an unknown job)."""
        with self._reachable():
            events = await self._redis.lrange(self._k("job_events", job_id), 0, -1)
        return [json.loads(e) for e in events]

    async def find_request(self, tenant: str, request_id: str) -> str | None:
        """The id of the job that the tenant's `request_id` created, if any."""
        with self._reachable():
            return await self._redis.get(self._k("request", tenant, request_id))

    async def open_jobs(self) -> list[dict]:
        """Records of the jobs not yet final, oldest first (for settling a dead owner's jobs)."""
        with self._reachable():
            job_ids = sorted(await self._redis.smembers(self._k("open_jobs")))
            async with self._redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hgetall(self._k("job", job_id))
                raws = await pipe.execute()
        jobs = [_decode_job(raw) for raw in raws if raw]
        return sorted(jobs, key=lambda job: (job.get("created_at", 0.0), job["job_id"]))

    # --- schedulers' leases ---------------------------------------------------------------------

    async def renew_lease(self, owner: str, ttl_s: float) -> bool:
        """Sets (or renews) `owner`'s lease to lapse `ttl_s` from now; False when it had
        lapsed or never existed (a first acquisition, or a lease lost)."""
        with self._reachable():
            before = await self._redis.set(self._k("scheduler", owner),
                                           json.dumps({"renewed_at": time.time()}),
                                           px=max(1, round(ttl_s * 1000)), get=True)
        return before is not None

    async def release_lease(self, owner: str) -> None:
        with self._reachable():
            await self._redis.delete(self._k("scheduler", owner))

    async def live_owners(self, owners) -> set[str]:
        """Those of `owners` whose lease is live."""
        owners = sorted(set(owners))
        if not owners:
            return set()
        with self._reachable():
            async with self._redis.pipeline(transaction=False) as pipe:
                for owner in owners:
                    pipe.exists(self._k("scheduler", owner))
                found = await pipe.execute()
        return {owner for owner, alive in zip(owners, found) if alive}


def _check_finish(job_id: str, state: JobState, fields: dict, bill: Bill | None) -> None:
    if state not in FINAL:
        raise ValueError(f"finish_job: state must be final; got {state.value}")
    unknown = sorted(set(fields) - FINISH_FIELDS)
    if unknown:
        raise ValueError(f"finish_job: unknown fields {unknown}; "
                         f"expected some of {sorted(FINISH_FIELDS)}")
    if bill is not None and bill.job_id != job_id:
        raise ValueError(f"finish_job: the bill is for job {bill.job_id}, not {job_id}")


def _quota_args(admission: Admission | None) -> dict | None:
    if admission is None or admission.limits.unlimited:
        return None
    lim = admission.limits
    return {"reserve": admission.reserve_tokens, "day_limit": lim.tokens_per_day,
            "month_limit": lim.tokens_per_month, "rpm": lim.requests_per_minute,
            "now": admission.now, "window": RATE_WINDOW_S,
            "day_retry": admission.seconds_to_next_day(),
            "month_retry": admission.seconds_to_next_month(),
            "max_concurrent": lim.max_concurrent_jobs, "concurrent_retry": CONCURRENCY_RETRY_S}
