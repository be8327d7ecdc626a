"""A stranger's actor that claims to be 1000x faster than a real worker and answers every job
with 5,000 tokens: no request is delivered or billed more than its max_tokens, and within a
few requests the impostor is quarantined and gets no more traffic."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from impostors import impostor_class

pytestmark = pytest.mark.integration


def test_an_impostor_bills_nothing_extra_and_is_quarantined(make_worker, redis_server,
                                                            redis_prefix, tmp_path):
    import ray

    from scheduler.client import Client
    from scheduler.config import SchedulerConfig
    from scheduler.head import SchedulerThread
    from scheduler.worker_pool import STRIKES_TO_QUARANTINE
    from sparkgrid.contract import NAMESPACE

    honest = make_worker("w-honest")[0]
    stats = ray.get(honest.stats.remote())
    sps = stats["sps"]
    claims = {**stats, "name": "evil-1",
              "sps": {**sps, "steps_per_second": [s * 1000 for s in sps["steps_per_second"]]},
              "tokens_per_s": 1e6}
    answer = {"token_ids": [5] * 5000, "text": "x" * 5000, "finish_reason": "stop",
              "usage": {"prompt_tokens": 4, "completion_tokens": 5000}, "spec": {}}
    evil = impostor_class().options(name="evil-1", namespace=NAMESPACE).remote(
        claims, [answer], ray.get(honest.tokenizer_files.remote()))
    config = SchedulerConfig(redis_url=redis_server.url, redis_prefix=redis_prefix, grpc_port=0,
                             discovery_interval_s=0.5, stats_interval_s=0.25)
    head = SchedulerThread(config)
    try:
        from scheduler_common import wait_for

        wait_for(lambda: len(head.scheduler.pool.stats()) >= 2, 30, "both actors adopted")
        _, api_key = head.call(head.scheduler.store.create_key("acme"))
        with Client(head.endpoint, api_key) as client:
            done = [client.complete("def f(x):", max_tokens=16, temperature=0, timeout_s=120)
                    for _ in range(8)]
            states = {w.name: w.state for w in client.workers()}
            usage = client.usage()
        assert all(c.usage.completion_tokens <= 16 for c in done)
        assert usage.completion_tokens == sum(c.usage.completion_tokens for c in done) <= 8 * 16
        assert ray.get(evil.served.remote()) == STRIKES_TO_QUARANTINE <= 8
        assert states == {"evil-1": "quarantined", "w-honest": "ready"}
        # the reason is shown, and kept in the store for every scheduler and a restart
        stored = wait_for(lambda: head.call(head.scheduler.store.quarantines()), 10,
                          "the quarantine shared through the store")
        assert "strikes" in stored["evil-1"]["reason"] and "max_tokens" in \
            stored["evil-1"]["reason"]
        with Client(head.endpoint, api_key) as client:
            why = {w.name: w.quarantine_reason for w in client.workers()}
        assert why["evil-1"] == stored["evil-1"]["reason"] and why["w-honest"] == ""
        # the platform lifts it: every scheduler lets it back in; the period stays withheld
        env = {**os.environ, "SPARKGRID_HOME": str(tmp_path)}
        cli = [sys.executable, "-m", "sparkgrid.cli", "workers"]
        redis = ["--redis-url", redis_server.url, "--redis-prefix", redis_prefix]
        listed = subprocess.run([*cli, "quarantined", *redis], capture_output=True, text=True,
                                env=env, timeout=60)
        assert listed.returncode == 0 and "evil-1" in listed.stdout and "(now)" in listed.stdout
        done = subprocess.run([*cli, "release", "evil-1", *redis], capture_output=True,
                              text=True, env=env, timeout=60)
        assert done.returncode == 0 and "released evil-1" in done.stdout, done.stderr
        again = subprocess.run([*cli, "release", "evil-1", *redis], capture_output=True,
                               text=True, env=env, timeout=60)
        assert again.returncode == 2 and "name: worker 'evil-1' is not quarantined" in again.stderr
        wait_for(lambda: head.scheduler.pool.quarantines.reason("evil-1") is None, 10,
                 "the release reaching the scheduler")
        [period] = head.call(head.scheduler.store.withheld_periods())
        assert period["worker"] == "evil-1" and period["until"] >= period["since"]
    finally:
        head.stop()
        ray.kill(evil)
