"""The worker's side of the worker link (`worker/link_session.py`, `worker/link.py`): a session
against a small head of the test's own over real gRPC on a local socket, with a fake worker in
place of the Ray actor (no Ray here). It says hello with a signed `linked` registration and the
token, streams jobs in order, forwards cancels, renewals and audits, reports refused and failed
jobs by kind, dials again after a drop (cancelling the dropped jobs), stops at answers no retry
can change with what to fix, and lets a slow head make the job streams wait. The command
around it: tests/unit/test_link_join.py."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time

import grpc
import pytest

from protos import worker_pb2 as pb
from protos import worker_pb2_grpc as pb_grpc
from sparkgrid.registration import Registration, new_token, token_sha256
from worker.link_session import Head, LinkRefused, LinkSession, LinkSettings, WorkerGone

FAST = LinkSettings(queue_size=256, figures_poll_s=0.02, heartbeat_s=0.05, backoff_first_s=0.01,
                    backoff_max_s=0.05, welcome_timeout_s=10.0)
WAIT_S = 20.0
"""How long a scenario may wait for what it expects before it fails (never a speed check)."""


class FakeWorker:
    """The methods of a worker actor, scripted: a job's prompt ids say what it does."""

    def __init__(self, chunk_text: str = "x", chunks: int = 5):
        self.chunk_text, self.chunks = chunk_text, chunks
        self.generated: list[tuple] = []
        self.produced = 0  # chunks handed to the session
        self.cancelled: list[str] = []
        self.renewed: list[tuple] = []
        self.health = ""
        self.gone = False
        self.hold = asyncio.Event()  # jobs with prompt [0] wait on it after their first chunk

    async def generate(self, job_id, prompt_ids, params, resume, lease_s):
        self.generated.append((job_id, prompt_ids, params, resume, lease_s))
        if prompt_ids == [666]:
            raise ValueError("prompt_ids: token 666 is out of the vocabulary")
        for i in range(self.chunks):
            if prompt_ids == [500] and i == 2:
                raise RuntimeError("the engine failed")
            last = i == self.chunks - 1 and prompt_ids != [404]
            self.produced += 1
            yield {"index": i, "text": self.chunk_text, "finish_reason": "stop" if last else None}
            if prompt_ids == [0]:
                await self.hold.wait()

    async def cancel(self, job_id):
        self.cancelled.append(job_id)
        return True

    async def renew(self, job_ids, lease_s):
        self.renewed.append((job_ids, lease_s))
        return []

    async def score(self, prompt_ids, token_ids, temperature):
        if not token_ids:
            raise ValueError("token_ids: expected at least one token")
        return {"logprobs": [-0.5] * len(token_ids), "temperature": temperature}

    async def tokenizer_files(self):
        return {"tokenizer.json": b'{"model": {}}'}

    async def stats(self):
        if self.gone:
            raise WorkerGone("worker w1 died: killed")
        return {"name": "w1", "state": "ready"}

    async def check_health(self):
        if self.health:
            raise RuntimeError(self.health)


class Conn:
    """One link as the test's head sees it."""

    def __init__(self, hello: pb.Hello, metadata: dict):
        self.hello, self.metadata = hello, metadata
        self.up: asyncio.Queue = asyncio.Queue()  # what the worker sent after its hello
        self.down: asyncio.Queue = asyncio.Queue()  # what to send it; None ends the stream

    async def next_up(self, kind: str):
        while True:
            message = await asyncio.wait_for(self.up.get(), WAIT_S)
            if message.WhichOneof("message") == kind:
                return getattr(message, kind)


