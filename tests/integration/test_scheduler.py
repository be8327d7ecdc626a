"""The scheduler end to end: real gRPC over a local port, a real local Ray cluster with workers
on the shipped model, and a real Redis (private, append-only, so that an outage can be staged).

The scheduler runs in this process on its own event-loop thread; clients are the project's
synchronous gRPC client, as a user's would be.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

ray = pytest.importorskip("ray")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402

from protos import inference_pb2 as pb  # noqa: E402
from protos.inference_pb2_grpc import InferenceStub  # noqa: E402
from procs import Lines  # noqa: E402
from scheduler.client import Client  # noqa: E402
from scheduler.config import SchedulerConfig  # noqa: E402
from scheduler.head import SchedulerThread  # noqa: E402
from scheduler.redis_store import RedisStore  # noqa: E402
from worker import actor  # noqa: E402

pytestmark = pytest.mark.integration
PROMPT = "def parse_args(argv):\n"
_FIRST_DAY = time.strftime("%Y-%m-%d", time.gmtime())


def _days() -> tuple[str, str]:
    """The UTC days this test module has run on so far (a run may cross midnight)."""
    return _FIRST_DAY, time.strftime("%Y-%m-%d", time.gmtime())


# Greedy, the shipped pair continues PROMPT for 400 tokens with no end-of-sequence token, so
# the tests that act on a running job use it with max_tokens=400: the job surely still runs.


def _wait(cond, timeout_s: float, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


@pytest.fixture(scope="module")
def workers(make_worker):
    """Two workers; `w-2` is emulated 2x slower, so jobs last long enough to act on."""
    return {"w-1": make_worker("w-1")[0], "w-2": make_worker("w-2", emulate_slowdown=2.0)[0]}


PRICE_BOOK = """
version = "test-1"
default_plan = "standard"
[plans.standard]
[plans.standard.prices."*"]
prompt_per_million = "1.00"
completion_per_million = "3.00"
[plans.tiny]
tokens_per_day = 300
[plans.tiny.prices."*"]
prompt_per_million = "1.00"
completion_per_million = "3.00"
"""


@pytest.fixture(scope="module")
def head(cluster, workers, persistent_redis, tmp_path_factory):
    prices = tmp_path_factory.mktemp("prices") / "prices.toml"
    prices.write_text(PRICE_BOOK)
    config = SchedulerConfig(redis_url=persistent_redis.url, redis_prefix="sched-test",
                             grpc_port=0, max_tokens_cap=512, discovery_interval_s=0.5,
                             stats_interval_s=0.25, ledger_retry_s=0.2, prices=str(prices))
    running = SchedulerThread(config)
    _wait(lambda: len(running.scheduler.pool.stats()) >= 2, 30, "both workers adopted")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def store_call(head):
    """Runs a coroutine of a RedisStore of the head's Redis, on the head's loop."""
    store = RedisStore(head.scheduler.config.redis_url, prefix=head.scheduler.config.redis_prefix)

    def call(method: str, *args):
        return head.call(getattr(store, method)(*args))
    yield call
    head.call(store.close())


@pytest.fixture(scope="module")
def tenant_keys(store_call):
    return {t: store_call("create_key", t) for t in ("acme", "globex")}


@pytest.fixture(scope="module")
def client(head, tenant_keys):
    with Client(head.endpoint, tenant_keys["acme"][1]) as c:
        yield c


def _running_on_workers(head=None) -> int:
    """Requests running or waiting on every live worker, as the workers report them."""
    live = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == actor.NAMESPACE]
    return sum(s.get("num_running", 0) + s.get("num_waiting", 0)
               for s in (ray.get(actor.find_worker(n).stats.remote()) for n in live))


# -- the API -------------------------------------------------------------------------------------
def test_streamed_and_unary_generation_agree_and_the_ledger_says_what_the_client_got(client):
    chunks = list(client.generate(PROMPT, max_tokens=40, temperature=0, timeout_s=120))
    whole = client.complete(PROMPT, max_tokens=40, temperature=0, timeout_s=120)
    assert len(chunks) > 1 and all(c.job_id == chunks[0].job_id for c in chunks)
    assert "".join(c.text for c in chunks) == whole.text and whole.text
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length") and last.finish_reason == whole.finish_reason
    assert last.usage.completion_tokens == len(whole.token_ids) == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens > 0
    job = _wait(lambda: (j := client.job(last.job_id)).state == "finished" and j, 10, "job final")
    assert job.usage == last.usage and job.finish_reason == last.finish_reason
    assert list(job.workers) and job.spec.verified_tokens >= job.spec.accepted_tokens
    assert job.created_at <= job.finished_at


def test_every_bad_field_is_refused_naming_it_before_any_work(client, head):
    cases = [
        (dict(prompt=""), "prompt"),
        (dict(prompt="x" * 70000), "prompt"),
        (dict(prompt="x = 1\n" * 700), "prompt"),  # 2800 tokens: past the 2048-token context
        (dict(prompt="x = 1\n" * 500, max_tokens=100), "max_tokens"),  # 2000 + 100 > 2048
        (dict(max_tokens=513), "max_tokens"),
        (dict(temperature=2.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=10**6), "top_k"),
        (dict(seed=2**63), "seed"),
        (dict(stop=["a"] * 9), "stop"),
        (dict(stop=["x" * 65]), "stop"),
        (dict(stop=[""]), "stop"),
        (dict(request_id="r" * 129), "request_id"),
        (dict(request_id="has space"), "request_id"),
        (dict(model="no/such-model"), "model"),
    ]
    jobs_before = head.call(head.scheduler.store.usage("tenant", "acme", *_days()))
    for fields, field in cases:
        fields = {"prompt": PROMPT, **fields}
        prompt = fields.pop("prompt")
        for call in (client.complete, lambda p, **f: list(client.generate(p, **f))):
            with pytest.raises(grpc.RpcError) as err:
                call(prompt, **fields, timeout_s=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value)
            assert err.value.details().startswith(f"{field}:"), err.value.details()
    jobs_after = head.call(head.scheduler.store.usage("tenant", "acme", *_days()))
    assert jobs_after == jobs_before  # refused requests were never recorded nor billed
    for bad_job_id in ("", "x" * 65):
        with pytest.raises(grpc.RpcError) as err:
            client.job(bad_job_id)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        client.job("0" * 24)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_calls_without_a_valid_key_are_unauthenticated_and_revocation_is_immediate(head, store_call):
    key_id, api_key = store_call("create_key", "initech")
    with Client(head.endpoint, api_key) as ok:
        assert len(ok.workers()) == 2
        for stub_call in (lambda c: c.workers(), lambda c: c.complete(PROMPT, max_tokens=2)):
            for bad in ("", "sg_nothing", api_key[:-2] + "zz", "sg_000000000000_" + "a" * 43):
                with Client(head.endpoint, bad) as c, pytest.raises(grpc.RpcError) as err:
                    stub_call(c)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, bad
        channel = grpc.insecure_channel(head.endpoint)
        with pytest.raises(grpc.RpcError) as err:  # no metadata at all
            InferenceStub(channel).ListWorkers(pb.ListWorkersRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization" in err.value.details()
        assert store_call("revoke_key", key_id) is True
        with pytest.raises(grpc.RpcError) as err:
            ok.workers()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_answer_without_a_key(head):
    channel = grpc.insecure_channel(head.endpoint)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "sparkgrid.v1.Inference"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=10)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert "sparkgrid.v1.Inference" in names and "grpc.health.v1.Health" in names


def test_a_taken_port_is_refused_naming_the_option(head, persistent_redis):
    for changes, option in (({"grpc_port": head.port}, "--grpc-port"),
                            ({"grpc_port": 0, "metrics_port": _listening_port()}, "--metrics-port")):
        config = SchedulerConfig(redis_url=persistent_redis.url, redis_prefix="sched-test", **changes)
        with pytest.raises(OSError, match=f"^{option} \\d+: cannot serve"):
            SchedulerThread(config)


def _listening_port() -> int:
    """A port something already listens on (a socket of this test's own)."""
    import socket

    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))
    sock.listen(1)
    _listening_port.keep = sock  # open until the next call
    return sock.getsockname()[1]


