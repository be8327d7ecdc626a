"""The scheduler process: the parts put together, started and stopped in order.

`Scheduler(config).start()` checks Redis, takes this scheduler's lease in it, joins Ray and
reads the workers, and serves `sparkgrid.v1.Inference` with the standard health service and
server reflection (TLS when a certificate is given). While it runs, a task renews the lease
every `lease_s / 3` (15 s / 5 s by default: two renewals may fail before it lapses), and
another settles every `lease_s / 3` the open jobs whose owner's lease has lapsed (a dead
scheduler's: `billing.sweep_orphans`), so a scheduler killed mid-job has its jobs settled by
any live one within about `lease_s + lease_s / 3`. Several schedulers can share one Redis
and prefix. A lease found lapsed is taken again at once and logged as an error: the jobs
this scheduler runs may have been settled as orphans meanwhile.

`stop()` (a drain) stops taking calls, lets running streams end (up to `grace_s`), writes
their ledger records, and only then releases the lease and leaves Ray; so a rolling restart
(start the new scheduler, stop the old one with a grace longer than its longest job) fails no
job. `sparkgrid head` runs one in the foreground until Ctrl-C or SIGTERM.

Knows: start-up order, grpc.aio server setup. Does not know: what the methods do.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from scheduler.auditor import Auditor
from scheduler.bill_journal import BillJournal
from scheduler.billing import Billing
from scheduler.config import SchedulerConfig, load_tokenizer_pins
from scheduler.dispatch import Dispatcher
from scheduler.errors import StoreUnavailable
from scheduler.interceptors import ApiInterceptor
from scheduler.link_server import start_link_server
from scheduler.metrics import Metrics
from scheduler.prices import DEFAULT_BOOK, PriceBook
from scheduler.redis_store import RedisStore
from scheduler.registry import Registry
from scheduler.server import InferenceServicer
from scheduler.worker_pool import WorkerPool

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""Most bytes of one message the scheduler sends (a completion with its token ids)."""
WORKER_TIME_EVERY_S = 5.0



def max_request_bytes(config: SchedulerConfig) -> int:
    """The largest request a client may send: the longest prompt and stop strings the checks
    accept, at 4 bytes a character (UTF-8's most), plus 16 KiB for the other fields. gRPC
    refuses a bigger message (RESOURCE_EXHAUSTED) before it is parsed or authenticated."""
    chars = (config.max_prompt_chars + config.max_stop_strings * config.max_stop_chars
             + config.max_request_id_chars + 256)  # + model name
    return 4 * chars + 16 * 1024

