"""The whole stack on one machine: what `sparkgrid up` and `sparkgrid demo` run.

`Stack(options).start()` takes a lock in `$SPARKGRID_HOME` (a second stack there is refused,
naming the running one), then starts, in order: Redis (the URL given, else a private real
`redis-server` with append-only persistence in `$SPARKGRID_HOME/redis`, a random password,
loopback only), a local Ray cluster with its dashboard, N worker actors on the shipped model
pair registered under the operator `local` (a fresh token each run), and the scheduler, which
routes only to registered workers; creates an API key for the tenant `local`; and writes
`$SPARKGRID_HOME/up.json` (mode 0600: it holds the key and the Redis password). `stop()` undoes
all of it in reverse order, so nothing it started is left running.

Knows: start-up order, the local processes. Does not know: what the parts do inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sparkgrid.contract import NAMESPACE
from sparkgrid.home import UP_FILE, read_up_file, write_up_file

LOCK_FILE = "up.lock"
TENANT = "local"
OPERATOR = "local"
"""The operator whose token registers the workers `sparkgrid up` starts in its cluster."""
LINKED_OPERATOR = "guest"
"""The operator of the linked workers (`StackOptions.linked_workers`)."""


class StackError(RuntimeError):
    """The stack cannot start; the message says what to do."""


@dataclass(frozen=True)
class StackOptions:
    home: Path
    """`$SPARKGRID_HOME`: up.json, the lock, Redis's data, SPS caches."""
    workers: int = 2
    grpc_port: int = 50051
    worker_link_port: int = 50060
    """The worker link's port (TLS, by a CA made in `$SPARKGRID_HOME/tls`; 0: any free one)."""
    redis_url: str | None = None
    """None: a private redis-server this stack starts and stops."""
    metrics_port: int | None = 9464
    dashboard_port: int = 8265
    linked_workers: int = 0
    """Workers that serve through the worker link (`sparkgrid worker --join`, each in a process
    with a Ray of its own, under the operator `guest`), beside the in-cluster ones."""
    price_per_hour: float = 0.10
    """The workers' asked price, USD per hour (a notional one for this machine's CPU, so that
    cost reports have GPU costs to show)."""

    def __post_init__(self):
        if not isinstance(self.workers, int) or not 1 <= self.workers <= 16:
            raise ValueError(f"--workers: expected 1 to 16, got {self.workers!r}")
        if not isinstance(self.linked_workers, int) or not 0 <= self.linked_workers <= 4:
            raise ValueError(f"--linked-workers: expected 0 to 4, got {self.linked_workers!r}")


