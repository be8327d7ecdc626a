"""The scheduler end to end under faults: a Redis outage, a worker killed mid-stream, 200
mixed requests with a worker killed among them, and a scheduler process killed mid-job; then
the cost reports, which must agree with what the clients received. Real gRPC, a real local Ray
cluster with two workers on the shipped model, a real Redis (private, append-only, so that an
outage can be staged). The tests run in order: the reports check the requests made above.

The fixtures (`workers`, `head`, `store_call`, `tenant_keys`, `client`) are in `conftest.py`;
the API without faults is tested in `test_scheduler_api.py`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

ray = pytest.importorskip("ray")

from procs import Lines  # noqa: E402
from scheduler_common import PROMPT, days_so_far, running_on_workers, wait_for  # noqa: E402

from scheduler.client import Client  # noqa: E402
from worker import actor  # noqa: E402

pytestmark = pytest.mark.integration


# -- faults ----------------------------------------------------------------------------------------
def test_redis_down_refuses_new_work_and_bills_a_running_job_once_when_back(head, persistent_redis,
                                                                            tenant_keys):
    with Client(head.endpoint, tenant_keys["globex"][1]) as c:
        before = c.usage()
        stream = c.generate(PROMPT, max_tokens=60, temperature=0, timeout_s=120)
        first = next(stream)
        persistent_redis.stop()
        try:
            rest = list(stream)  # the running job finishes for its client
            with pytest.raises(grpc.RpcError) as err:
                c.complete(PROMPT, max_tokens=4, timeout_s=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Redis" in err.value.details() or "store" in err.value.details()
        finally:
            persistent_redis.start()
        delivered = len(first.token_ids) + sum(len(x.token_ids) for x in rest)
        assert rest[-1].usage.completion_tokens == delivered
        after = wait_for(lambda: (r := c.usage()).jobs == before.jobs + 1 and r, 20,
                         "billed when back")
        assert after.completion_tokens == before.completion_tokens + delivered  # once, not lost
        time.sleep(1.0)
        assert c.usage().jobs == before.jobs + 1


def test_a_worker_killed_mid_stream_is_lossless_at_temperature_0(client, head, make_worker):
    params = dict(max_tokens=160, temperature=0)
    reference = client.complete(PROMPT, **params, timeout_s=180)
    stream = client.generate(PROMPT, **params, timeout_s=180)
    got = [next(stream), next(stream)]
    job_id = got[0].job_id
    serving = wait_for(lambda: list(client.job(job_id).workers), 5, "the job's worker")[-1]
    actor.kill(actor.find_worker(serving))
    got += list(stream)
    wait_for(lambda: serving not in {w.name for w in client.workers()}, 5,
             "the lost worker dropped")
    assert "".join(c.text for c in got) == reference.text
    assert [t for c in got for t in c.token_ids] == list(reference.token_ids)
    assert got[-1].usage == reference.usage
    job = wait_for(lambda: (j := client.job(job_id)).state == "finished" and j, 10, "job final")
    assert len(job.workers) == 2 and job.workers[0] == serving != job.workers[1]
    assert job.usage.completion_tokens == len(reference.token_ids)
    make_worker(serving, emulate_slowdown=2.0 if serving == "w-2" else 1.0)  # for what follows
    wait_for(lambda: len(head.scheduler.pool.stats()) == 2, 5, "the new worker adopted")


def test_reconciliation_over_200_mixed_requests(head, tenant_keys, make_worker):
    """Plain, cancelled (Cancel RPC) and failed-over jobs of two tenants: each tenant's ledger
    totals equal the sums of the usage its clients received, exactly."""
    tenants = {t: tenant_keys[t][1] for t in ("acme", "globex")}
    clients = {t: Client(head.endpoint, k) for t, k in tenants.items()}
    before = {t: clients[t].usage() for t in tenants}
    kill_at = threading.Event()

    def one(i: int):
        tenant = ("acme", "globex")[i % 2]
        c = clients[tenant]
        stream = c.generate(f"# task {i}\ndef f{i}(x):\n", max_tokens=8 + i % 24,
                            temperature=(0, 0.7, 1.0)[i % 3], seed=i, timeout_s=300)
        chunks = [next(stream)]
        if i % 7 == 3:
            c.cancel(chunks[0].job_id)
        if i == 100:
            kill_at.set()
        chunks += list(stream)
        return tenant, chunks[-1].usage, chunks[-1].finish_reason, chunks[0].job_id

    def killer():
        kill_at.wait(300)
        actor.kill(actor.find_worker("w-1"))
        make_worker("w-3")

    killing = threading.Thread(target=killer)
    killing.start()
    with ThreadPoolExecutor(12) as ex:
        results = list(ex.map(one, range(200)))
    killing.join()
    received = {t: [0, 0, 0] for t in tenants}
    for tenant, usage, _, _ in results:
        received[tenant][0] += 1
        received[tenant][1] += usage.prompt_tokens
        received[tenant][2] += usage.completion_tokens
    reasons = {r for _, _, r, _ in results}
    assert "abort" in reasons and reasons <= {"abort", "stop", "length"}
    records = [head.call(head.scheduler.store.get_job(j)) for _, _, _, j in results]
    assert any(len(r["workers"]) > 1 for r in records), "no job failed over"
    for t in tenants:
        def booked(t=t):
            r = clients[t].usage()
            return (r.jobs - before[t].jobs, r.prompt_tokens - before[t].prompt_tokens,
                    r.completion_tokens - before[t].completion_tokens)
        wait_for(lambda t=t: booked() == tuple(received[t]), 20,
                 f"{t}'s ledger equal to what it received")
    for c in clients.values():
        c.close()


def test_cost_reports_agree_with_get_usage_and_with_each_other(head, tenant_keys):
    """After the real requests above (two tenants, several workers, failovers): every report's
    totals equal what GetUsage says each tenant received, and the reports agree."""
    from scheduler.reports import build_reports

    head.call(head.scheduler._flush_worker_time())  # the workers' time so far, into the ledger
    days = days_so_far()
    reports = head.call(build_reports(head.scheduler.store, *days))
    tenants = {r["tenant"]: r for r in reports["tenant"].rows}
    for name in ("acme", "globex"):
        with Client(head.endpoint, tenant_keys[name][1]) as c:
            got = c.usage(since=days[0], until=days[1])
        row = tenants[name]
        assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == \
               (got.jobs, got.prompt_tokens, got.completion_tokens)
    totals = {by: r.totals for by, r in reports.items()}
    served = sum(r["completion_tokens"] for r in reports["tenant"].rows)
    assert totals["tenant"]["completion_tokens"] == served == totals["day"]["completion_tokens"]
    assert totals["worker"]["tokens_served"] == served == totals["gpu"]["tokens_served"]
    assert totals["tenant"]["charges_usd"] == totals["day"]["charges_usd"] > 0
    assert totals["worker"]["revenue_usd"] == totals["tenant"]["charges_usd"]
    assert totals["worker"]["gpu_cost_usd"] == totals["tenant"]["gpu_cost_usd"] == \
           totals["day"]["gpu_cost_usd"] == totals["gpu"]["gpu_cost_usd"]
    assert totals["worker"]["online_hours"] > 0 and 0 < totals["worker"]["utilisation"] <= 1


# -- the `sparkgrid head`, `keys`, `generate` and `workers` commands; a scheduler that dies --------
def _sparkgrid(*args, home, timeout_s=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("sparkgrid")), *args],
                          capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "SPARKGRID_HOME": str(home)})


def _start_head(cluster, redis_url: str, home) -> tuple[subprocess.Popen, str]:
    cmd = [str(Path(sys.executable).with_name("sparkgrid")), "head", "--ray-address",
           ray.get_runtime_context().gcs_address, "--redis-url", redis_url, "--redis-prefix",
           "cli-test", "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "-1",
           "--lease", "3s",  # a killed one's jobs are orphans 3 s after its last renewal
           "--allow-unregistered"]  # the module's workers have no operator (not tested here)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SPARKGRID_HOME": str(home)})
    line = Lines(proc).until("serving sparkgrid.v1.Inference", 120)[-1]
    match = re.search(r"on 127\.0\.0\.1:(\d+)", line)
    assert match, line
    return proc, f"127.0.0.1:{match.group(1)}"


def test_the_head_command_serves_and_a_killed_scheduler_s_jobs_are_settled_once(
        cluster, workers, persistent_redis, tmp_path):
    created = _sparkgrid("keys", "create", "--tenant", "cli-co", "--redis-url",
                         persistent_redis.url, "--redis-prefix", "cli-test", home=tmp_path)
    assert created.returncode == 0, created.stderr
    api_key = re.search(r"api key: (\S+)", created.stdout).group(1)
    bad = _sparkgrid("keys", "create", "--tenant", "no spaces", "--redis-url", persistent_redis.url,
                     home=tmp_path)
    assert bad.returncode == 2 and "tenant" in bad.stderr and "Traceback" not in bad.stderr

    proc, endpoint = _start_head(cluster, persistent_redis.url, tmp_path)
    try:
        wait_for(lambda: Client(endpoint, api_key).workers(), 30, "workers seen by the head")
        shown = _sparkgrid("workers", "--endpoint", endpoint, "--api-key", api_key, home=tmp_path)
        live = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == actor.NAMESPACE}
        assert shown.returncode == 0 and len(live) == 2
        assert all(name in shown.stdout for name in live), shown.stdout
        out = _sparkgrid("generate", "--endpoint", endpoint, "--api-key", api_key,
                         "--max-tokens", "12", "--temperature", "0", PROMPT, home=tmp_path)
        assert out.returncode == 0 and out.stdout and "completion tokens" in out.stderr
        wrong = _sparkgrid("generate", "--endpoint", endpoint, "--api-key", api_key,
                           "--max-tokens", "99999", PROMPT, home=tmp_path)  # the server's cap
        assert wrong.returncode == 2 and "INVALID_ARGUMENT: max_tokens" in wrong.stderr
        local = _sparkgrid("generate", "--endpoint", endpoint, "--api-key", api_key,
                           "--temperature", "9", PROMPT, home=tmp_path)  # refused before a call
        assert local.returncode == 2 and "--temperature" in local.stderr

        client = Client(endpoint, api_key)
        before = client.usage()
        stream = client.generate(PROMPT, max_tokens=1500, temperature=0, timeout_s=120)
        first = next(stream)
        received = len(first.token_ids)
        started = time.monotonic()
        while time.monotonic() - started < 1.5:  # past a progress record (one a second)
            received += len(next(stream).token_ids)
        proc.kill()  # the scheduler dies without writing the job's end
        proc.wait(10)
        with pytest.raises(grpc.RpcError):
            list(stream)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Ray would let the orphan run on to its 1,500 tokens (about 15 s here); its lease, no
    # longer renewed, lapses 10 s after the last read (JOB_LEASE_S) and the worker aborts it
    wait_for(lambda: running_on_workers() == 0, 20, "the orphaned job freed on its worker")

    # a restarted scheduler settles it; a second restart bills nothing more
    for _restart in range(2):
        proc, endpoint = _start_head(cluster, persistent_redis.url, tmp_path)
        try:
            with Client(endpoint, api_key) as again:  # settled at its first sweep
                job = wait_for(lambda: (j := again.job(first.job_id)).state == "failed" and j,
                               10, "the orphan settled")
                assert "stopped" in job.error
                assert 0 < job.usage.completion_tokens <= received
                after = again.usage()
                assert after.jobs == before.jobs + 1
                assert after.completion_tokens == (before.completion_tokens
                                                   + job.usage.completion_tokens)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
