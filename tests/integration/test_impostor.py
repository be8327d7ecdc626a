"""A stranger's actor that claims to be 1000x faster than a real worker and answers every job
with 5,000 tokens: no request is delivered or billed more than its max_tokens, and within a
few requests the impostor is quarantined and gets no more traffic."""

from __future__ import annotations

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
    finally:
        head.stop()
        ray.kill(evil)
