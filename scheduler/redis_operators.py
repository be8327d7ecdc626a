"""The operator half of the job store (`RedisStore` is made of it): operators, their tokens and
their workers' registrations.

Keys (under the store's prefix, beside those listed in `redis_store.py`):
    operators                     set of operator names
    revoked_operators             set of the revoked ones (what schedulers poll)
    operator:{name}               hash: token_id (the live token's), created_at, revoked_at
    operator_token:{token_id}     hash: operator, hash (SHA-256 of the token), created_at,
                                  revoked_at
    registration:{worker}         hash: the worker's registration (see
                                  `sparkgrid/registration.py`) plus operator, registered_at
    operator_workers:{name}       set of the workers registered under the operator
    registrations                 set of registered worker names

A worker name, once registered, belongs to its operator: another operator's registration of it
is refused. A revoked operator's token is refused at once; its registrations stay (the ledger
and reports still name its workers) but the scheduler routes nothing more to them. The scripts
build `operator_token:` keys from the prefix, as one Redis (not a cluster) holds all of this.

Knows: Redis commands through the store's connection, this key layout. Does not know: gRPC,
Ray, routing, how a registration is checked (`scheduler/registry.py`).
"""

from __future__ import annotations

import time
from dataclasses import asdict

from scheduler.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from scheduler.keys import check_tenant
from sparkgrid.registration import Registration, new_token, token_id_of, token_sha256

UNKNOWN_TOKEN = "operator token: unknown or revoked"

# KEYS: operator, operators, token. ARGV: name, token_id, hash, now. 1, or 0 when the name exists.
ADD_OPERATOR = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'token_id', ARGV[2], 'created_at', ARGV[4])
redis.call('HSET', KEYS[3], 'operator', ARGV[1], 'hash', ARGV[3], 'created_at', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# A new token for a live operator; the old one is revoked in the same step. KEYS: operator,
# new token. ARGV: prefix, name, token_id, hash, now. 1, or 0 when unknown or revoked.
ROTATE_TOKEN = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'revoked_at') == 1 then
  return 0
end
local old = redis.call('HGET', KEYS[1], 'token_id')
redis.call('HSET', ARGV[1] .. ':operator_token:' .. old, 'revoked_at', ARGV[5])
redis.call('HSET', KEYS[1], 'token_id', ARGV[3])
redis.call('HSET', KEYS[2], 'operator', ARGV[2], 'hash', ARGV[4], 'created_at', ARGV[5])
return 1
"""

# KEYS: operator, revoked_operators. ARGV: prefix, now, name. 1, or 0 when unknown or revoked
# already.
REVOKE_OPERATOR = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'revoked_at') == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'revoked_at', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
local token = redis.call('HGET', KEYS[1], 'token_id')
redis.call('HSET', ARGV[1] .. ':operator_token:' .. token, 'revoked_at', ARGV[2])
return 1
"""

# KEYS: registration, operator_workers, registrations, operator. ARGV: worker, operator, now,
# then field, value pairs. 'ok', 'revoked' (the operator is), or 'taken' (by another operator).
REGISTER_WORKER = """
if redis.call('EXISTS', KEYS[4]) == 0 or redis.call('HEXISTS', KEYS[4], 'revoked_at') == 1 then
  return 'revoked'
end
local holder = redis.call('HGET', KEYS[1], 'operator')
if holder and holder ~= ARGV[2] then return 'taken' end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'operator', ARGV[2], 'registered_at', ARGV[3])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return 'ok'
"""


