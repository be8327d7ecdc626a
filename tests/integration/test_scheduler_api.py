"""The scheduler's API end to end: real gRPC over a local port, a real local Ray cluster with
two workers on the shipped model, and a real Redis (private, append-only).

Generation streamed and unary, every bad field refused by name, API keys and their revocation,
health and reflection, cancellation, disconnects and deadlines, idempotent request ids, usage,
budgets, and TLS. Faults (a Redis outage, a killed worker, a killed scheduler) and the cost
reports after them are in `test_scheduler_faults.py`; the fixtures both use (`workers`,
`head`, `store_call`, `tenant_keys`, `client`) are in `conftest.py`.

The scheduler runs in this process on its own event-loop thread; clients are the project's
synchronous gRPC client, as a user's would be.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

ray = pytest.importorskip("ray")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402
from scheduler_common import PROMPT, days_so_far, running_on_workers, wait_for  # noqa: E402

from protos import inference_pb2 as pb  # noqa: E402
from protos.inference_pb2_grpc import InferenceStub  # noqa: E402
from scheduler.client import Client  # noqa: E402
from scheduler.config import SchedulerConfig  # noqa: E402
from scheduler.head import SchedulerThread  # noqa: E402

pytestmark = pytest.mark.integration


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
    job = wait_for(lambda: (j := client.job(last.job_id)).state == "finished" and j, 10,
                   "job final")
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
    jobs_before = head.call(head.scheduler.store.usage("tenant", "acme", *days_so_far()))
    for fields, field in cases:
        fields = {"prompt": PROMPT, **fields}
        prompt = fields.pop("prompt")
        for call in (client.complete, lambda p, **f: list(client.generate(p, **f))):
            with pytest.raises(grpc.RpcError) as err:
                call(prompt, **fields, timeout_s=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value)
            assert err.value.details().startswith(f"{field}:"), err.value.details()
    jobs_after = head.call(head.scheduler.store.usage("tenant", "acme", *days_so_far()))
    assert jobs_after == jobs_before  # refused requests were never recorded nor billed
    for bad_job_id in ("", "x" * 65):
        with pytest.raises(grpc.RpcError) as err:
            client.job(bad_job_id)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        client.job("0" * 24)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_calls_without_a_valid_key_are_unauthenticated_and_revocation_is_immediate(head,
                                                                                   store_call):
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
    replies = reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert "sparkgrid.v1.Inference" in names and "grpc.health.v1.Health" in names


def test_a_taken_port_is_refused_naming_the_option(head, persistent_redis):
    for changes, option in (({"grpc_port": head.port}, "--grpc-port"),
                            ({"grpc_port": 0, "metrics_port": _listening_port()},
                             "--metrics-port")):
        config = SchedulerConfig(redis_url=persistent_redis.url, redis_prefix="sched-test",
                                 **changes)
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
    wait_for(lambda: running_on_workers(head) == 0, 1.5, "the slot freed")
    delivered = len(first.token_ids) + sum(len(c.token_ids) for c in rest)
    job = wait_for(lambda: (j := client.job(first.job_id)).state == "cancelled" and j, 10,
                   "cancelled")
    assert job.usage.completion_tokens == delivered == rest[-1].usage.completion_tokens < 400


def test_a_client_that_disconnects_frees_the_workers_slot_within_a_second(client, head):
    stream = client.generate(PROMPT, max_tokens=400, temperature=0, timeout_s=120)
    first = next(stream)
    assert running_on_workers(head) == 1
    stream.cancel()
    wait_for(lambda: running_on_workers(head) == 0, 1.0, "the slot freed")
    job = wait_for(lambda: (j := client.job(first.job_id)).state == "cancelled" and j, 10,
                   "cancelled")
    assert job.finish_reason == "abort"


def test_a_deadline_is_honoured_and_frees_the_slot(client, head):
    with pytest.raises(grpc.RpcError) as err:
        list(client.generate(PROMPT, max_tokens=400, temperature=0, timeout_s=0.8))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: running_on_workers(head) == 0, 1.5, "the slot freed")


def test_a_repeated_request_id_returns_the_first_result_and_bills_once(client, head, tenant_keys):
    usage = lambda: head.call(head.scheduler.store.usage("tenant", "acme", *days_so_far()))  # noqa: E731
    before = sum(d["jobs"] for _, d in usage())
    first = client.complete(PROMPT, max_tokens=24, temperature=1.0, request_id="order-17")
    again = client.complete(PROMPT, max_tokens=24, temperature=1.0, request_id="order-17")
    streamed = list(client.generate(PROMPT, max_tokens=24, request_id="order-17"))
    assert again.job_id == first.job_id == streamed[-1].job_id
    assert again.text == first.text == "".join(c.text for c in streamed)
    assert again.usage == first.usage == streamed[-1].usage
    wait_for(lambda: sum(d["jobs"] for _, d in usage()) == before + 1, 10, "billed once")
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
        report = wait_for(lambda: (r := c.usage()).completion_tokens == want_completion and r, 10,
                       "usage booked")
        assert report.tenant == "globex" and report.jobs == before.jobs + 3
        assert report.prompt_tokens == (before.prompt_tokens
                                        + sum(g.usage.prompt_tokens for g in got))
        assert sum(d.completion_tokens for d in report.days) == report.completion_tokens
        with pytest.raises(grpc.RpcError) as err:
            c.usage(since="2026-13-01")
        assert (err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                and "since" in err.value.details())


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
        report = wait_for(lambda: (u := c.usage()).jobs == len(done) and u, 10, "booked")
        assert report.prompt_tokens + report.completion_tokens == used <= 300
        day = time.strftime("%Y-%m-%d", time.gmtime())
        assert store_call("quota_use", "frugal", day) == {"used": used, "reserved": 0}
        # the charge: exact micro-dollars at $1/M prompt and $3/M completion, per job
        for r in done:
            job = store_call("get_job", r.job_id)
            exact = (r.usage.prompt_tokens * 1 + r.usage.completion_tokens * 3)  # micro-dollars
            assert job["charge_uusd"] == exact and job["price_version"] == "test-1"


# -- TLS -----------------------------------------------------------------------------------------
def test_with_a_certificate_the_api_speaks_tls_only(cluster, workers, persistent_redis, tenant_keys,
                                                    tmp_path):
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
        wait_for(lambda: len(tls_head.scheduler.pool.stats()) >= 2, 30, "workers adopted")
        with Client(tls_head.endpoint, tenant_keys["acme"][1], ca_file=str(cert)) as secure:
            assert secure.complete(PROMPT, max_tokens=4, temperature=0).usage.completion_tokens > 0
        with Client(tls_head.endpoint, tenant_keys["acme"][1]) as plain, \
                pytest.raises(grpc.RpcError) as err:
            plain.workers(timeout_s=5)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        tls_head.stop()


def test_an_oversized_request_is_refused_before_it_is_parsed_or_authenticated(head, client):
    from scheduler.head import max_request_bytes

    limit = max_request_bytes(head.scheduler.config)
    with Client(head.endpoint, "sg_not-a-key") as stranger:
        with pytest.raises(grpc.RpcError) as err:
            stranger.complete("a" * (limit + 1), max_tokens=4, timeout_s=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # not UNAUTHENTICATED
    # The longest prompt the checks accept, in 4-byte characters, still reaches the checks.
    longest = "\U0001F600" * head.scheduler.config.max_prompt_chars
    with pytest.raises(grpc.RpcError) as err:
        client.complete(longest, max_tokens=4, timeout_s=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in err.value.details()


def test_a_repeat_that_asks_for_something_else_is_refused_naming_the_field(client):
    first = client.complete(PROMPT, max_tokens=8, temperature=0, request_id="order-18")
    changes = ((dict(temperature=0.5), "temperature"), (dict(max_tokens=9), "max_tokens"),
               (dict(prompt="def other():"), "prompt"))
    for change, field in changes:
        asked = dict(prompt=PROMPT, max_tokens=8, temperature=0, request_id="order-18") | change
        with pytest.raises(grpc.RpcError) as err:
            client.complete(asked.pop("prompt"), timeout_s=30, **asked)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{field}: request_id 'order-18' was first used")
    same = client.complete(PROMPT, max_tokens=8, temperature=0, request_id="order-18")
    assert same.job_id == first.job_id and same.text == first.text
