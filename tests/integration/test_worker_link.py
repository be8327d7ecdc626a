"""Who a scheduler that requires registrations (the default of `sparkgrid head` and `up`) lets
serve, on a real scheduler (real Redis, real Ray, real gRPC over TLS with a CA made for the
test): in the cluster, only actors whose operator signed their registration, with the name,
GPU type and price of it; through the worker link, only a live operator's token with a
registration signed by it, under a name no other operator holds; a revoked operator's workers
and links are dropped at once. What each refusal says."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
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
    from scheduler_common import linked_scheduler

    prefix = "link-test"
    tokens = {name: _store_call(redis_server.url, prefix, "add_operator", name)
              for name in ("acme", "mallory")}
    handle = make_worker("w-in-cluster", operator_token=tokens["acme"])[0]
    head, ca = linked_scheduler(redis_server.url, prefix, tmp_path_factory.mktemp("tls"))
    yield head, tokens, handle, ca
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
            next(answers)  # the head ends the link at its next discovery round
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in err.value.details()
        assert "lk-revoked" not in {s.stats.name for s in head.scheduler.pool.stats()}
        again = _refusal(head, ca, token, [_hello(handle, token, "lk-revoked")])
        assert again.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        done.set()
        channel.close()


def test_in_the_cluster_only_registered_actors_serve_with_their_registered_price(linked_head,
                                                                                 tmp_path):
    import ray
    from impostors import impostor_class
    from scheduler_common import wait_for

    from scheduler.client import Client
    from sparkgrid.contract import NAMESPACE
    from sparkgrid.registration import Registration, token_id_of

    head, tokens, honest, ca = linked_head
    url, pool = head.scheduler.config.redis_url, head.scheduler.pool
    other = _store_call(url, "link-test", "add_operator", "other-op")
    stats = ray.get(honest.stats.remote())
    files = ray.get(honest.tokenizer_files.remote())
    signed = ray.get(honest.registration.remote())
    answer = {"token_ids": [5] * 4, "text": "x" * 4, "finish_reason": "length",
              "usage": {"prompt_tokens": 4, "completion_tokens": 4}, "spec": {}}
    fast = {**stats, "tokens_per_s": 1e6, "sps": {**stats["sps"], "steps_per_second": [
        s * 1000 for s in stats["sps"]["steps_per_second"]]}}
    # other-op's own worker, registered at 0.50/h, whose figures claim another name and price
    own = Registration(worker="m-1", token_id=token_id_of(other), model_id=stats["model_id"],
                       tokenizer_sha256=signed["tokenizer_sha256"],
                       weights_sha256=signed["weights_sha256"], gpu_type="A100",
                       price_per_hour=0.5, issued_at=time.time()).sign(other)
    actors = {"evil-0": None,  # no registration at all: any actor of the namespace
              "evil-2": signed,  # the honest worker's registration, replayed under another name
              "m-1": own}
    made = [impostor_class().options(name=name, namespace=NAMESPACE).remote(
        {**fast, "name": "w-in-cluster" if name == "m-1" else name, "price_per_hour": 99.0},
        [answer], files, registration) for name, registration in actors.items()]
    try:
        wait_for(lambda: {"evil-0", "evil-2"} <= set(pool._refused), 30, "the refusals")
        assert "has no registration" in pool._refused["evil-0"]
        assert "registration.worker: signed for 'w-in-cluster'" in pool._refused["evil-2"]
        wait_for(lambda: "m-1" in {s.stats.name for s in pool.stats()}, 30, "m-1 adopted")
        _, api_key = head.call(head.scheduler.store.create_key("reg-tenant"))
        with Client(head.endpoint, api_key) as client:
            shown = {w.name: w for w in client.workers()}
            assert {"w-in-cluster", "m-1"} <= set(shown) and "evil-0" not in shown
            assert (shown["m-1"].operator, shown["m-1"].kind) == ("other-op", "in-cluster")
            assert (shown["m-1"].price_per_hour, shown["m-1"].gpu_type) == (0.5, "A100")
            assert shown["w-in-cluster"].operator == "acme"
            # the platform revokes other-op: m-1 gets nothing more, and is not adopted again
            revoked = subprocess.run(
                [sys.executable, "-m", "sparkgrid.cli", "operators", "revoke", "other-op",
                 "--redis-url", url, "--redis-prefix", "link-test"],
                capture_output=True, text=True, timeout=60,
                env={**os.environ, "SPARKGRID_HOME": str(tmp_path)})
            assert revoked.returncode == 0 and "revoked other-op" in revoked.stdout
            wait_for(lambda: "m-1" not in {s.stats.name for s in pool.stats()}, 10,
                     "the revoked operator's worker dropped")
            served = [client.complete("def f(x):", max_tokens=8, temperature=0, timeout_s=120)
                      for _ in range(3)]
            assert {w for c in served for w in client.job(c.job_id).workers} == {
                "w-in-cluster"}
            wait_for(lambda: "m-1" in pool._refused, 10, "m-1 refused on its next adoption")
            assert "unknown or revoked" in pool._refused["m-1"]
        registered = _store_call(url, "link-test", "registrations")
        assert registered["w-in-cluster"]["operator"] == "acme"
        assert registered["w-in-cluster"]["weights_sha256"] == signed["weights_sha256"]
        assert registered["m-1"]["operator"] == "other-op"
        assert "evil-0" not in registered and "evil-2" not in registered
    finally:
        for actor in made:
            ray.kill(actor)
