"""Operators and registrations in a real Redis: a token is shown once and stored hashed, a
rotated or revoked token is refused at once, and a worker name belongs to the operator that
registered it first."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from scheduler.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from scheduler.redis_store import RedisStore
from sparkgrid.registration import Registration, token_id_of, token_sha256

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def opened(url, prefix):
    store = RedisStore(url, prefix)
    try:
        yield store
    finally:
        await store.close()


def registration(token: str, worker: str = "gpu-1") -> Registration:
    return Registration(worker=worker, token_id=token_id_of(token), model_id="org/m",
                        tokenizer_sha256="ab" * 32, weights_sha256="cd" * 32, gpu_type="L4",
                        price_per_hour=0.3, issued_at=time.time())


def test_operator_tokens_and_worker_names(redis_server, redis_prefix):
    async def go():
        async with opened(redis_server.url, redis_prefix) as store:
            acme = await store.add_operator("acme")
            assert await store.authenticate_operator(acme) == "acme"
            with pytest.raises(InvalidArgument, match="operator: 'acme' exists already"):
                await store.add_operator("acme")
            with pytest.raises(InvalidArgument, match="operator"):
                await store.add_operator("bad:name")
            # only the hash is stored
            stored = await store._redis.hgetall(store._k("operator_token", token_id_of(acme)))
            assert stored["hash"] == token_sha256(acme) and acme not in str(stored)
            # a name is its first operator's
            await store.register_worker("acme", registration(acme))
            other = await store.add_operator("other")
            with pytest.raises(PermissionDenied, match="'gpu-1' is registered by another"):
                await store.register_worker("other", registration(other))
            await store.register_worker("acme", registration(acme))  # its own: re-registered
            # rotation: the old token is refused at once, the new one works
            rotated = await store.rotate_operator("acme")
            with pytest.raises(Unauthenticated, match="unknown or revoked"):
                await store.authenticate_operator(acme)
            assert await store.operator_of_token(token_id_of(acme)) is None
            assert await store.operator_of_token(token_id_of(rotated)) == (
                "acme", token_sha256(rotated))
            # revocation: refused at once, listed as such, its registrations kept for reports
            assert await store.revoke_operator("acme") is True
            assert await store.revoke_operator("acme") is False
            with pytest.raises(Unauthenticated):
                await store.authenticate_operator(rotated)
            with pytest.raises(NotFound):
                await store.rotate_operator("acme")
            with pytest.raises(Unauthenticated, match="revoked"):
                await store.register_worker("acme", registration(rotated, "gpu-2"))
            assert await store.revoked_operators() == {"acme"}
            listed = {row["name"]: row for row in await store.list_operators()}
            assert listed["acme"]["revoked_at"] and listed["acme"]["workers"] == ["gpu-1"]
            assert listed["other"]["revoked_at"] is None and listed["other"]["workers"] == []
            regs = await store.registrations()
            assert regs["gpu-1"]["operator"] == "acme" and regs["gpu-1"]["price_per_hour"] == 0.3
            with pytest.raises(Unauthenticated, match="malformed"):
                await store.authenticate_operator("sg_" + "0" * 12 + "_x")
    asyncio.run(go())