class OperatorStore:
    """Operators and registrations; mixed into `RedisStore` (which gives `_redis`, `_k`,
    `_reachable`)."""

    def _operator_scripts(self) -> None:
        script = self._redis.register_script
        self._add_operator, self._rotate_token = script(ADD_OPERATOR), script(ROTATE_TOKEN)
        self._revoke_operator = script(REVOKE_OPERATOR)
        self._register_worker = script(REGISTER_WORKER)

    async def add_operator(self, name: str) -> str:
        """A new operator; returns its token (shown once: only its hash is kept)."""
        _check_operator(name)
        while True:
            token_id, token = new_token()
            with self._reachable():
                added = await self._add_operator(
                    keys=[self._k("operator", name), self._k("operators"),
                          self._k("operator_token", token_id)],
                    args=[name, token_id, token_sha256(token), repr(time.time())])
            if added:
                return token
            if await self._redis.exists(self._k("operator", name)):
                raise InvalidArgument("operator", f"{name!r} exists already (`operators "
                                      "rotate` gives it a new token)")

    async def rotate_operator(self, name: str) -> str:
        """A new token for a live operator; its old token is refused from now on."""
        _check_operator(name)
        token_id, token = new_token()
        with self._reachable():
            rotated = await self._rotate_token(
                keys=[self._k("operator", name), self._k("operator_token", token_id)],
                args=[self._p, name, token_id, token_sha256(token), repr(time.time())])
        if not rotated:
            raise NotFound(f"operator {name!r}: unknown or revoked")
        return token

    async def revoke_operator(self, name: str) -> bool:
        """Revokes the operator and its token at once; False when unknown or revoked already."""
        _check_operator(name)
        with self._reachable():
            return bool(await self._revoke_operator(
                keys=[self._k("operator", name), self._k("revoked_operators")],
                args=[self._p, repr(time.time()), name]))

    async def list_operators(self) -> list[dict]:
        """name, token_id, created_at, revoked_at (None if live), workers (registered names)."""
        with self._reachable():
            names = sorted(await self._redis.smembers(self._k("operators")))
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hmget(self._k("operator", name), "token_id", "created_at", "revoked_at")
                    pipe.smembers(self._k("operator_workers", name))
                rows = await pipe.execute()
        out = []
        for i, name in enumerate(names):
            (token_id, created, revoked), workers = rows[2 * i], rows[2 * i + 1]
            out.append({"name": name, "token_id": token_id, "created_at": float(created or 0),
                        "revoked_at": float(revoked) if revoked else None,
                        "workers": sorted(workers)})
        return out

    async def authenticate_operator(self, token: str) -> str:
        """The operator of a live token; `Unauthenticated` otherwise (one round trip)."""
        try:
            token_id = token_id_of(token)
        except ValueError as err:
            raise Unauthenticated(str(err)) from None
        found = await self.operator_of_token(token_id)
        if found is None or found[1] != token_sha256(token):
            raise Unauthenticated(UNKNOWN_TOKEN)
        return found[0]

    async def operator_of_token(self, token_id: str) -> tuple[str, str] | None:
        """(operator, token SHA-256) of a live token id, or None."""
        with self._reachable():
            operator, digest, revoked = await self._redis.hmget(
                self._k("operator_token", token_id), "operator", "hash", "revoked_at")
        if operator is None or digest is None or revoked:
            return None
        return operator, digest

    async def revoked_operators(self) -> set[str]:
        """Every revoked operator: one read, whatever the number of operators."""
        with self._reachable():
            return set(await self._redis.smembers(self._k("revoked_operators")))

    async def register_worker(self, operator: str, record: Registration) -> None:
        """Writes the worker's registration under `operator`. `PermissionDenied` when another
        operator registered that name, `Unauthenticated` when the operator is revoked."""
        fields = [str(x) for item in asdict(record).items() for x in item]
        with self._reachable():
            answer = await self._register_worker(
                keys=[self._k("registration", record.worker),
                      self._k("operator_workers", operator), self._k("registrations"),
                      self._k("operator", operator)],
                args=[record.worker, operator, repr(time.time()), *fields])
        if answer == "taken":
            raise PermissionDenied(f"worker {record.worker!r} is registered by another operator")
        if answer == "revoked":
            raise Unauthenticated(f"operator {operator!r}: unknown or revoked")

    async def registrations(self) -> dict[str, dict]:
        """worker -> its registration's fields (price_per_hour and times as floats), operator,
        registered_at."""
        with self._reachable():
            names = sorted(await self._redis.smembers(self._k("registrations")))
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self._k("registration", name))
                rows = await pipe.execute()
        out = {}
        for name, row in zip(names, rows):
            if row:
                for field in ("price_per_hour", "issued_at", "registered_at"):
                    row[field] = float(row.get(field) or 0)
                out[name] = row
        return out


def _check_operator(name: str) -> None:
    try:
        check_tenant(name)
    except InvalidArgument as err:
        raise InvalidArgument("operator", str(err).partition(": ")[2]) from None

