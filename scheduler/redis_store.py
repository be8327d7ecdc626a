"""The job store: API keys, job records and the usage ledger in Redis. The only module that
imports redis.

Keys (all under `{prefix}:`):
    key:{key_id}                  hash: tenant, hash (SHA-256 of the key), created_at, revoked_at
    tenant_keys:{tenant}          set of the tenant's key ids
    tenants                       set of tenants that ever had a key
    job:{job_id}                  hash: the job record (see `get_job`)
    job_events:{job_id}           list of JSON events {at, event, ...}
    request:{tenant}:{request_id} string: the job id a client's request id created (no expiry:
                                  it lives as long as the job record, which is never deleted)
    open_jobs                     set of job ids not yet final
    usage:{dimension}:{key}:{day} hash: field -> amount (see `ledger.py`)
    usage_keys:{dimension}        set of keys that have usage in that dimension
    usage_days                    set of days that have usage

Every change that must be all-or-nothing is one Lua script, so a crash or a duplicate call can
never half-finish a job or bill it twice. Every Redis failure becomes `StoreUnavailable` naming
host:port (never the password). A call is retried once, at once, only when its connection
failed (after a Redis restart the pool's old sockets fail once); so a down Redis fails a call
within about 2 x `timeout_s` and the caller decides what to do.

Knows: Redis, key layout, record encoding. Does not know: gRPC, Ray, routing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from urllib.parse import urlsplit

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from scheduler import keys, ledger
from scheduler.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StoreUnavailable,
    Unauthenticated,
)
from scheduler.jobs import FINAL, TRANSITIONS, JobState, check_transition
from scheduler.ledger import DIMENSIONS, Bill, days_between, increments, utc_day
from scheduler.quota import RATE_WINDOW_S, Admission, Limits, refusal
from scheduler.redis_scripts import (
    CREATE_JOB,
    CREATE_KEY,
    FINISH_JOB,
    PROGRESS,
    REVOKE_KEY,
    START_JOB,
)

CREATE_FIELDS = ("job_id", "tenant", "model", "request_id", "params", "owner", "created_at")
CREATE_OPTIONAL = ("prompt_tokens", "plan", "prompt_sha256")
"""What `create_job` may also set: what the job's bill needs should its scheduler die."""
FINISH_FIELDS = frozenset({"finish_reason", "error", "finished_at", "prompt_tokens",
                           "completion_tokens", "segments", "spec", "text", "token_ids", "workers",
                           "charge_uusd", "plan", "price_version"})
"""What `finish_job` may set. `workers` too: a dispatch write lost while Redis was down is
carried by the final record, which the caller retries until it lands."""
INT_FIELDS = frozenset({"prompt_tokens", "completion_tokens", "progress_completion_tokens",
                        "charge_uusd", "reserved"})
FLOAT_FIELDS = frozenset({"created_at", "started_at", "finished_at", "progress_at"})
JSON_FIELDS = frozenset({"workers", "segments", "spec", "token_ids", "params"})
FINAL_STATES = sorted(s.value for s in FINAL)
UNKNOWN_KEY = "API key: unknown or revoked"

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


