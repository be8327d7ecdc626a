"""A scheduler that requires registrations (the default of `sparkgrid head` and `up`) routes
only to workers whose operator signed their registration, takes their name, GPU type and price
from it, and drops a revoked operator's workers; real Redis, real Ray, real gRPC."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
from impostors import impostor_class

pytestmark = pytest.mark.integration


def _store_call(url: str, prefix: str, method: str, *args):
    from scheduler.redis_store import RedisStore

    async def go():
        store = RedisStore(url, prefix=prefix)
        try:
            return await getattr(store, method)(*args)
        finally:
            await store.close()
    return asyncio.run(go())


def test_only_registered_workers_serve_with_their_registered_price(make_worker, redis_server,
                                                                    redis_prefix, tmp_path):
    import ray
    from scheduler_common import wait_for

    from scheduler.client import Client
    from scheduler.config import SchedulerConfig
    from scheduler.head import SchedulerThread
    from sparkgrid.contract import NAMESPACE
    from sparkgrid.registration import Registration, token_id_of

    url = redis_server.url
    acme = _store_call(url, redis_prefix, "add_operator", "acme")
    mallory = _store_call(url, redis_prefix, "add_operator", "mallory")
    honest, config, printed = make_worker("w-reg", operator_token=acme, price_per_hour=0.25)
    assert f"registered under operator token {token_id_of(acme)}" in printed
    stats = ray.get(honest.stats.remote())
    files = ray.get(honest.tokenizer_files.remote())
    signed = ray.get(honest.registration.remote())
    answer = {"token_ids": [5] * 4, "text": "x" * 4, "finish_reason": "length",
              "usage": {"prompt_tokens": 4, "completion_tokens": 4}, "spec": {}}
    fast = {**stats, "tokens_per_s": 1e6, "sps": {**stats["sps"], "steps_per_second": [
        s * 1000 for s in stats["sps"]["steps_per_second"]]}}
    # mallory's own worker, registered at 0.50/h, whose figures claim another name and price
    own = Registration(worker="m-1", token_id=token_id_of(mallory), model_id=stats["model_id"],
                       tokenizer_sha256=signed["tokenizer_sha256"],
                       weights_sha256=signed["weights_sha256"], gpu_type="A100",
                       price_per_hour=0.5, issued_at=time.time()).sign(mallory)
    actors = {
        "evil-0": None,  # no registration at all: any actor of the namespace
        "evil-2": signed,  # the honest worker's registration, replayed under another name
        "m-1": own,
    }
    made = [impostor_class().options(name=name, namespace=NAMESPACE).remote(
        {**fast, "name": "w-reg" if name == "m-1" else name, "price_per_hour": 99.0},
        [answer], files, registration) for name, registration in actors.items()]
    head = SchedulerThread(SchedulerConfig(redis_url=url, redis_prefix=redis_prefix, grpc_port=0,
                                           discovery_interval_s=0.5, stats_interval_s=0.25,
                                           require_registration=True))
    try:
        pool = head.scheduler.pool
        wait_for(lambda: {"evil-0", "evil-2"} <= set(pool._refused), 30, "the refusals")
        assert "has no registration" in pool._refused["evil-0"]
        assert "registration.worker: signed for 'w-reg'" in pool._refused["evil-2"]
        wait_for(lambda: {"w-reg", "m-1"} <= {s.stats.name for s in pool.stats()}, 30,
                 "the registered workers adopted")
        _, api_key = head.call(head.scheduler.store.create_key("acme-tenant"))
        with Client(head.endpoint, api_key) as client:
            shown = {w.name: w for w in client.workers()}
            assert set(shown) == {"w-reg", "m-1"}
            assert (shown["m-1"].operator, shown["m-1"].kind) == ("mallory", "in-cluster")
            assert (shown["m-1"].price_per_hour, shown["m-1"].gpu_type) == (0.5, "A100")
            assert (shown["w-reg"].operator, shown["w-reg"].price_per_hour) == ("acme", 0.25)
            # the platform revokes mallory: m-1 gets nothing more, and is not adopted again
            env = {**os.environ, "SPARKGRID_HOME": str(tmp_path)}
            done = subprocess.run(
                [sys.executable, "-m", "sparkgrid.cli", "operators", "revoke", "mallory",
                 "--redis-url", url, "--redis-prefix", redis_prefix],
                capture_output=True, text=True, env=env, timeout=60)
            assert done.returncode == 0 and "revoked mallory" in done.stdout, done.stderr
            wait_for(lambda: "m-1" not in {s.stats.name for s in pool.stats()}, 10,
                     "the revoked operator's worker dropped")
            served = [client.complete("def f(x):", max_tokens=8, temperature=0, timeout_s=120)
                      for _ in range(3)]
            assert {w for c in served for w in client.job(c.job_id).workers} == {"w-reg"}
            wait_for(lambda: "m-1" in pool._refused, 10, "m-1 refused on its next adoption")
            assert "unknown or revoked" in pool._refused["m-1"]
        registered = _store_call(url, redis_prefix, "registrations")
        assert registered["w-reg"]["operator"] == "acme"
        assert registered["w-reg"]["weights_sha256"] == signed["weights_sha256"]
        assert registered["m-1"]["operator"] == "mallory"
        assert "evil-0" not in registered and "evil-2" not in registered
    finally:
        head.stop()
        for actor in made:
            ray.kill(actor)