class LinkHead(pb_grpc.WorkerLinkServicer):
    """A head's worker link that welcomes every hello (or refuses with `refuse`)."""

    def __init__(self, refuse: tuple | None = None, read_up: bool = True):
        self.refuse, self.read_up = refuse, read_up
        self.conns: asyncio.Queue = asyncio.Queue()
        self.count = 0

    async def Link(self, request_iterator, context):
        hello = (await request_iterator.__anext__()).hello
        self.count += 1
        conn = Conn(hello, dict(context.invocation_metadata()))
        await self.conns.put(conn)
        if self.refuse is not None:
            await context.abort(*self.refuse)
        reader = asyncio.create_task(self._read(request_iterator, conn)) if self.read_up else None
        try:
            yield pb.ToWorker(welcome=pb.Welcome(worker="w1", operator="acme"))
            while (message := await conn.down.get()) is not None:
                yield message
        finally:
            if reader is not None:
                reader.cancel()

    @staticmethod
    async def _read(request_iterator, conn: Conn) -> None:
        async for message in request_iterator:
            await conn.up.put(message)

    async def next_conn(self) -> Conn:
        return await asyncio.wait_for(self.conns.get(), WAIT_S)


def _record(token: str) -> Registration:
    return Registration(worker="w1", token_id=token.split("_")[1], model_id="org/model",
                        tokenizer_sha256="a" * 64, weights_sha256="b" * 64, gpu_type="cpu",
                        price_per_hour=0.5, kind="linked", issued_at=1.0)


