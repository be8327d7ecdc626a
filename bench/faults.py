"""Fault benchmark: a mixed load through two schedulers while workers, a scheduler and Redis
fail, then what the clients received against what the ledger billed.

The stack, on this machine: a private `redis-server`, append-only with `appendfsync always`
(as `scheduler.local_redis` and `deploy/redis/redis.conf` run it: a write is on disk before
Redis acknowledges it, so no acknowledged bill is lost even to a power cut; `everysec` would
survive a process kill too, the data being in the kernel, but not a machine crash); a local
Ray cluster with `--workers` workers on the shipped pair; two `sparkgrid head` processes on
their own ports, on the same Redis and prefix; three tenants with keys from `sparkgrid keys
create`, on three plans of a price book written here (`metered` has a small daily quota).

The load (`faults_load.py`): `--requests` streams, completes, streams cancelled after their
first chunk, and repeated request_ids, of the tenants in turn, `--concurrency` at a time,
each attempt to the next scheduler, retried on UNAVAILABLE with the same request_id. When
given shares of it have finished (`SCHEDULE`): a worker killed (`ray.kill`; a replacement is
started); one scheduler SIGKILLed and restarted on its port while the other serves on; Redis
SIGSTOPped for `--redis-stop-s`; a second worker killed; Redis SIGKILLed and restarted from
its append-only file (usage totals read just before and after: a lost bill would show). Then,
after at most `--settle-s` for open jobs to settle: request outcomes with status codes; per
tenant, completion tokens received (each job once) against billed; each job billed other than
delivered, and why; quota overspend; jobs left open; `GetUsage` and `sparkgrid report`
against the usage hashes. (Until schedulers hold leases, a scheduler that starts settles
every open job of another owner as failed, the live one's too: `of_them_the_live_scheduler_s`
and `orphan_settled_while_owner_alive` count them.)

Prints one JSON object and writes it to `--out`. Not a test: it asserts nothing; `checks`
say whether the invariants held.

Knows: the stack's processes, the fault schedule. Does not know: the load and the
reconciliation (`faults_load.py`), the scheduler's insides (only its commands, API and store).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from faults_load import Load, ledger_view, make_specs, outcomes, reconcile, settle
from routing import load_prompts

from scheduler.client import Client
from scheduler.errors import StoreUnavailable
from scheduler.local_redis import LocalRedis, free_port
from scheduler.redis_store import RedisStore
from worker import actor
from worker.launcher import LaunchOptions, launch
from worker.models import shipped_pair
from worker.worker_config import WorkerConfig

PREFIX = "faults"
SPARKGRID = str(Path(sys.executable).with_name("sparkgrid"))
PRICE_BOOK = """
version = "faults-bench-1"
default_plan = "standard"
[plans.standard.prices."*"]
prompt_per_million = "0.10"
completion_per_million = "0.40"
[plans.pro.prices."*"]
prompt_per_million = "0.08"
completion_per_million = "0.32"
[plans.metered]
tokens_per_day = {quota}
[plans.metered.prices."*"]
prompt_per_million = "0.20"
completion_per_million = "0.80"
"""
TENANTS = {"acme": "standard", "globex": "pro", "initech": "metered"}
SCHEDULE = ((0.10, "worker_kill"), (0.25, "scheduler_kill"), (0.45, "redis_sigstop"),
            (0.65, "worker_kill"), (0.80, "redis_restart_from_aof"))
"""(share of the requests finished, fault). The scheduler restart comes before the Redis stop:
it settles every open job, so after it, it would hide a job the stop left open."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a small run for smoke testing: 60 requests, Redis stopped 4 s")
    p.add_argument("--out",
                   default=str(Path(__file__).resolve().parent / "results" / "faults.json"))
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--redis-stop-s", type=float, default=10.0, help="SIGSTOP to SIGCONT")
    p.add_argument("--quota", type=int, default=0, help="the metered tenant's tokens per day "
                   "(default: 20 per request of the load, so a part of its requests fit)")
    p.add_argument("--settle-s", type=float, default=60.0,
                   help="most time after the load for open jobs to settle")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.redis_stop_s = min(args.requests, 60), min(args.redis_stop_s, 4.0)
    for name in ("requests", "workers", "concurrency", "min_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 1")
    if args.max_tokens < args.min_tokens:
        p.error("--max-tokens: expected at least --min-tokens")
    args.quota = args.quota or 20 * args.requests
    return args