def test_list_workers_reports_each_workers_figures(client):
    workers = {w.name: w for w in client.workers()}
    assert set(workers) == {"w-1", "w-2"}
    for w in workers.values():
        assert w.state == "ready" and w.gpu_type == "cpu" and w.model.endswith("stdlib-pair/target")


def test_cancel_ends_the_stream_and_frees_the_workers_slot(client, head):
    stream = client.generate(PROMPT, max_tokens=400, temperature=0, timeout_s=120)
    first = next(stream)
    reply = client.cancel(first.job_id)
    assert reply.cancelled and reply.state == "cancelled"
    rest = list(stream)
    assert rest[-1].finish_reason == "abort"
    _wait(lambda: _running_on_workers(head) == 0, 1.5, "the slot freed")
    delivered = len(first.token_ids) + sum(len(c.token_ids) for c in rest)
    job = _wait(lambda: (j := client.job(first.job_id)).state == "cancelled" and j, 10, "cancelled")
    assert job.usage.completion_tokens == delivered == rest[-1].usage.completion_tokens < 400


def test_a_client_that_disconnects_frees_the_workers_slot_within_a_second(client, head):
    stream = client.generate(PROMPT, max_tokens=400, temperature=0, timeout_s=120)
    first = next(stream)
    assert _running_on_workers(head) == 1
    stream.cancel()
    _wait(lambda: _running_on_workers(head) == 0, 1.0, "the slot freed")
    job = _wait(lambda: (j := client.job(first.job_id)).state == "cancelled" and j, 10, "cancelled")
    assert job.finish_reason == "abort"


