"""The worker link's door on a real scheduler (real Redis, real Ray, real gRPC over TLS with a
CA made for the test): who is let in, under which name, and what each refusal says."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

pytestmark = pytest.mark.integration


def _store_call(url, prefix, method, *args):
    from scheduler.redis_store import RedisStore

    async def go():
        store = RedisStore(url, prefix=prefix)
        try:
            return await getattr(store, method)(*args)
        finally:
            await store.close()
    return asyncio.run(go())


@pytest.fixture(scope="module")
def linked_head(make_worker, redis_server, tmp_path_factory):
    """A scheduler with a TLS worker link, two operators, and one in-cluster worker of acme."""
    from scheduler.config import SchedulerConfig
    from scheduler.head import SchedulerThread
    from sparkgrid.tls import make_ca, make_server_cert

    prefix = "link-test"
    tokens = {name: _store_call(redis_server.url, prefix, "add_operator", name)
              for name in ("acme", "mallory")}
    handle = make_worker("w-in-cluster", operator_token=tokens["acme"])[0]
    tls = tmp_path_factory.mktemp("tls")
    ca = make_ca(tls)
    cert, key = make_server_cert(tls, ["127.0.0.1", "localhost"], ca)
    head = SchedulerThread(SchedulerConfig(
        redis_url=redis_server.url, redis_prefix=prefix, grpc_port=0, worker_link_port=0,
        worker_link_cert=str(cert), worker_link_key=str(key), require_registration=True,
        discovery_interval_s=0.5, stats_interval_s=0.25))
    yield head, tokens, handle, ca[0]
    head.stop()


def _hello(handle, token, name, kind="linked", **changes):
    """A Hello as a worker named `name` would send it, its registration signed with `token`."""
    import ray

    from protos import worker_pb2 as pb
    from sparkgrid.registration import Registration, token_id_of

    stats = {**ray.get(handle.stats.remote()), "name": name}
    signed = ray.get(handle.registration.remote())
    fields = {k: signed[k] for k in ("model_id", "tokenizer_sha256", "weights_sha256",
                                     "gpu_type", "price_per_hour")}
    record = Registration(worker=name, token_id=token_id_of(token), kind=kind,
                          issued_at=time.time(), **{**fields, **changes})
    return pb.FromWorker(hello=pb.Hello(
        registration_json=json.dumps(record.sign(token)),
        tokenizer_files=ray.get(handle.tokenizer_files.remote()), stats_json=json.dumps(stats)))


def _link(head, ca, token, messages, keep_open=None):
    """Open a link, send `messages`; the first answer (or the error it ended with)."""
    from protos import worker_pb2_grpc

    channel = grpc.secure_channel(f"127.0.0.1:{head.scheduler.link_port}",
                                  grpc.ssl_channel_credentials(ca.read_bytes()))
    stub = worker_pb2_grpc.WorkerLinkStub(channel)

    def requests():
        yield from messages
        if keep_open is not None:
            keep_open.wait()
    metadata = [("authorization", f"Bearer {token}")] if token else []
    answers = stub.Link(requests(), metadata=metadata)
    return channel, answers


def _refusal(head, ca, token, messages) -> grpc.RpcError:
    channel, answers = _link(head, ca, token, messages)
    with channel, pytest.raises(grpc.RpcError) as err:
        next(answers)
    return err.value


def test_tokens_and_names_are_checked_before_a_worker_joins(linked_head):
    from sparkgrid.registration import new_token

    head, tokens, handle, ca = linked_head
    acme, mallory = tokens["acme"], tokens["mallory"]
    hello = _hello(handle, acme, "lk-acme")
    cases = [
        (None, [hello], grpc.StatusCode.UNAUTHENTICATED, "operator token: missing"),
        (new_token()[1], [hello], grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked"),
        ("not-a-token", [hello], grpc.StatusCode.UNAUTHENTICATED, "malformed"),
        # mallory presents acme's signed registration: no operator speaks for another
        (mallory, [hello], grpc.StatusCode.PERMISSION_DENIED, "another operator's token"),
        # mallory signs for a name acme registered
        (mallory, [_hello(handle, mallory, "w-in-cluster")], grpc.StatusCode.ALREADY_EXISTS,
         "serving already"),
        (acme, [_hello(handle, acme, "lk-2", kind="in-cluster")],
         grpc.StatusCode.INVALID_ARGUMENT, "registration.kind"),
        (acme, [_hello(handle, acme, "lk-3", model_id="other/model")],
         grpc.StatusCode.INVALID_ARGUMENT, "registration.model_id"),
    ]
    for token, messages, code, words in cases:
        err = _refusal(head, ca, token, messages)
        assert (err.code(), words in err.details()) == (code, True), err.details()
    assert "lk-acme" not in {s.stats.name for s in head.scheduler.pool.stats()}


def test_a_name_registered_by_one_operator_is_refused_to_another(linked_head):
    head, tokens, handle, ca = linked_head
    channel, answers = _link(head, ca, tokens["acme"], [_hello(handle, tokens["acme"],
                                                                "lk-taken")])
    with channel:
        assert next(answers).welcome.worker == "lk-taken"  # acme's first: registered
    err = _refusal(head, ca, tokens["mallory"], [_hello(handle, tokens["mallory"], "lk-taken")])
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "registered by another operator" in err.details()


def test_a_linked_worker_joins_the_pool_as_linked_and_leaves_with_its_link(linked_head):
    import threading

    head, tokens, handle, ca = linked_head
    from scheduler_common import wait_for

    done = threading.Event()
    channel, answers = _link(head, ca, tokens["acme"], [_hello(handle, tokens["acme"], "lk-1")],
                             keep_open=done)
    try:
        welcome = next(answers)
        assert (welcome.welcome.worker, welcome.welcome.operator) == ("lk-1", "acme")
        status = wait_for(lambda: next((s for s in head.scheduler.pool.stats()
                                        if s.stats.name == "lk-1"), None), 10, "lk-1 adopted")
        assert (status.registered.operator, status.registered.kind) == ("acme", "linked")
    finally:
        done.set()
        channel.close()
    wait_for(lambda: "lk-1" not in {s.stats.name for s in head.scheduler.pool.stats()}, 10,
             "lk-1 dropped with its link")
    registered = _store_call(head.scheduler.config.redis_url, "link-test", "registrations")
    assert registered["lk-1"]["kind"] == "linked" and registered["lk-1"]["operator"] == "acme"


def test_revoking_an_operator_closes_its_open_links_at_once(linked_head):
    import subprocess
    import sys
    import threading

    head, _, handle, ca = linked_head
    from scheduler_common import wait_for

    url = head.scheduler.config.redis_url
    token = _store_call(url, "link-test", "add_operator", "shortlived")
    done = threading.Event()
    channel, answers = _link(head, ca, token, [_hello(handle, token, "lk-revoked")],
                             keep_open=done)
    try:
        assert next(answers).welcome.operator == "shortlived"
        wait_for(lambda: "lk-revoked" in {s.stats.name for s in head.scheduler.pool.stats()},
                 10, "lk-revoked adopted")
        revoked = subprocess.run(
            [sys.executable, "-m", "sparkgrid.cli", "operators", "revoke", "shortlived",
             "--redis-url", url, "--redis-prefix", "link-test"],
            capture_output=True, text=True, timeout=60)
        assert revoked.returncode == 0, revoked.stderr
        with pytest.raises(grpc.RpcError) as err:
            next(answers)  # the head ends the link, within its 2 s watch
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in err.value.details()
        assert "lk-revoked" not in {s.stats.name for s in head.scheduler.pool.stats()}
        again = _refusal(head, ca, token, [_hello(handle, token, "lk-revoked")])
        assert again.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        done.set()
        channel.close()