class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.owner = f"scheduler-{secrets.token_hex(4)}"
        self.store = RedisStore(config.redis_url, prefix=config.redis_prefix,
                                keep_text_s=config.keep_text_s, keep_jobs_s=config.keep_jobs_s)
        self.pool = WorkerPool(config.ray_address, config.stats_interval_s,
                               config.discovery_interval_s, config.stall_timeout_s,
                               load_tokenizer_pins(config.tokenizer_pins), config.figure_boards,
                               registry=(Registry(self.store) if config.require_registration
                                         else None))
        self.prices = PriceBook.load(config.prices or DEFAULT_BOOK)
        self.billing = Billing(self.store, self.prices, config.ledger_retry_s)
        self.metrics = Metrics(config.policy)
        self.auditor = Auditor(self.pool, frozenset(config.trusted_workers), config.audit_rate,
                               config.audit_first_jobs, record=self.store.record_audit)
        self.dispatcher = Dispatcher(config, self.pool, self.store, self.billing, self.owner,
                                     self.metrics, auditor=self.auditor)
        self.metrics_server = None
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._health = health.aio.HealthServicer()
        self._time_task: asyncio.Task | None = None
        self._lease_task: asyncio.Task | None = None
        self._quarantine_task: asyncio.Task | None = None
        self._sweep_task: asyncio.Task | None = None
        self.link_server = self.link_port = self.links = None
        """The worker link's server, port and servicer (`config.worker_link_port`)."""
        self.leases_lost = 0
        """How many times this scheduler found its lease lapsed (and took it again)."""

    async def start(self) -> int:
        """Start serving; returns the port. Raises ConnectionError (Redis, Ray) saying why."""
        await self.store.ping()
        await self.store.renew_lease(self.owner, self.config.lease_s)
        self._lease_task = asyncio.create_task(self._keep_lease())
        await self.pool.start()
        if self.config.bill_journal_dir:  # bills waiting for Redis survive a crash
            self.billing.journal = BillJournal(self.config.bill_journal_dir, self.owner)
        self.billing.start()
        self.auditor.start()
        # jobs of dead schedulers: now, and every lease_s / 3 while this one runs
        self._sweep_task = asyncio.create_task(
            self.billing.sweep_orphans(self.owner, self.config.lease_s / 3,
                                       self.dispatcher.holds))
        self._time_task = asyncio.create_task(self._record_worker_time())
        await self._share_quarantines()  # a worker quarantined before is kept out from the start
        self._quarantine_task = asyncio.create_task(self._keep_sharing_quarantines())
        self.server = grpc.aio.server(
            interceptors=[ApiInterceptor(self.store.authenticate, self.metrics)],
            options=[("grpc.max_receive_message_length", max_request_bytes(self.config)),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                     # gRPC shares a port with another server by default (SO_REUSEPORT): a
                     # second scheduler on a taken port must fail, not split the traffic.
                     ("grpc.so_reuseport", 0)])
        pb_grpc.add_InferenceServicer_to_server(
            InferenceServicer(self.config, self.dispatcher, self.pool, self.store), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self.port = self._listen()
        await self.server.start()
        if self.config.worker_link_port is not None:
            await self._start_link()
        if self.config.metrics_port is not None:
            try:
                self.metrics_server = self.metrics.serve(self.config.metrics_port, self.config.host)
            except OSError as err:
                raise OSError(f"--metrics-port {self.config.metrics_port}: cannot serve there "
                              f"({err}); choose another port, or -1 for none") from None
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def _start_link(self) -> None:
        c = self.config
        tls = (None if c.worker_link_plaintext else
               (Path(c.worker_link_cert).read_bytes(), Path(c.worker_link_key).read_bytes()))
        self.link_server, self.link_port, self.links = await start_link_server(
            self.pool, self.store, c.host, c.worker_link_port, tls)
        log.info("worker link: sparkgrid.v1.WorkerLink on %s:%d (%s)", c.host, self.link_port,
                 "plaintext" if tls is None else "TLS")

    def _listen(self) -> int:
        address = f"{self.config.host}:{self.config.grpc_port}"
        try:
            if self.config.tls_cert:
                credentials = grpc.ssl_server_credentials([(Path(self.config.tls_key).read_bytes(),
                                                            Path(self.config.tls_cert).read_bytes())])
                return self.server.add_secure_port(address, credentials)
            return self.server.add_insecure_port(address)
        except RuntimeError as err:  # grpc: "Failed to bind to address ..."
            raise OSError(f"--grpc-port {self.config.grpc_port}: cannot serve on {address} "
                          f"({err}); is another server there? "
                          "--grpc-port 0 picks a free port") from None

    async def stop(self, grace_s: float = 10.0) -> None:
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.server is not None:
            if self.config.drain_delay_s and grace_s > 0:  # let a balancer notice first
                await asyncio.sleep(self.config.drain_delay_s)
            await self.server.stop(grace_s)
        if self.link_server is not None:  # linked workers' jobs have ended with the streams
            await self.link_server.stop(1.0)
        await _cancel(self._sweep_task)
        await _cancel(self._quarantine_task)
        await self.auditor.stop()
        flushed = await self.billing.flush(max(grace_s, 1.0))
        if not flushed:
            log.error("ledger: %d job records could not be written (Redis down)",
                      self.billing.pending)
        await self.billing.stop()
        if self.billing.journal is not None:  # what is still open stays for the next one
            self.billing.journal.close()
        await _cancel(self._lease_task)
        if flushed and self._lease_task is not None:  # its jobs settled: no orphans to leave
            try:
                await self.store.release_lease(self.owner)
            except StoreUnavailable as err:
                log.warning("lease of %s not released (it lapses by itself): %s", self.owner, err)
        if self._time_task is not None:
            await _cancel(self._time_task)
            await self._flush_worker_time()
        await self.pool.stop()
        await self.store.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()

    async def _keep_lease(self) -> None:
        """Renews the lease every `lease_s / 3`; a lease found lapsed is taken again, loudly."""
        pause = self.config.lease_s / 3
        while True:
            await asyncio.sleep(pause)
            pause = self.config.lease_s / 3
            try:
                kept = await self.store.renew_lease(self.owner, self.config.lease_s)
            except StoreUnavailable as err:
                log.warning("lease of %s not renewed (%s); retrying", self.owner, err)
                pause = min(1.0, pause)  # sooner than usual: it may lapse meanwhile
                continue
            if not kept:
                self.leases_lost += 1
                log.error("LEASE LOST: the lease of %s had lapsed (Redis lost it, or this "
                          "scheduler stalled past %g s); taken again. Other schedulers may have "
                          "settled its running jobs as orphans: their own bills will be refused "
                          "and logged as anomalies", self.owner, self.config.lease_s)

    async def _keep_sharing_quarantines(self) -> None:
        while True:
            await asyncio.sleep(self.config.discovery_interval_s)
            await self._share_quarantines()

    async def _share_quarantines(self) -> None:
        """Quarantines decided here go to the store; the store's (every scheduler's, less the
        ones `sparkgrid workers release` lifted) come back to the pool."""
        book = self.pool.quarantines
        taken = book.take_new()
        try:
            for name, (reason, since) in taken.items():
                await self.store.quarantine_worker(name, reason, since)
            taken = {}
            book.sync({n: e.get("reason", "") for n, e in
                       (await self.store.quarantines()).items()})
        except StoreUnavailable as err:
            book.give_back(taken)
            log.warning("quarantines not shared yet (%s)", err)

    async def _record_worker_time(self) -> None:
        while True:
            await asyncio.sleep(WORKER_TIME_EVERY_S)
            await self._flush_worker_time()

    async def _flush_worker_time(self) -> None:
        """Workers' online and busy time, into the ledger (kept for later while Redis is down)."""
        entries = self.pool.take_worker_time()
        for i, (name, registration, day, online_ms, active_ms) in enumerate(entries):
            try:
                await self.store.record_worker_time(name, registration, day, online_ms, active_ms)
            except StoreUnavailable as err:
                log.warning("ledger: worker time not yet written (%s)", err)
                self.pool.give_back_worker_time(entries[i:])
                return

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def _cancel(task: asyncio.Task | None, tries: int = 5) -> None:
    """Cancel `task` and wait for it to end. A cancellation can be lost inside a library call
    (seen with a Redis call cut at start-up), so it is asked again each second, a few times;
    a task that still runs is left, logged, rather than hang the stop."""
    for _ in range(tries if task is not None else 0):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if done:
            return
    if task is not None:
        log.error("task %s did not stop when cancelled", task.get_name())


class SchedulerThread:
    """A `Scheduler` on an event loop of its own thread, for a process that has other work on
    its main thread (`sparkgrid up`, benchmarks, tests). `call(coro)` runs a coroutine there."""

    def __init__(self, config: SchedulerConfig):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="scheduler",
                                        daemon=True)
        self._thread.start()
        self.scheduler = Scheduler(config)
        try:
            self.port = self.call(self.scheduler.start())
        except BaseException:
            try:  # what did start (the API server, the pool's tasks) stops with it
                self.call(self.scheduler.stop(grace_s=0), timeout_s=30)
            finally:
                self._end_loop()
            raise
        self.endpoint = (f"{'127.0.0.1' if config.host in ('0.0.0.0', '::') else config.host}"
                         f":{self.port}")

    def call(self, coro, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self, grace_s: float = 5.0) -> None:
        try:
            self.call(self.scheduler.stop(grace_s), timeout_s=grace_s * 3 + 10)
        finally:
            self._end_loop()

    def _end_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