def utc_day() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


FIRST_DAY = utc_day()


class Head:
    """One `sparkgrid head` process on a fixed port (so a restart is where clients look)."""

    def __init__(self, name: str, cmd: list[str], env: dict, logdir: Path):
        self.name, self.cmd, self.env, self.logdir = name, cmd, env, logdir
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.owners: list[str] = []
        """Each start's scheduler id (`owner` in job records), oldest first."""
        self.logs: list[Path] = []

    def start(self, timeout_s: float = 120.0) -> None:
        log = self.logdir / f"{self.name}-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "w") as err:
            self.proc = subprocess.Popen([*self.cmd, "--grpc-port", str(self.port)],
                                         stdout=subprocess.PIPE, stderr=err, text=True,
                                         env=self.env)
        lines: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=lambda p=self.proc: [lines.put(x) for x in p.stdout],
                         daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if match := re.search(r"scheduler (\S+) serving", line):
                self.owners.append(match.group(1))
                return
        self.proc.kill()
        raise RuntimeError(f"scheduler {self.name} did not start: {log.read_text()[-2000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Stack:
    """Redis, Ray, the workers and two schedulers; `faults` records what was done to them."""

    def __init__(self, args, workdir: Path):
        self.args, self.workdir = args, workdir
        self.redis = LocalRedis(workdir / "redis", persistent=True)
        self.prices = workdir / "prices.toml"
        self.prices.write_text(PRICE_BOOK.format(quota=args.quota))
        self.env = {**os.environ, "SPARKGRID_HOME": str(workdir / "home")}
        self.workers: list[str] = []
        self.next_worker = 1
        self.replacing: list[threading.Thread] = []
        self._names = threading.Lock()
        self.heads: list[Head] = []
        self.faults: list[dict] = []

    def start(self) -> dict[str, str]:
        """Starts everything; returns each tenant's API key."""
        self.redis.start()
        ray.init(num_cpus=max(8, self.args.workers + 4), namespace=actor.NAMESPACE,
                 include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        # what ray.init set for this cluster (its token authentication) goes to the heads too
        self.env = {**os.environ, "SPARKGRID_HOME": str(self.workdir / "home")}
        for _ in range(self.args.workers):
            self.add_worker()
        keys = {t: self.create_key(t, plan) for t, plan in TENANTS.items()}
        cmd = [SPARKGRID, "head", "--ray-address", ray.get_runtime_context().gcs_address,
               "--redis-url", self.redis.url, "--redis-prefix", PREFIX, "--host", "127.0.0.1",
               "--metrics-port", "-1", "--prices", str(self.prices),
               "--max-tokens-cap", str(max(256, self.args.max_tokens)),
               "--allow-unregistered"]  # its workers are the platform's own, unregistered
        for name in ("head-a", "head-b"):
            head = Head(name, cmd, self.env, self.workdir)
            self.heads.append(head)
            head.start()
        for head in self.heads:  # both see every worker before the load starts
            with Client(head.endpoint, keys["acme"]) as client:
                self.wait(lambda c=client: len(c.workers()) >= self.args.workers, 60,
                          f"{head.name} sees the workers")
        return keys

    def stop(self) -> None:
        for thread in self.replacing:
            thread.join(600)
        for head in self.heads:
            head.stop()
        for name in self.workers:
            if (handle := actor.find_worker(name)) is not None:
                actor.kill(handle)
        if ray.is_initialized():
            ray.shutdown()
        self.redis.stop()

    @staticmethod
    def wait(cond, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # not serving yet: asked again
                if cond():
                    return
            time.sleep(0.2)
        raise RuntimeError(f"timed out: {what}")

    def create_key(self, tenant: str, plan: str) -> str:
        out = subprocess.run([SPARKGRID, "keys", "create", "--tenant", tenant, "--plan",
                              plan, "--prices", str(self.prices), "--redis-url", self.redis.url,
                              "--redis-prefix", PREFIX], capture_output=True, text=True,
                             env=self.env, timeout=60)
        match = re.search(r"api key: (\S+)", out.stdout)
        if out.returncode != 0 or match is None:
            raise RuntimeError(f"sparkgrid keys create: {out.stderr or out.stdout}")
        return match.group(1)

    def add_worker(self) -> str:
        pair = shipped_pair()
        if pair is None:
            raise RuntimeError("the shipped pair is not installed (worker/models/stdlib-pair)")
        with self._names:
            name = f"fault-{self.next_worker}"
            self.next_worker += 1
        config = WorkerConfig(name=name, target=str(pair[0]), draft=str(pair[1]), gpu_type="cpu",
                              price_per_hour=0.10)
        out = io.StringIO()
        if launch(LaunchOptions(ray.get_runtime_context().gcs_address, config), out=out) != 0:
            raise RuntimeError(f"worker {name} did not start: {out.getvalue().strip()}")
        self.workers.append(name)
        return name

    # -- the faults ------------------------------------------------------------------------------
    def worker_kill(self) -> dict:
        """The busiest live worker killed, then a replacement started."""
        def busy(name):
            try:
                s = ray.get(actor.find_worker(name).stats.remote(), timeout=5)
                return s["num_running"] + s["num_waiting"]
            except Exception:  # a worker that cannot answer is as good a victim
                return -1
        load = {name: busy(name) for name in self.workers}
        victim = max(load, key=load.get)
        actor.kill(actor.find_worker(victim))
        self.workers.remove(victim)
        record = {"worker": victim, "jobs_on_it": load[victim]}

        def replace():  # on its own thread: the schedule goes on meanwhile
            started = time.monotonic()
            try:
                record["replacement"] = self.add_worker()
                record["replacement_ready_s"] = round(time.monotonic() - started, 2)
            except Exception as err:
                record["replacement_error"] = f"{type(err).__name__}: {err}"
        self.replacing.append(threading.Thread(target=replace))
        self.replacing[-1].start()
        return record

    def redis_sigstop(self) -> dict:
        pid = self._redis_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(self.args.redis_stop_s)
        finally:
            os.kill(pid, signal.SIGCONT)
        return {"stopped_s": self.args.redis_stop_s}

    def scheduler_kill(self) -> dict:
        """head-a SIGKILLed; restarted on its port 2 s later while head-b serves on."""
        head = self.heads[0]
        killed = head.owners[-1]
        head.kill()
        time.sleep(2.0)
        started = time.monotonic()
        head.start()
        owners = re.findall(r"left open by ([^\s,;]+)", head.logs[-1].read_text())
        return {"killed": killed, "restarted_as": head.owners[-1],
                "restart_s": round(time.monotonic() - started, 2),
                "jobs_it_settled_as_orphans": len(owners),
                "of_them_the_live_scheduler_s": sum(o in self.heads[1].owners for o in owners)}

    def redis_restart_from_aof(self) -> dict:
        """Redis SIGKILLed and started again on its port and data directory (its AOF)."""
        before = asyncio.run(self._usage_totals())
        pid = self._redis_pid()
        os.kill(pid, signal.SIGKILL)
        self.redis._proc.wait(10)
        self.redis._proc = None
        started = time.monotonic()
        self.redis.start()
        down_s = time.monotonic() - started
        after = asyncio.run(self._usage_totals())
        lost = {t: {f: before[t][f] - after[t].get(f, 0) for f in before[t]
                    if before[t][f] > after[t].get(f, 0)} for t in before}
        return {"restart_s": round(down_s, 2), "usage_before": before, "usage_after": after,
                "acknowledged_usage_lost": {t: v for t, v in lost.items() if v}}

    def _redis_pid(self) -> int:
        # LocalRedis offers start/stop only; its child process is where the signals go
        return self.redis._proc.pid

    async def _usage_totals(self) -> dict:
        store = RedisStore(self.redis.url, prefix=PREFIX, timeout_s=10.0)
        try:
            for _ in range(100):  # a Redis just started may still be loading its AOF
                try:
                    await store.ping()
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.1)
            out = {}
            for t in TENANTS:
                days = await store.usage("tenant", t, FIRST_DAY, utc_day())
                out[t] = {f: sum(d.get(f, 0) for _, d in days)
                          for f in ("jobs", "prompt_tokens", "completion_tokens")}
            return out
        finally:
            await store.close()

    def run_faults(self, load: Load, total: int, start: float, done: threading.Event) -> None:
        for share, fault in SCHEDULE:
            while load.done < share * total and not done.is_set():
                time.sleep(0.1)
            if done.is_set():
                self.faults.append({"fault": fault, "skipped": "the load ended first"})
                continue
            at = time.monotonic() - start
            record = {"fault": fault, "at_s": round(at, 2), "requests_done": load.done}
            try:
                record.update(getattr(self, fault)())
            except Exception as err:  # reported, and the run goes on
                record["error"] = f"{type(err).__name__}: {err}"
            record["took_s"] = round(time.monotonic() - start - at, 2)
            self.faults.append(record)
            print(f"fault: {json.dumps(record)}", file=sys.stderr, flush=True)


def ledger_cross_check(stack: Stack, keys: dict[str, str], view: dict, days: list[str]) -> dict:
    """The billed totals as GetUsage and `sparkgrid report` show them, against the hashes."""
    live = stack.heads[1].endpoint
    api = {}
    for t, key in keys.items():
        with Client(live, key) as c:
            r = c.usage(since=days[0], until=days[-1])
            api[t] = {"jobs": r.jobs, "prompt_tokens": r.prompt_tokens,
                      "completion_tokens": r.completion_tokens}
    out = subprocess.run([SPARKGRID, "report", "--by", "tenant", "--format", "json",
                          "--since", days[0], "--until", days[-1], "--redis-url",
                          stack.redis.url, "--redis-prefix", PREFIX], capture_output=True,
                         text=True, env=stack.env, timeout=60)
    report = {}
    if out.returncode == 0:
        for row in json.loads(out.stdout)["rows"]:
            report[row["tenant"]] = {"jobs": row.get("requests"),
                                     "prompt_tokens": row.get("prompt_tokens"),
                                     "completion_tokens": row.get("completion_tokens")}
    hashes = {t: {f: u[f] for f in ("jobs", "prompt_tokens", "completion_tokens")}
              for t, u in view["usage"].items()}
    return {"get_usage": api, "report": report or out.stderr[-500:],
            "all_agree": api == hashes and report == hashes}


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    prompts = [p for p in load_prompts() if len(p) < 600]
    specs = make_specs(args.requests, list(TENANTS), prompts, rng, args.min_tokens,
                       args.max_tokens)
    with tempfile.TemporaryDirectory(prefix="sparkgrid-faults-") as tmp:
        stack = Stack(args, Path(tmp))
        try:
            keys = stack.start()
            load = Load([h.endpoint for h in stack.heads], keys)
            finished = threading.Event()
            start = time.monotonic()
            faults = threading.Thread(target=stack.run_faults,
                                      args=(load, len(specs), start, finished))
            faults.start()
            with ThreadPoolExecutor(args.concurrency) as ex:
                results = list(ex.map(load.run_one, specs))
            load_s = time.monotonic() - start
            finished.set()
            faults.join()
            load.close()
            settle_s = settle(stack.redis.url, PREFIX, args.settle_s)
            days = sorted({FIRST_DAY, utc_day()})
            job_ids = sorted({j for r in results for j in r["jobs"]})
            view = asyncio.run(ledger_view(stack.redis.url, PREFIX, list(TENANTS), job_ids, days))
            killed = {f["killed"] for f in stack.faults if f.get("killed")}
            live = {o for h in stack.heads for o in h.owners} - killed
            limits = {t: args.quota if plan == "metered" else 0 for t, plan in TENANTS.items()}
            summary = reconcile(results, view, limits, live)
            cross = ledger_cross_check(stack, keys, view, days)
        finally:
            stack.stop()
    result = {"benchmark": "faults", "cpus": os.cpu_count(),
              "config": {"requests": args.requests, "seed": args.seed, "quick": args.quick,
                         "workers": args.workers, "schedulers": 2,
                         "concurrency": args.concurrency,
                         "max_tokens_range": [args.min_tokens, args.max_tokens],
                         "tenants": TENANTS, "metered_tokens_per_day": args.quota,
                         "redis": "append-only, appendfsync always",
                         "redis_stop_s": args.redis_stop_s, "schedule": SCHEDULE},
              "load_s": round(load_s, 1), "settle_s": round(settle_s, 1),
              "faults": stack.faults, "outcomes": outcomes(results), **summary,
              "ledger_views": cross}
    result["checks"] = {**summary["checks"], "ledger_views_agree": cross["all_agree"],
                        "no_acknowledged_usage_lost_on_redis_restart": not any(
                            f.get("acknowledged_usage_lost") for f in stack.faults),
                        "every_fault_ran": all("error" not in f and "skipped" not in f
                                               for f in stack.faults)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