class Stack:
    def __init__(self, options: StackOptions):
        self.options = options
        self.home = Path(options.home)
        self.info: dict = {}
        self._lock = None
        self._redis = None
        self._ray_started = False
        self._workers: list[str] = []
        self._linked: list[tuple[str, subprocess.Popen]] = []
        self._head = None

    def start(self, log=print) -> dict:
        """Start everything; returns what up.json holds. On failure, stops what it started."""
        try:
            self._take_lock()
            redis_url = self._start_redis(log)
            dashboard = self._start_ray(log)
            self._start_workers(log, self._operator_token(redis_url, OPERATOR))
            endpoint, api_key = self._start_scheduler(redis_url, log)
            self._start_linked(redis_url, log)
            self.info = {"endpoint": endpoint, "api_key": api_key, "tenant": TENANT,
                         "operator": OPERATOR, "redis_url": redis_url, "dashboard_url": dashboard,
                         "metrics_url": (f"http://127.0.0.1:{self.options.metrics_port}/metrics"
                                         if self.options.metrics_port is not None else None),
                         "worker_link": f"127.0.0.1:{self._head.scheduler.link_port}",
                         "ca": str(self.home / "tls" / "ca.pem"),
                         "ray_address": self._ray_address(), "workers": list(self._workers),
                         "linked_workers": [name for name, _ in self._linked],
                         "ray_session_dir": self._ray_session_dir(), "pid": os.getpid(),
                         "started_at": time.time()}
            self._write_up_file()
            return self.info
        except BaseException:
            self.stop(log=lambda *a, **k: None)
            raise

    def stop(self, log=print) -> None:
        """Stop all this stack started, newest first; safe to call twice."""
        if self._lock is not None:  # up.json is ours only while we hold the lock
            (self.home / UP_FILE).unlink(missing_ok=True)
        for name, proc in self._linked:  # drained by their own command, on SIGTERM
            log(f"stopping the linked worker {name}")
            _stop_process_group(proc, 60)
        self._linked.clear()
        if self._head is not None:
            log("stopping the scheduler")
            self._head.stop(grace_s=5)
            self._head = None
        if self._ray_started:
            import ray

            from worker import actor

            for name in self._workers:
                if (handle := actor.find_worker(name)) is not None:
                    actor.kill(handle)
            self._workers.clear()
            log("stopping the Ray cluster")
            ray.shutdown()
            self._ray_started = False
        if self._redis is not None:
            log("stopping Redis")
            self._redis.stop()
            self._redis = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- parts ----------------------------------------------------------------------------------
    def _take_lock(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        lock = open(self.home / LOCK_FILE, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            running = read_up_file(self.home)
            where = (f" (pid {running.get('pid')}, endpoint {running.get('endpoint')})"
                     if running else "")
            raise StackError(f"another `sparkgrid up` is running with SPARKGRID_HOME={self.home}"
                             f"{where}; stop it first (Ctrl-C in its terminal), or use another "
                             "SPARKGRID_HOME") from None
        self._lock = lock

    def _start_redis(self, log) -> str:
        from scheduler.local_redis import LocalRedis

        if self.options.redis_url:
            log(f"Redis: using {self.options.redis_url.split('@')[-1]}")
            return self.options.redis_url
        self._redis = LocalRedis(self.home / "redis", persistent=True,
                                 password=secrets.token_urlsafe(24))
        try:
            self._redis.start()
        except FileNotFoundError as err:
            self._redis = None
            raise StackError(f"{err}; or pass --redis-url of a Redis you run") from None
        log(f"Redis: a private redis-server on 127.0.0.1:{self._redis.port} "
            f"(append-only, data in {self.home / 'redis'})")
        return self._redis.url

    def _start_ray(self, log) -> str:
        import ray

        if ray.is_initialized():
            raise StackError("this process is already connected to a Ray cluster")
        ctx = ray.init(namespace=NAMESPACE, include_dashboard=True,
                       dashboard_host="127.0.0.1", dashboard_port=self.options.dashboard_port,
                       num_cpus=max(4, self.options.workers + 2), logging_level="ERROR",
                       log_to_driver=False)
        self._ray_started = True
        url = f"http://{ctx.dashboard_url}" if ctx.dashboard_url else ""
        log(f"Ray: a local cluster at {self._ray_address()}; dashboard {url or '(off)'}")
        return url

    def _pin_tokenizer(self) -> Path:
        """The platform's pin of the shipped model's tokenizer (`--tokenizer-pins`): the
        scheduler counts prompt tokens with it, not with one a worker lends."""
        from sparkgrid.registration import file_sha256
        from worker.actor import model_id
        from worker.models import shipped_pair

        target = shipped_pair()[0]
        digest = file_sha256(Path(target) / "tokenizer.json")
        path = self.home / "tokenizer-pins.toml"
        path.write_text(f'[tokenizers]\n"{model_id(str(target))}" = "{digest}"\n')
        return path

    def _start_linked(self, redis_url: str, log) -> None:
        """`sparkgrid worker --join` for each linked worker: its own process and Ray, the
        link's TLS trusted by this stack's CA, the operator `guest`."""
        if not self.options.linked_workers:
            return
        from worker.models import shipped_pair

        pair, token = shipped_pair(), self._operator_token(redis_url, LINKED_OPERATOR)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(SPARKGRID_HOME=str(self.home), SPARKGRID_OPERATOR_TOKEN=token)
        for i in range(1, self.options.linked_workers + 1):
            name = f"linked-{i}"
            log_file = open(self.home / f"{name}.log", "w")
            proc = subprocess.Popen(
                [sys.executable, "-m", "sparkgrid.cli", "worker", "--join",
                 f"127.0.0.1:{self._head.scheduler.link_port}", "--ca",
                 str(self.home / "tls" / "ca.pem"), "--name", name, "--target", str(pair[0]),
                 "--draft", str(pair[1]), "--device", "cpu", "--gpu-type", "cpu",
                 "--price-per-hour", str(self.options.price_per_hour)],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
            log_file.close()
            self._linked.append((name, proc))
        deadline = time.monotonic() + 600
        for name, proc in self._linked:
            while name not in {w.stats.name for w in self._head.scheduler.pool.stats()}:
                if proc.poll() is not None or time.monotonic() > deadline:
                    said = (self.home / f"{name}.log").read_text()[-1500:]
                    raise StackError(f"linked worker {name} did not join: {said}")
                time.sleep(0.2)
            log(f"worker {name} linked (its own process and Ray, through the worker link)")

    @staticmethod
    def _operator_token(redis_url: str, operator: str) -> str:
        """A fresh token of `operator`; the previous run's token is refused from now on."""
        from scheduler.errors import NotFound
        from scheduler.redis_store import RedisStore

        async def fresh() -> str:
            store = RedisStore(redis_url)
            try:
                try:
                    return await store.rotate_operator(operator)
                except NotFound:
                    return await store.add_operator(operator)
            finally:
                await store.close()
        try:
            return asyncio.run(fresh())
        except Exception as err:  # the store's own errors say what is wrong
            raise StackError(f"operator {operator}: {err}") from None

    def _start_workers(self, log, token: str) -> None:
        from worker.launcher import LaunchOptions, launch
        from worker.models import shipped_pair
        from worker.worker_config import WorkerConfig

        pair = shipped_pair()
        if pair is None:
            raise StackError("the shipped model pair is not installed (worker/models/stdlib-pair)")
        for i in range(1, self.options.workers + 1):
            name = f"up-{i}"
            config = WorkerConfig(name=name, target=str(pair[0]), draft=str(pair[1]),
                                  gpu_type="cpu", sps_cache_dir=str(self.home / "sps"),
                                  price_per_hour=self.options.price_per_hour)
            out = io.StringIO()
            if launch(LaunchOptions(self._ray_address(), config, operator_token=token),
                      out=out) != 0:
                raise StackError(f"worker {name} did not start: {out.getvalue().strip()}")
            self._workers.append(name)
            log(f"worker {name} ready")

    def _start_scheduler(self, redis_url: str, log) -> tuple[str, str]:
        from scheduler.config import SchedulerConfig
        from scheduler.head import SchedulerThread
        from sparkgrid.tls import make_ca, make_server_cert

        pins = self._pin_tokenizer()
        ca = make_ca(self.home / "tls")
        cert, key = make_server_cert(self.home / "tls", ["127.0.0.1", "localhost"], ca)
        config = SchedulerConfig(redis_url=redis_url, host="127.0.0.1",
                                 grpc_port=self.options.grpc_port,
                                 worker_link_port=self.options.worker_link_port,
                                 worker_link_cert=str(cert), worker_link_key=str(key),
                                 metrics_port=self.options.metrics_port,
                                 bill_journal_dir=str(self.home / "bills"),
                                 require_registration=True, tokenizer_pins=str(pins))
        try:
            self._head = SchedulerThread(config)
        except OSError as err:  # a port taken: the message names the option
            raise StackError(str(err)) from None
        deadline = time.monotonic() + 30
        while len(self._head.scheduler.pool.stats()) < len(self._workers):
            if time.monotonic() > deadline:
                raise StackError("the scheduler did not see the workers within 30 s")
            time.sleep(0.1)
        _, api_key = self._head.call(self._head.scheduler.store.create_key(TENANT))
        log(f"scheduler: sparkgrid.v1.Inference on {self._head.endpoint}")
        return self._head.endpoint, api_key

    @property
    def scheduler(self):
        return None if self._head is None else self._head.scheduler

    def call(self, coro, timeout_s: float = 60.0):
        """Run a coroutine on the scheduler's event loop (reports, key management)."""
        return self._head.call(coro, timeout_s)

    def _write_up_file(self) -> None:
        write_up_file(self.info, self.home)

    @staticmethod
    def _ray_address() -> str:
        import ray

        return ray.get_runtime_context().gcs_address

    @staticmethod
    def _ray_session_dir() -> str | None:
        """Where this cluster's processes keep their logs (Ray has no public call for it)."""
        import ray

        try:
            return ray._private.worker._global_node.get_session_dir_path()
        except AttributeError:
            return None


def _stop_process_group(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM a process group (a command that drains on it), SIGKILL after `timeout_s`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # its Ray's processes too
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
