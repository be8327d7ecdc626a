"""A stranger's GPU through the worker link, on one machine: an operator made with `sparkgrid
operators add` joins with `sparkgrid worker --join` (its engine in a Ray of its own), serves
requests, is never a node nor an actor of the platform's Ray cluster, and when its process is
killed mid-stream its job resumes on the platform's own worker with no text lost. Real Redis,
two real Ray clusters, real gRPC over TLS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from procs import Lines

pytestmark = pytest.mark.integration
PREFIX = "link-stack"
N_TOKENS = 400  # the shipped pair writes no end-of-sequence token that soon


def _cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "sparkgrid.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def platform(make_worker, redis_server, sparkgrid_home, tmp_path_factory):
    """The platform: a scheduler with a TLS worker link, and its own registered worker."""
    from scheduler_common import linked_scheduler

    env = {**os.environ, "SPARKGRID_HOME": str(sparkgrid_home)}
    redis = ["--redis-url", redis_server.url, "--redis-prefix", PREFIX]
    tokens = {}
    for name in ("platform", "acme"):
        added = _cli("operators", "add", name, *redis, env=env)
        assert added.returncode == 0, added.stderr
        tokens[name] = next(line.split()[-1] for line in added.stdout.splitlines()
                            if line.startswith("token:"))
    make_worker("w-home", operator_token=tokens["platform"])
    head, ca = linked_scheduler(redis_server.url, PREFIX, tmp_path_factory.mktemp("link_tls"))
    _, api_key = head.call(head.scheduler.store.create_key("tenant-a"))
    yield head, api_key, tokens, ca, env
    head.stop()


@pytest.fixture(scope="module")
def joined(platform, served_pair):
    """`sparkgrid worker --join` running, its worker `acme-1` adopted as linked."""
    from scheduler_common import wait_for

    head, _, tokens, ca, env = platform
    env = {k: v for k, v in env.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparkgrid.cli", "worker", "--join",
         f"127.0.0.1:{head.scheduler.link_port}", "--token", tokens["acme"], "--ca", str(ca),
         "--name", "acme-1", "--target", served_pair[0], "--draft", served_pair[1],
         "--device", "cpu", "--max-batch-tokens", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    lines = Lines(proc)
    try:
        lines.until("linked", 300)
        wait_for(lambda: "acme-1" in {s.stats.name for s in head.scheduler.pool.stats()}, 60,
                 "acme-1 adopted through its link")
        yield proc, lines
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _quarantined(head, name: str, on: bool) -> None:
    """Keep the platform's worker out of routing (or let it back), so the test knows where a
    job runs: a quarantine is what an operator of the platform can do to any worker."""
    from scheduler_common import wait_for

    store, pool = head.scheduler.store, head.scheduler.pool
    if on:
        head.call(store.quarantine_worker(name, "test: route to the linked worker", time.time()))
        wait_for(lambda: pool.quarantines.reason(name), 15, f"{name} quarantined")
    else:
        head.call(store.release_worker(name, time.time()))
        wait_for(lambda: pool.quarantines.reason(name) is None, 15, f"{name} released")


def test_a_linked_worker_serves_and_is_no_part_of_the_platforms_cluster(platform, joined):
    import ray

    from scheduler.client import Client

    head, api_key, *_ = platform
    # the platform's cluster: this test's one node, and no actor of the operator
    assert len([n for n in ray.nodes() if n["Alive"]]) == 1
    assert "acme-1" not in {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    _quarantined(head, "w-home", True)
    try:
        with Client(head.endpoint, api_key) as client:
            shown = {w.name: w for w in client.workers()}
            assert (shown["acme-1"].kind, shown["acme-1"].operator) == ("linked", "acme")
            assert (shown["w-home"].kind, shown["w-home"].operator) == ("in-cluster", "platform")
            done = [client.complete(f"def f{i}(x):\n", max_tokens=12, temperature=0,
                                    timeout_s=180) for i in range(3)]
            for c in done:
                assert list(client.job(c.job_id).workers) == ["acme-1"]
                assert c.usage.completion_tokens == len(c.token_ids) > 0 and c.text
    finally:
        _quarantined(head, "w-home", False)


def test_killing_the_linked_workers_process_mid_stream_loses_no_text(platform, joined):
    from scheduler_common import PROMPT

    from scheduler.client import Client

    head, api_key, *_ = platform
    proc, _ = joined
    with Client(head.endpoint, api_key) as client:
        _quarantined(head, "acme-1", False)
        _quarantined(head, "w-home", True)  # the job starts on the linked worker
        stream = client.generate(PROMPT, max_tokens=N_TOKENS, temperature=0, timeout_s=300)
        pieces = [next(stream)]
        # killed at once, before the platform's worker is let back: on a fast CPU the job would
        # otherwise finish on the linked worker first; the failover waits for a worker to take it
        os.killpg(proc.pid, signal.SIGKILL)  # the operator's process, its Ray and engine
        _quarantined(head, "w-home", False)  # somewhere to resume
        job_id = pieces[0].job_id
        pieces += list(stream)
        text = "".join(p.text for p in pieces)
        ids = [t for p in pieces for t in p.token_ids]
        record = client.job(job_id)
        # the same request, whole on the platform's worker: greedy, so the same tokens
        whole = client.complete(PROMPT, max_tokens=N_TOKENS, temperature=0, timeout_s=300)
    assert list(record.workers) == ["acme-1", "w-home"]
    assert pieces[-1].finish_reason == "length" and record.state == "finished"
    assert ids == list(whole.token_ids) and text == whole.text
    assert record.usage.completion_tokens == len(ids) == N_TOKENS