class RedisStore:
    """Keys, jobs and usage in one Redis. Most methods are one round trip (a script or a
    pipeline), retried once on a fresh connection only when the connection failed."""

    def __init__(self, url: str, prefix: str = "sparkgrid", timeout_s: float = 2.0):
        parts = urlsplit(url)
        self._where = (parts.path if parts.scheme == "unix"
                       else f"{parts.hostname}:{parts.port or 6379}")
        self._password = parts.password
        self._p = prefix
        self._redis = redis.asyncio.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            # One retry, on a fresh connection: after Redis restarts, the pool's old sockets
            # fail once. Every script is safe to run twice (final-state and id checks).
            retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])
        script = self._redis.register_script
        self._create_key, self._revoke_key = script(CREATE_KEY), script(REVOKE_KEY)
        self._create_job, self._start_job = script(CREATE_JOB), script(START_JOB)
        self._progress, self._finish_job = script(PROGRESS), script(FINISH_JOB)

    @contextlib.contextmanager
    def _reachable(self):
        """Turns any Redis or socket failure into `StoreUnavailable`, password scrubbed."""
        try:
            yield
        except (RedisError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            if self._password:
                reason = reason.replace(self._password, "***")
            raise StoreUnavailable(
                f"job store (Redis at {self._where}) is unavailable: {reason}") from None

    def _k(self, *parts: str) -> str:
        return ":".join((self._p, *parts))

    async def ping(self) -> None:
        with self._reachable():
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()

    # --- API keys -------------------------------------------------------------------------------

    async def create_key(self, tenant: str) -> tuple[str, str]:
        """A new (key_id, api_key) for `tenant`; only the key's hash is stored."""
        keys.check_tenant(tenant)
        while True:
            key_id, api_key = keys.new_key()
            with self._reachable():
                created = await self._create_key(
                    keys=[self._k("key", key_id), self._k("tenant_keys", tenant),
                          self._k("tenants")],
                    args=[key_id, tenant, keys.hash_key(api_key), repr(time.time())])
            if created:
                return key_id, api_key

    async def revoke_key(self, key_id: str) -> bool:
        """Revokes the key at once; False when it is unknown or already revoked."""
        if not keys.is_key_id(key_id):
            raise InvalidArgument(
                "key_id", f"expected {keys.KEY_ID_LENGTH} lowercase hex characters; got {key_id!r}")
        with self._reachable():
            revoked = await self._revoke_key(keys=[self._k("key", key_id)],
                                             args=[repr(time.time())])
        return bool(revoked)

    async def list_keys(self, tenant: str | None = None) -> list[dict]:
        """key_id, tenant, created_at, revoked_at (None if live) of a tenant's keys, or of all."""
        if tenant is not None:
            keys.check_tenant(tenant)
        with self._reachable():
            if tenant is not None:
                key_ids = await self._redis.smembers(self._k("tenant_keys", tenant))
            else:
                tenants = await self._redis.smembers(self._k("tenants"))
                sets = [self._k("tenant_keys", t) for t in tenants]
                key_ids = await self._redis.sunion(sets) if sets else set()
            key_ids = sorted(key_ids)
            async with self._redis.pipeline(transaction=False) as pipe:
                for key_id in key_ids:
                    pipe.hmget(self._k("key", key_id), "tenant", "created_at", "revoked_at")
                rows = await pipe.execute()
        out = [{"key_id": key_id, "tenant": owner, "created_at": float(created),
                "revoked_at": float(revoked) if revoked else None}
               for key_id, (owner, created, revoked) in zip(key_ids, rows) if owner is not None]
        return sorted(out, key=lambda row: (row["created_at"], row["key_id"]))

    async def authenticate(self, api_key: str) -> str:
        """The tenant of a live key; `Unauthenticated` otherwise. One round trip, so a revoked
        key stops working at once."""
        key_id = keys.parse_key_id(api_key)
        with self._reachable():
            tenant, stored, revoked = await self._redis.hmget(
                self._k("key", key_id), "tenant", "hash", "revoked_at")
        if tenant is None or stored is None or revoked or not keys.matches(api_key, stored):
            raise Unauthenticated(UNKNOWN_KEY)
        return tenant

    # --- jobs -----------------------------------------------------------------------------------

    async def create_job(self, fields: dict,
                         admission: Admission | None = None) -> tuple[str, bool]:
        """(job_id, True) for a new queued job; (the earlier job's id, False) when the tenant's
        request_id (or the job id) is already known, and then nothing is created. With an
        `admission`, the tenant's quota is checked and the job's tokens reserved in the same
        step (`ResourceExhausted` with a retry hint when refused; nothing is created)."""
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
                       *self._quota_keys(tenant, admission or Admission(Limits(), 0, now))]
        header = {"job_id": job_id, "event": _event(fields["created_at"], JobState.QUEUED.value),
                  "quota": _quota_args(admission)}
        args = [json.dumps(header, ensure_ascii=False)]
        for name, value in record.items():
            args += [name, _encode(value)]
        with self._reachable():
            answer = await self._create_job(keys=script_keys, args=args)
        if answer[0] == "":
            retry = float(answer[3])
            raise ResourceExhausted(refusal(tenant, answer[2], admission, retry),
                                    retry_after_s=retry)
        return answer[0], bool(answer[1])

    def _quota_keys(self, tenant: str, admission: Admission) -> list[str]:
        return [self._k("quota", tenant, admission.day), self._k("quota", tenant, admission.month),
                self._k("rate", tenant)]

    async def quota_use(self, tenant: str, period: str) -> dict[str, int]:
        """{used, reserved} tokens of a tenant's UTC day (YYYY-MM-DD) or month (YYYY-MM)."""
        with self._reachable():
            raw = await self._redis.hgetall(self._k("quota", tenant, period))
        return {"used": int(raw.get("used", 0)), "reserved": int(raw.get("reserved", 0))}

    async def set_tenant_plan(self, tenant: str, plan: str) -> None:
        keys.check_tenant(tenant)
        with self._reachable():
            await self._redis.hset(self._k("tenant", tenant), "plan", plan)

    async def tenant_plan(self, tenant: str) -> str | None:
        with self._reachable():
            return await self._redis.hget(self._k("tenant", tenant), "plan")

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

    async def finish_job(self, job_id: str, state: JobState, fields: dict,
                         bill: Bill | None) -> bool:
        """Settles the job in `state` with `fields` and books `bill` (made by `billing.py`), all
        at once. False (and nothing changed) when the job was already final, so a retry never
        bills twice: also a retry after a call whose reply was lost (StoreUnavailable) but
        which had landed, and a second scheduler settling the same orphan."""
        state = JobState(state)
        _check_finish(job_id, state, fields, bill)
        script_keys, args = self._finish_args(job_id, state, fields, bill)
        with self._reachable():
            answer = await self._finish_job(keys=script_keys, args=args)
        if answer[0] == "final":
            return False
        if answer[0] == "tenant":
            raise ValueError(f"finish_job: the bill is for tenant {bill.tenant}, "
                             f"the job of {answer[1]}")
        self._raise_refusal(job_id, answer, state)
        return True

    def _finish_args(self, job_id: str, state: JobState, fields: dict, bill: Bill | None):
        """KEYS and ARGV of `FINISH_JOB`."""
        finished_at = fields.get("finished_at", bill.finished_at if bill else time.time())
        record = {**fields, "finished_at": finished_at, **({"billed": "1"} if bill else {})}
        usage = increments(bill) if bill else {}
        header = {"job_id": job_id, "state": state.value, "tenant": bill.tenant if bill else "",
                  "event": _event(finished_at, state.value,
                                  finish_reason=fields.get("finish_reason"),
                                  error=fields.get("error")),
                  "final": FINAL_STATES,
                  "allowed": [s.value for s in JobState if state in TRANSITIONS[s]],
                  "day": utc_day(bill.finished_at) if bill else "",
                  "quota_used": bill.prompt_tokens + bill.completion_tokens if bill else 0,
                  "usage": [{"member": key, "incr": {f: str(n) for f, n in amounts.items()}}
                            for (_, key, _), amounts in usage.items()]}
        script_keys = [self._k("job", job_id), self._k("job_events", job_id), self._k("open_jobs"),
                       self._k("usage_days")]
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

    async def get_job(self, job_id: str) -> dict | None:
        """The job record decoded (ints, floats, JSON fields parsed, billed a bool), or None."""
        with self._reachable():
            raw = await self._redis.hgetall(self._k("job", job_id))
        return _decode_job(raw) if raw else None

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

    # --- usage ----------------------------------------------------------------------------------

    async def usage(self, dimension: str, key: str, since: str,
                    until: str) -> list[tuple[str, dict[str, int]]]:
        """(day, {field: amount}) for each day from `since` to `until` (inclusive) with usage."""
        _check_dimension(dimension)
        days = days_between(since, until)
        with self._reachable():
            async with self._redis.pipeline(transaction=False) as pipe:
                for day in days:
                    pipe.hgetall(self._k("usage", dimension, key, day))
                raws = await pipe.execute()
        return [(day, {f: int(n) for f, n in raw.items()}) for day, raw in zip(days, raws) if raw]

    async def record_worker_time(self, worker: str, info: dict, day: str, online_ms: int,
                                 active_ms: int) -> None:
        """Add time a worker was seen online on `day` (and, of it, busy) to the `worker`,
        `gpu` and `all` totals, with its GPU cost (`ledger.GPU_COST_SCALE`), and keep its
        registration (`info`: gpu_type, price_uusd_per_hour, node_ip, model). One transaction."""
        amounts = ledger.worker_time(online_ms, active_ms, int(info["price_uusd_per_hour"]))
        where = (("worker", worker), ("gpu", info["gpu_type"]), ("all", "all"))
        with self._reachable():
            async with self._redis.pipeline(transaction=True) as pipe:
                for dimension, key in where:
                    for name, amount in amounts.items():
                        pipe.hincrby(self._k("usage", dimension, key, day), name, amount)
                    pipe.sadd(self._k("usage_keys", dimension), key)
                pipe.sadd(self._k("usage_days"), day)
                pipe.hset(self._k("workers"), worker,
                          json.dumps({**info, "last_seen": time.time()}))
                await pipe.execute()

    async def workers_info(self) -> dict[str, dict]:
        """Every worker ever seen: its registration (GPU type, price, node, model, last seen)."""
        with self._reachable():
            raw = await self._redis.hgetall(self._k("workers"))
        return {name: json.loads(value) for name, value in raw.items()}

    async def usage_keys(self, dimension: str) -> list[str]:
        """The keys (tenants, models, workers, GPU types) that have usage in `dimension`."""
        _check_dimension(dimension)
        with self._reachable():
            return sorted(await self._redis.smembers(self._k("usage_keys", dimension)))


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
            "month_retry": admission.seconds_to_next_month()}


def _check_dimension(dimension: str) -> None:
    if dimension not in DIMENSIONS:
        raise InvalidArgument("dimension",
                              f"expected one of {', '.join(DIMENSIONS)}; got {dimension!r}")