async def _with_session(scenario, head: LinkHead | None = None, worker: FakeWorker | None = None,
                        settings: LinkSettings = FAST, address: str | None = None):
    """Run `scenario(session, head, worker, said)` beside a session linked to `head`; returns
    the scenario's result, or raises what the session raised."""
    head = head or LinkHead()
    worker = worker or FakeWorker()
    server = grpc.aio.server()
    pb_grpc.add_WorkerLinkServicer_to_server(head, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    _, token = new_token()
    said: list[str] = []
    session = LinkSession(worker, _record(token), Head(address or f"127.0.0.1:{port}", token,
                                                       plaintext=True), settings, said.append)
    running = asyncio.create_task(session.run())
    try:
        scenario_task = asyncio.create_task(scenario(session, head, worker, said))
        await asyncio.wait({running, scenario_task}, timeout=WAIT_S * 2,
                           return_when=asyncio.FIRST_COMPLETED)
        if running.done() and not scenario_task.done():
            scenario_task.cancel()
            running.result()  # what ended the session
        result = await scenario_task
        session.stop()
        await asyncio.wait_for(running, WAIT_S)
        return result
    finally:
        running.cancel()
        await server.stop(None)


def _generate(job_id: str, prompt_ids: list[int], lease_s: float = 10.0) -> pb.ToWorker:
    return pb.ToWorker(generate=pb.Generate(
        job_id=job_id, prompt_ids=prompt_ids, params_json=json.dumps({"max_tokens": 7}),
        resume_json="", lease_s=lease_s))


async def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"waited {WAIT_S:g} s for {what}"
        await asyncio.sleep(0.01)


def test_hello_carries_the_token_and_a_signed_linked_registration_then_figures_flow():
    async def scenario(session, head, worker, said):
        conn = await head.next_conn()
        assert conn.metadata["authorization"] == f"Bearer {session.head.token}"
        raw = json.loads(conn.hello.registration_json)
        record = Registration.from_signed(raw, token_sha256(session.head.token))
        assert (record.worker, record.kind) == ("w1", "linked")
        assert record.issued_at > 1.0, "signed afresh for each hello"
        assert dict(conn.hello.tokenizer_files) == {"tokenizer.json": b'{"model": {}}'}
        assert json.loads(conn.hello.stats_json) == {"name": "w1", "state": "ready"}
        first = await conn.next_up("figures")
        assert json.loads(first.stats_json)["state"] == "ready" and first.health_error == ""
        heartbeat = await conn.next_up("figures")
        assert heartbeat.stats_json == "", "unchanged figures go as a heartbeat"
        worker.health = "engine loop stuck for 30 s"
        while (figures := await conn.next_up("figures")).health_error == "":
            pass
        assert figures.health_error == "engine loop stuck for 30 s"
        assert session.welcome.operator == "acme"
        assert any("linked to" in line and "acme" in line for line in said)

    asyncio.run(_with_session(scenario))


def test_a_job_streams_its_chunks_in_order_with_its_parameters():
    async def scenario(session, head, worker, said):
        conn = await head.next_conn()
        await conn.down.put(_generate("job-1", [1, 2, 3], lease_s=7.5))
        indexes = []
        while True:
            chunk = await conn.next_up("chunk")
            assert chunk.job_id == "job-1"
            body = json.loads(chunk.chunk_json)
            indexes.append(body["index"])
            if body["finish_reason"] is not None:
                break
        assert indexes == list(range(40))
        assert worker.generated == [("job-1", [1, 2, 3], {"max_tokens": 7}, None, 7.5)]

    asyncio.run(_with_session(scenario, worker=FakeWorker(chunks=40)))


def test_cancel_renew_and_score_are_forwarded_and_scores_answered_by_call_id():
    async def scenario(session, head, worker, said):
        conn = await head.next_conn()
        await conn.down.put(pb.ToWorker(cancel=pb.Cancel(job_id="job-9")))
        await conn.down.put(pb.ToWorker(renew=pb.Renew(job_ids=["a", "b"], lease_s=10.0)))
        await conn.down.put(pb.ToWorker(score=pb.Score(call_id=41, prompt_ids=[1],
                                                       token_ids=[2, 3], temperature=0.5)))
        await conn.down.put(pb.ToWorker(score=pb.Score(call_id=42, prompt_ids=[1])))
        answers = {}
        while len(answers) < 2:
            score = await conn.next_up("score")
            answers[score.call_id] = score
        assert json.loads(answers[41].result_json) == {"logprobs": [-0.5, -0.5],
                                                       "temperature": 0.5}
        assert answers[41].error == ""
        assert answers[42].result_json == "" and "token_ids" in answers[42].error
        await _until(lambda: worker.cancelled and worker.renewed, "the cancel and the renewal")
        assert worker.cancelled == ["job-9"] and worker.renewed == [(["a", "b"], 10.0)]

    asyncio.run(_with_session(scenario))


def test_a_refused_input_ends_the_job_invalid_and_a_failure_failed():
    async def scenario(session, head, worker, said):
        conn = await head.next_conn()
        for job_id, prompt in (("bad", [666]), ("broken", [500]), ("cut", [404])):
            await conn.down.put(_generate(job_id, prompt))
        ended = {}
        while len(ended) < 3:
            message = await conn.next_up("ended")
            ended[message.job_id] = message
        assert ended["bad"].kind == "invalid" and "prompt_ids" in ended["bad"].error
        assert ended["broken"].kind == "failed" and "the engine failed" in ended["broken"].error
        assert ended["cut"].kind == "failed" and "without a finish" in ended["cut"].error

    asyncio.run(_with_session(scenario))


def test_a_dropped_link_cancels_its_jobs_and_dials_again_with_a_new_hello():
    async def scenario(session, head, worker, said):
        conn = await head.next_conn()
        await conn.down.put(_generate("long", [0]))
        assert json.loads((await conn.next_up("chunk")).chunk_json)["index"] == 0
        await conn.down.put(None)  # the head ends the stream with a job running
        again = await head.next_conn()
        assert again.hello.registration_json and again.hello.stats_json
        await _until(lambda: "long" in worker.cancelled, "the dropped job cancelled")
        await again.next_up("figures")  # serving again
        assert session.hellos == 2 and head.count == 2
        assert any("ended the link" in line for line in said)

    asyncio.run(_with_session(scenario))


@pytest.mark.parametrize("code, details, expected", [
    (grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token",
     "--token: refused by the head: unknown or revoked token; ask the platform for a new token"),
    (grpc.StatusCode.PERMISSION_DENIED, "worker w1 belongs to another operator",
     "--name w1: refused by the head: worker w1 belongs to another operator"),
    (grpc.StatusCode.INVALID_ARGUMENT, "registration.gpu_type: expected a non-empty string",
     "the head refused this worker's hello: registration.gpu_type"),
    (grpc.StatusCode.ALREADY_EXISTS, "w1 is linked",
     "--name w1: the head already has a link of that worker name open"),
])
def test_a_final_refusal_ends_the_session_with_what_to_fix(code, details, expected):
    head = LinkHead(refuse=(code, details))

    async def scenario(session, head, worker, said):
        await head.next_conn()
        await asyncio.sleep(WAIT_S * 3)  # the session must end first

    with pytest.raises(LinkRefused) as err:
        asyncio.run(_with_session(scenario, head=head))
    assert str(err.value).startswith(expected)
    assert head.count == 1, "a refusal no retry can change is not retried"


def test_an_unreachable_head_is_said_once_and_dialled_until_it_answers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket is closed

    async def scenario(session, head, worker, said):
        await _until(lambda: session.hellos >= 4, "several tries")
        return list(said)

    said = asyncio.run(_with_session(scenario, address=closed))
    assert len(said) == 1, said
    assert f"head {closed}: nothing answers" in said[0]


def test_a_dead_worker_ends_the_session():
    async def scenario(session, head, worker, said):
        await (await head.next_conn()).next_up("figures")
        worker.gone = True
        await asyncio.sleep(WAIT_S * 3)

    with pytest.raises(WorkerGone):
        asyncio.run(_with_session(scenario))


def test_a_full_send_queue_makes_the_job_wait_instead_of_growing():
    """The head reads nothing after the hello: once HTTP/2 flow control stops the sends (after
    gRPC's windows and buffers, a few MiB), the queue fills and the job's stream is no longer
    read: the worker is not asked for more."""
    worker = FakeWorker(chunk_text="x" * 65536, chunks=2000)  # 128 MiB if nothing held it back
    settings = LinkSettings(queue_size=4, figures_poll_s=0.02, heartbeat_s=0.05,
                            backoff_first_s=0.01, backoff_max_s=0.05)

    async def scenario(session, head, worker, said):
        conn = await head.next_conn()
        await conn.down.put(_generate("big", [1]))
        await _until(lambda: session.outbox.full(), "the send queue full")
        deadline = time.monotonic() + WAIT_S  # gRPC's windows take some MiB, then all waits
        while (produced := worker.produced) < worker.chunks and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if worker.produced == produced:
                break
        assert produced < worker.chunks // 10, "the job kept producing into a full queue"
        assert session.outbox.qsize() == settings.queue_size

    asyncio.run(_with_session(scenario, head=LinkHead(read_up=False), worker=worker,
                              settings=settings))


def test_an_untrusted_certificate_is_named_and_the_right_ca_links(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)

    async def attempt(ca_file: str | None) -> str:
        head = LinkHead()
        server = grpc.aio.server()
        pb_grpc.add_WorkerLinkServicer_to_server(head, server)
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            [(key.read_bytes(), cert.read_bytes())]))
        await server.start()
        _, token = new_token()
        session = LinkSession(FakeWorker(), _record(token),
                              Head(f"127.0.0.1:{port}", token, ca_file=ca_file), FAST, print)
        running = asyncio.create_task(session.run())
        try:
            await _until(lambda: running.done() or session.welcome is not None,
                         "the head's welcome or a refusal")
            return str(running.exception()) if running.done() else "linked"
        finally:
            session.stop()
            await asyncio.gather(running, return_exceptions=True)
            await server.stop(None)

    refused = asyncio.run(attempt(None))  # the system's roots do not know the test's CA
    assert refused.startswith("--ca: the head's certificate is not trusted")
    assert asyncio.run(attempt(str(cert))) == "linked"