def test_a_deadline_is_honoured_and_frees_the_slot(client, head):
    with pytest.raises(grpc.RpcError) as err:
        list(client.generate(PROMPT, max_tokens=400, temperature=0, timeout_s=0.8))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait(lambda: _running_on_workers(head) == 0, 1.5, "the slot freed")


def test_a_repeated_request_id_returns_the_first_result_and_bills_once(client, head, tenant_keys):
    usage = lambda: head.call(head.scheduler.store.usage("tenant", "acme", *_days()))  # noqa: E731
    before = sum(d["jobs"] for _, d in usage())
    first = client.complete(PROMPT, max_tokens=24, temperature=1.0, request_id="order-17")
    again = client.complete(PROMPT, max_tokens=24, temperature=1.0, request_id="order-17")
    streamed = list(client.generate(PROMPT, max_tokens=24, request_id="order-17"))
    assert again.job_id == first.job_id == streamed[-1].job_id
    assert again.text == first.text == "".join(c.text for c in streamed)
    assert again.usage == first.usage == streamed[-1].usage
    _wait(lambda: sum(d["jobs"] for _, d in usage()) == before + 1, 10, "billed once")
    with Client(head.endpoint, tenant_keys["globex"][1]) as other:  # another tenant's id space
        assert other.complete(PROMPT, max_tokens=4, request_id="order-17").job_id != first.job_id
        with pytest.raises(grpc.RpcError) as err:  # and it cannot read acme's job
            other.job(first.job_id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_get_usage_agrees_with_what_the_client_received(head, tenant_keys):
    key = tenant_keys["globex"][1]
    with Client(head.endpoint, key) as c:
        before = c.usage()
        got = [c.complete(f"import os{i}\n", max_tokens=12 + i, temperature=0) for i in range(3)]
        want_completion = before.completion_tokens + sum(g.usage.completion_tokens for g in got)
        report = _wait(lambda: (r := c.usage()).completion_tokens == want_completion and r, 10,
                       "usage booked")
        assert report.tenant == "globex" and report.jobs == before.jobs + 3
        assert report.prompt_tokens == before.prompt_tokens + sum(g.usage.prompt_tokens for g in got)
        assert sum(d.completion_tokens for d in report.days) == report.completion_tokens
        with pytest.raises(grpc.RpcError) as err:
            c.usage(since="2026-13-01")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "since" in err.value.details()


def test_a_tenant_over_its_budget_is_refused_before_any_work_and_a_burst_cannot_overspend(
        head, store_call, tenant_keys):
    store_call("set_tenant_plan", "frugal", "tiny")  # 300 tokens a day
    _, key = store_call("create_key", "frugal")
    with Client(head.endpoint, key) as c:
        def one(i):
            try:
                return c.complete(f"# {i}\n" + PROMPT, max_tokens=64, temperature=0, timeout_s=120)
            except grpc.RpcError as err:
                return err
        with ThreadPoolExecutor(10) as ex:
            results = list(ex.map(one, range(10)))
        done = [r for r in results if not isinstance(r, grpc.RpcError)]
        refused = [r for r in results if isinstance(r, grpc.RpcError)]
        reserve = done[0].usage.prompt_tokens + 64
        assert len(done) == 300 // reserve and refused  # what fits, reserved in full, no more
        for err in refused:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "tokens_per_day" in err.details()
            assert float(dict(err.trailing_metadata())["retry-after-s"]) > 0
        used = sum(r.usage.prompt_tokens + r.usage.completion_tokens for r in done)
        report = _wait(lambda: (u := c.usage()).jobs == len(done) and u, 10, "booked")
        assert report.prompt_tokens + report.completion_tokens == used <= 300
        day = time.strftime("%Y-%m-%d", time.gmtime())
        assert store_call("quota_use", "frugal", day) == {"used": used, "reserved": 0}
        # the charge: exact micro-dollars at $1/M prompt and $3/M completion, per job
        for r in done:
            job = store_call("get_job", r.job_id)
            exact = (r.usage.prompt_tokens * 1 + r.usage.completion_tokens * 3)  # micro-dollars
            assert job["charge_uusd"] == exact and job["price_version"] == "test-1"


# -- faults -----------------------------------------------------------------------------------------
def test_redis_down_refuses_new_work_and_bills_a_running_job_once_when_back(head, persistent_redis, tenant_keys):
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
        after = _wait(lambda: (r := c.usage()).jobs == before.jobs + 1 and r, 20, "billed when back")
        assert after.completion_tokens == before.completion_tokens + delivered  # once, not lost
        time.sleep(1.0)
        assert c.usage().jobs == before.jobs + 1


def test_a_worker_killed_mid_stream_is_lossless_at_temperature_0(client, head, make_worker):
    params = dict(max_tokens=160, temperature=0)
    reference = client.complete(PROMPT, **params, timeout_s=180)
    stream = client.generate(PROMPT, **params, timeout_s=180)
    got = [next(stream), next(stream)]
    job_id = got[0].job_id
    serving = _wait(lambda: list(client.job(job_id).workers), 5, "the job's worker")[-1]
    actor.kill(actor.find_worker(serving))
    got += list(stream)
    _wait(lambda: serving not in {w.name for w in client.workers()}, 5, "the lost worker dropped")
    assert "".join(c.text for c in got) == reference.text
    assert [t for c in got for t in c.token_ids] == list(reference.token_ids)
    assert got[-1].usage == reference.usage
    job = _wait(lambda: (j := client.job(job_id)).state == "finished" and j, 10, "job final")
    assert len(job.workers) == 2 and job.workers[0] == serving != job.workers[1]
    assert job.usage.completion_tokens == len(reference.token_ids)
    make_worker(serving, emulate_slowdown=2.0 if serving == "w-2" else 1.0)  # for what follows
    _wait(lambda: len(head.scheduler.pool.stats()) == 2, 5, "the new worker adopted")


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
        def booked():
            r = clients[t].usage()
            return (r.jobs - before[t].jobs, r.prompt_tokens - before[t].prompt_tokens,
                    r.completion_tokens - before[t].completion_tokens)
        _wait(lambda: booked() == tuple(received[t]), 20, f"{t}'s ledger equal to what it received")
    for c in clients.values():
        c.close()


def test_cost_reports_agree_with_get_usage_and_with_each_other(head, tenant_keys):
    """After the real requests above (two tenants, several workers, failovers): every report's
    totals equal what GetUsage says each tenant received, and the reports agree."""
    from scheduler.reports import build_reports

    head.call(head.scheduler._flush_worker_time())  # the workers' time so far, into the ledger
    days = _days()
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
           "cli-test", "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "-1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SPARKGRID_HOME": str(home)})
    line = Lines(proc).until("serving sparkgrid.v1.Inference", 120)[-1]
    match = re.search(r"on 127\.0\.0\.1:(\d+)", line)
    assert match, line
    return proc, f"127.0.0.1:{match.group(1)}"


def test_the_head_command_serves_and_a_killed_scheduler_s_jobs_are_settled_once(
        cluster, workers, persistent_redis, tmp_path):
    created = _sparkgrid("keys", "create", "--tenant", "cli-co", "--redis-url", persistent_redis.url,
                         "--redis-prefix", "cli-test", home=tmp_path)
    assert created.returncode == 0, created.stderr
    api_key = re.search(r"api key: (\S+)", created.stdout).group(1)
    bad = _sparkgrid("keys", "create", "--tenant", "no spaces", "--redis-url", persistent_redis.url,
                     home=tmp_path)
    assert bad.returncode == 2 and "tenant" in bad.stderr and "Traceback" not in bad.stderr

    proc, endpoint = _start_head(cluster, persistent_redis.url, tmp_path)
    try:
        _wait(lambda: Client(endpoint, api_key).workers(), 30, "workers seen by the head")
        shown = _sparkgrid("workers", "--endpoint", endpoint, "--api-key", api_key, home=tmp_path)
        live = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == actor.NAMESPACE}
        assert shown.returncode == 0 and len(live) == 2
        assert all(name in shown.stdout for name in live), shown.stdout
        out = _sparkgrid("generate", "--endpoint", endpoint, "--api-key", api_key,
                         "--max-tokens", "12", "--temperature", "0", PROMPT, home=tmp_path)
        assert out.returncode == 0 and out.stdout and "completion tokens" in out.stderr
        wrong = _sparkgrid("generate", "--endpoint", endpoint, "--api-key", api_key,
                           "--temperature", "9", PROMPT, home=tmp_path)
        assert wrong.returncode == 2 and "INVALID_ARGUMENT: temperature" in wrong.stderr

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
    _wait(lambda: _running_on_workers() == 0, 20, "the orphaned job freed on its worker")

    for restart in range(2):  # a restarted scheduler settles it; a second restart bills nothing more
        proc, endpoint = _start_head(cluster, persistent_redis.url, tmp_path)
        try:
            with Client(endpoint, api_key) as again:
                job = again.job(first.job_id)
                assert job.state == "failed" and "stopped" in job.error
                assert 0 < job.usage.completion_tokens <= received
                after = again.usage()
                assert after.jobs == before.jobs + 1
                assert after.completion_tokens == before.completion_tokens + job.usage.completion_tokens
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0


def test_with_a_certificate_the_api_speaks_tls_only(cluster, workers, persistent_redis, tenant_keys, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    config = SchedulerConfig(redis_url=persistent_redis.url, redis_prefix="sched-test",
                             grpc_port=0, tls_cert=str(cert), tls_key=str(key))
    tls_head = SchedulerThread(config)
    try:
        _wait(lambda: len(tls_head.scheduler.pool.stats()) >= 2, 30, "workers adopted")
        with Client(tls_head.endpoint, tenant_keys["acme"][1], ca_file=str(cert)) as secure:
            assert secure.complete(PROMPT, max_tokens=4, temperature=0).usage.completion_tokens > 0
        with Client(tls_head.endpoint, tenant_keys["acme"][1]) as plain, \
                pytest.raises(grpc.RpcError) as err:
            plain.workers(timeout_s=5)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        tls_head.stop()
