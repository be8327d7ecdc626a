"""A stranger's actor that claims to be 1000x faster than a real worker and answers every job
with 5,000 tokens: no request is delivered or billed more than its max_tokens, and within a
few requests the impostor is quarantined and gets no more traffic. One that keeps every rule
(a real worker's tokens) but is far slower than it claims loses the traffic within a few
requests too, to what the scheduler observes of its streams."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from impostors import impostor_class, relay_class

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


def test_an_audit_on_a_trusted_worker_quarantines_a_cheat_and_passes_an_honest_worker(
        make_worker, redis_server, tmp_path):
    """A worker that keeps every rule of budget, vocabulary and text but delivers tokens the
    target would not (here: token 5 over and over, greedy) is caught by an audit of its first
    job on a worker the platform trusts, and quarantined with the reason; an honest untrusted
    worker's audited jobs pass."""
    import ray
    from scheduler_common import wait_for

    from scheduler.client import Client
    from scheduler.config import SchedulerConfig
    from scheduler.head import SchedulerThread
    from scheduler.model_info import PromptTokenizer
    from sparkgrid.contract import NAMESPACE

    trusted = make_worker("w-auditor")[0]
    honest = "w-honest"  # the first test's worker: untrusted, so audited too
    stats = ray.get(trusted.stats.remote())
    claims = {**stats, "name": "cheat-1", "tokens_per_s": 1e6, "sps": {
        **stats["sps"], "steps_per_second": [s * 1000 for s in stats["sps"]["steps_per_second"]]}}
    files = ray.get(trusted.tokenizer_files.remote())
    text = PromptTokenizer(files["tokenizer.json"]).decode([5] * 8)  # its tokens' own text
    answer = {"token_ids": [5] * 8, "text": text, "finish_reason": "length",
              "usage": {"prompt_tokens": 4, "completion_tokens": 8}, "spec": {}}
    cheat = impostor_class().options(name="cheat-1", namespace=NAMESPACE).remote(
        claims, [answer], files)
    config = SchedulerConfig(redis_url=redis_server.url, redis_prefix="audits", grpc_port=0,
                             discovery_interval_s=0.5, stats_interval_s=0.25,
                             trusted_workers=("w-auditor",), audit_first_jobs=20)
    head = SchedulerThread(config)
    try:
        wait_for(lambda: {"cheat-1", "w-auditor", honest} <= {
            s.stats.name for s in head.scheduler.pool.stats()}, 30, "the workers adopted")
        _, api_key = head.call(head.scheduler.store.create_key("acme"))
        auditor = head.scheduler.auditor
        with Client(head.endpoint, api_key) as client:
            first = client.complete("def f(x):", max_tokens=8, temperature=0, timeout_s=120)
            assert list(first.token_ids) == [5] * 8  # the cheat served it (it claims speed)
            wait_for(lambda: head.scheduler.pool.quarantines.reason("cheat-1"), 60,
                     "the cheat's first job audited")
            reason = head.scheduler.pool.quarantines.reason("cheat-1")
            assert "failed the audit of job " + first.job_id in reason
            assert "w-auditor" in reason and "logits below the target's argmax" in reason
            # honest traffic now: some of it on the untrusted honest worker, all audited
            for i in range(6):
                client.complete(f"def g{i}(x):\n", max_tokens=12, temperature=0, timeout_s=120)
            why = {w.name: (w.state, w.quarantine_reason) for w in client.workers()}
        assert why["cheat-1"][0] == "quarantined" and why["cheat-1"][1] == reason
        assert why["w-auditor"][1] == "" and why[honest][1] == ""
        honest_audits = auditor.per_worker.get(honest, {})
        wait_for(lambda: auditor._queue.empty(), 60, "the audits done")
        assert honest_audits.get("failed", 0) == 0
        assert "w-auditor" not in auditor.per_worker  # a trusted worker is never audited
        assert auditor.per_worker["cheat-1"]["failed"] == 1
    finally:
        head.stop()
        ray.kill(cheat)


def test_a_worker_slower_than_it_claims_loses_the_traffic_to_what_is_observed(
        make_worker, redis_server, redis_prefix):
    import ray
    from scheduler_common import wait_for

    from scheduler.client import Client
    from scheduler.config import SchedulerConfig
    from scheduler.head import SchedulerThread
    from sparkgrid.contract import NAMESPACE
    from worker.actor import find_worker

    honest = find_worker("w-honest") or make_worker("w-honest")[0]
    stats = ray.get(honest.stats.remote())
    claims = {**stats, "name": "boast-1", "tokens_per_s": 1e6, "sps": {
        **stats["sps"], "steps_per_second": [s * 1000 for s in stats["sps"]["steps_per_second"]]}}
    boaster = relay_class().options(name="boast-1", namespace=NAMESPACE).remote(
        claims, honest, 0.1)
    config = SchedulerConfig(redis_url=redis_server.url, redis_prefix=redis_prefix, grpc_port=0,
                             discovery_interval_s=0.5, stats_interval_s=0.25)
    head = SchedulerThread(config)
    try:
        wait_for(lambda: {"boast-1", "w-honest"} <= {
            s.stats.name for s in head.scheduler.pool.stats()}, 30, "the workers adopted")
        _, api_key = head.call(head.scheduler.store.create_key("acme"))
        served = []  # jobs the boaster had served after each request
        with Client(head.endpoint, api_key) as client:
            for i in range(10):
                done = client.complete(f"def f{i}(x):", max_tokens=16, temperature=0,
                                       timeout_s=120)
                assert done.usage.completion_tokens <= 16
                served.append(ray.get(boaster.served.remote()))
            shown = {w.name: w.observed_tokens_per_second for w in client.workers()}
        # its claim wins it the first jobs; once 64 of its tokens are seen it loses the rest
        assert served[0] == 1 and served[-1] <= 8 and served[-1] == served[-4], served
        boast = next(w for w in head.scheduler.pool.snapshots() if w.name == "boast-1")
        assert boast.claim_factor < 0.01  # its claim is ~1000x what it delivers
        assert 0 < shown["boast-1"] < 100  # the operator sees why (a chunk each 0.1 s at best)
        assert head.scheduler.pool.quarantines.reason("boast-1") is None  # it broke no rule
    finally:
        head.stop()
        ray.kill(boaster)
