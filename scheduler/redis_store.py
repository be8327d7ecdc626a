"""The job store: API keys, job records and the usage ledger in Redis. The only module that
imports redis (its job methods, `redis_jobs.JobStore`, use its connection).

Keys (all under `{prefix}:`):
    key:{key_id}                  hash: tenant, hash (SHA-256 of the key), created_at, revoked_at
    tenant_keys:{tenant}          set of the tenant's key ids
    tenants                       set of tenants that ever had a key
    job:{job_id}, job_output:{job_id}, job_events:{job_id}, request:{tenant}:{request_id},
    open_jobs, tenant_open:{tenant}, scheduler:{owner}
                                  jobs, their output and events, and schedulers' leases: see
                                  `redis_jobs.py` (the job methods, and what expires when)
    quota:{tenant}:{day|month}    hash: used, reserved tokens (expires after 40 / 400 days)
    rate:{tenant}                 sorted set: the tenant's requests of the last minute
    usage:{dimension}:{key}:{day} hash: field -> amount (see `ledger.py`)
    usage_keys:{dimension}        set of keys that have usage in that dimension
    usage_days                    set of days that have usage
    quarantine                    hash: worker -> JSON {reason, since}: it gets no jobs
    withheld                      list of JSON {worker, reason, since, until}: lifted
                                  quarantines, whose payout stays withheld
    operators, operator:*, operator_token:*, registration:*, operator_workers:*,
    registrations                 operators, their tokens and their workers' registrations:
                                  see `redis_operators.py`

Every change that must be all-or-nothing is one Lua script, so a crash or a duplicate call can
never half-finish a job or bill it twice. Every Redis failure becomes `StoreUnavailable` naming
host:port (never the password). A call is retried once, at once, only when its connection
failed (after a Redis restart the pool's old sockets fail once); so a down Redis fails a call
within about 2 x `timeout_s` and the caller decides what to do.

Knows: Redis, key layout, record encoding. Does not know: gRPC, Ray, routing.
"""

from __future__ import annotations

import contextlib
import json
import time
from urllib.parse import urlsplit

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from scheduler import keys, ledger
from scheduler.config import KEEP_JOBS_S, KEEP_TEXT_S, check_retention
from scheduler.errors import InvalidArgument, StoreUnavailable, Unauthenticated
from scheduler.ledger import DIMENSIONS, MAX_DAYS, days_between
from scheduler.redis_jobs import JobStore
from scheduler.redis_operators import OperatorStore
from scheduler.redis_scripts import (
    CREATE_JOB,
    CREATE_KEY,
    FINISH_JOB,
    PROGRESS,
    RELEASE_WORKER,
    REVOKE_KEY,
    START_JOB,
)

UNKNOWN_KEY = "API key: unknown or revoked"


class RedisStore(JobStore, OperatorStore):
    """Keys, jobs and usage in one Redis. Most methods are one round trip (a script or a
    pipeline), retried once on a fresh connection only when the connection failed. Final
    jobs' output is kept `keep_text_s`, their record, events and request id `keep_jobs_s`
    (0: forever; see `SchedulerConfig`)."""

    def __init__(self, url: str, prefix: str = "sparkgrid", timeout_s: float = 2.0,
                 keep_text_s: float = KEEP_TEXT_S, keep_jobs_s: float = KEEP_JOBS_S):
        check_retention(keep_text_s, keep_jobs_s)
        self.keep_text_s, self.keep_jobs_s = keep_text_s, keep_jobs_s
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
        self._release_worker = script(RELEASE_WORKER)
        self._operator_scripts()

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

    # --- quotas and plans ----------------------------------------------------------------------

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

    # --- usage ----------------------------------------------------------------------------------

    async def usage(self, dimension: str, key: str, since: str, until: str,
                    max_days: int = MAX_DAYS) -> list[tuple[str, dict[str, int]]]:
        """(day, {field: amount}) for each day from `since` to `until` (inclusive) with usage:
        one hash read per day of the range, which may span at most `max_days` days
        (InvalidArgument naming until otherwise)."""
        _check_dimension(dimension)
        days = days_between(since, until)
        if len(days) > max_days:
            raise InvalidArgument("until", f"the range spans {len(days)} days; at most {max_days}")
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

    # --- quarantined workers -------------------------------------------------------------------

    async def quarantine_worker(self, worker: str, reason: str, since: float) -> bool:
        """Quarantine `worker` for every scheduler of this prefix, with why and since when
        (unix seconds: the start of the period whose payout is withheld). False when it is
        quarantined already (the first reason and start stay)."""
        entry = json.dumps({"reason": reason, "since": since})
        with self._reachable():
            return bool(await self._redis.hsetnx(self._k("quarantine"), worker, entry))

    async def release_worker(self, worker: str, at: float) -> dict | None:
        """Lift `worker`'s quarantine: the period (reason, since, until) is kept in the list of
        withheld payouts; None when it was not quarantined. One transaction."""
        with self._reachable():
            raw = await self._release_worker(
                keys=[self._k("quarantine"), self._k("withheld")], args=[worker, repr(at)])
        return json.loads(raw) if raw else None

    async def quarantines(self) -> dict[str, dict]:
        """Workers quarantined now: name -> {reason, since}."""
        with self._reachable():
            raw = await self._redis.hgetall(self._k("quarantine"))
        return {name: json.loads(value) for name, value in raw.items()}

    async def withheld_periods(self) -> list[dict]:
        """Periods whose payout is withheld: the lifted quarantines ({worker, reason, since,
        until}) and the current ones (until None)."""
        with self._reachable():
            lifted = await self._redis.lrange(self._k("withheld"), 0, -1)
        now = [{"worker": name, **entry, "until": None}
               for name, entry in (await self.quarantines()).items()]
        return [json.loads(p) for p in lifted] + now

    async def usage_keys(self, dimension: str) -> list[str]:
        """The keys (tenants, models, workers, GPU types) that have usage in `dimension`."""
        _check_dimension(dimension)
        with self._reachable():
            return sorted(await self._redis.smembers(self._k("usage_keys", dimension)))

    async def record_audit(self, worker: str, passed: bool, at: float) -> None:
        """Count one audit verdict on `worker` (`ledger.audit_verdict`) in its `worker` ledger
        cell of the UTC day of `at` (unix seconds), so every scheduler's audits add up. One
        transaction."""
        day = ledger.utc_day(at)
        with self._reachable():
            async with self._redis.pipeline(transaction=True) as pipe:
                for name, amount in ledger.audit_verdict(passed).items():
                    pipe.hincrby(self._k("usage", "worker", worker, day), name, amount)
                pipe.sadd(self._k("usage_keys", "worker"), worker)
                pipe.sadd(self._k("usage_days"), day)
                await pipe.execute()


def _check_dimension(dimension: str) -> None:
    if dimension not in DIMENSIONS:
        raise InvalidArgument("dimension",
                              f"expected one of {', '.join(DIMENSIONS)}; got {dimension!r}")
