"""Worker-link benchmark: what serving through the worker link costs against serving inside the
platform's Ray cluster, the same engine on the same machine.

The stack: a private `redis-server`, a local Ray cluster (the platform's) with one in-cluster
worker `w-cluster` registered under the operator `platform`, a scheduler with a TLS worker link
(a CA made here), and `sparkgrid worker --join` in a process of its own with its own local Ray:
the linked worker `w-linked` of the operator `acme`. Both serve the shipped pair on the CPU,
with the same settings. The two are measured in turn, the other one quarantined meanwhile (so
each phase has the machine's cores to itself):

- per-token latency: `--requests` greedy `Generate` calls one after another (`--max-tokens`
  each): time to the first token, and the gap between consecutive chunks per token they bring;
- throughput ceiling: `--concurrency` streams at once, `--rounds` times: completion tokens per
  second of wall time.

Both kinds are measured `--repeats` times, alternating. Reported per kind: the median over the
repeats of p50 / p95 of both latencies and of tokens/s (each run is kept too), and the linked /
in-cluster ratios of the medians.
Prints one JSON object, writes it to `--out` and a plot beside it. Not a test: it asserts
nothing.

Knows: the stack's processes and commands. Does not know: the scheduler's insides.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from routing import load_prompts

from scheduler.client import Client
from scheduler.config import SchedulerConfig
from scheduler.head import SchedulerThread
from scheduler.local_redis import LocalRedis
from scheduler.redis_store import RedisStore
from sparkgrid.tls import make_ca, make_server_cert
from worker.launcher import LaunchOptions, launch
from worker.models import shipped_pair
from worker.worker_config import WorkerConfig

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=12, help="sequential requests per kind")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="bursts of --concurrency per kind")
    p.add_argument("--max-batch-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="alternated runs of both kinds; "
                   "medians reported")
    p.add_argument("--out", default=str(ROOT / "bench/results/link.json"))
    return p.parse_args(argv)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))] if values else 0.0


def store_call(url: str, method: str, *args):
    async def go():
        store = RedisStore(url)
        try:
            return await getattr(store, method)(*args)
        finally:
            await store.close()
    return asyncio.run(go())


def only(head: SchedulerThread, keep: str, others: list[str]) -> None:
    """Route to `keep` alone: the others quarantined, `keep` released; wait until the pool
    sees it."""
    store, pool = head.scheduler.store, head.scheduler.pool
    head.call(store.release_worker(keep, time.time()))
    for name in others:
        head.call(store.quarantine_worker(name, "bench: measuring another worker", time.time()))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (pool.quarantines.reason(keep) is None
                and all(pool.quarantines.reason(n) for n in others)):
            return
        time.sleep(0.1)
    raise RuntimeError("the quarantines did not reach the pool")


def sequential(client: Client, prompts: list[str], args) -> dict:
    ttft, per_token, workers = [], [], set()
    for prompt in prompts[:args.requests]:
        start = time.perf_counter()
        last, job = None, None
        for chunk in client.generate(prompt, max_tokens=args.max_tokens, temperature=0,
                                     timeout_s=300):
            now = time.perf_counter()
            job = chunk.job_id
            if chunk.token_ids:
                if last is None:
                    ttft.append(now - start)
                else:
                    per_token.append((now - last) / len(chunk.token_ids))
                last = now
        workers.update(client.job(job).workers)
    return {"ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p95_ms": 1e3 * pct(ttft, 0.95),
            "per_token_p50_ms": 1e3 * pct(per_token, 0.5),
            "per_token_p95_ms": 1e3 * pct(per_token, 0.95),
            "per_token_mean_ms": 1e3 * statistics.fmean(per_token) if per_token else 0.0,
            "requests": min(args.requests, len(prompts)), "workers": sorted(workers)}


def ceiling(client: Client, prompts: list[str], args) -> dict:
    tokens, wall = 0, 0.0
    with ThreadPoolExecutor(args.concurrency) as pool:
        for r in range(args.rounds):
            batch = [prompts[(r * args.concurrency + i) % len(prompts)]
                     for i in range(args.concurrency)]
            start = time.perf_counter()
            done = list(pool.map(lambda p: client.complete(
                p, max_tokens=args.max_tokens, temperature=0.8, timeout_s=600), batch))
            wall += time.perf_counter() - start
            tokens += sum(c.usage.completion_tokens for c in done)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
            "concurrency": args.concurrency}


def start_linked(link_port: int, ca: Path, token: str, pair, args, home: Path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["SPARKGRID_HOME"] = str(home)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparkgrid.cli", "worker", "--join", f"127.0.0.1:{link_port}",
         "--token", token, "--ca", str(ca), "--name", "w-linked", "--target", str(pair[0]),
         "--draft", str(pair[1]), "--device", "cpu", "--max-batch-tokens",
         str(args.max_batch_tokens)], env=env, stdout=subprocess.DEVNULL,
        stderr=open(home / "join.log", "w"), start_new_session=True)
    return proc


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["in-cluster", "linked"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, key in enumerate(("per_token_p50_ms", "per_token_p95_ms", "ttft_p50_ms")):
        left.bar([k + i * 0.25 for k in range(2)],
                 [report[k]["latency"][key] for k in kinds], width=0.25, label=key)
    left.set_xticks([0.25, 1.25], kinds)
    left.set_ylabel("ms")
    left.set_title("latency, one request at a time")
    left.legend()
    right.bar(kinds, [report[k]["ceiling"]["tokens_per_s"] for k in kinds])
    right.set_ylabel("completion tokens/s")
    right.set_title(f"throughput, {report['config']['concurrency']} streams at once")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    pair = shipped_pair()
    home = Path(tempfile.mkdtemp(prefix="sparkgrid-link-bench-"))
    redis = LocalRedis(home / "redis", persistent=False)
    redis.start()
    os.environ["SPARKGRID_REDIS_URL"] = redis.url
    tokens = {name: store_call(redis.url, "add_operator", name) for name in ("platform", "acme")}
    ray.init(namespace="sparkgrid", num_cpus=4, logging_level="ERROR", log_to_driver=False)
    proc = head = None
    try:
        config = WorkerConfig(name="w-cluster", target=str(pair[0]), draft=str(pair[1]),
                              gpu_type="cpu", sps_cache_dir=str(home / "sps"),
                              max_batch_tokens=args.max_batch_tokens)
        assert launch(LaunchOptions(ray.get_runtime_context().gcs_address, config,
                                    operator_token=tokens["platform"]), out=io.StringIO()) == 0
        ca = make_ca(home / "tls")
        cert, key = make_server_cert(home / "tls", ["127.0.0.1"], ca)
        head = SchedulerThread(SchedulerConfig(
            redis_url=redis.url, grpc_port=0, worker_link_port=0, worker_link_cert=str(cert),
            worker_link_key=str(key), require_registration=True, max_tokens_cap=4096))
        proc = start_linked(head.scheduler.link_port, ca[0], tokens["acme"], pair, args, home)
        deadline = time.monotonic() + 600
        while "w-linked" not in {s.stats.name for s in head.scheduler.pool.stats()}:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the linked worker did not join: "
                                   + (home / "join.log").read_text()[-2000:])
            time.sleep(0.5)
        _, api_key = head.call(head.scheduler.store.create_key("bench"))
        prompts = load_prompts()
        report = {"config": vars(args) | {"out": os.path.relpath(args.out, ROOT),
                                          "machine_cpus": os.cpu_count()}}
        runs: dict[str, list] = {"in-cluster": [], "linked": []}
        with Client(head.endpoint, api_key) as client:
            client.complete(prompts[0], max_tokens=8, temperature=0, timeout_s=300)  # warm
            for _ in range(args.repeats):  # alternated, so a drift of the machine hits both
                for kind, name, other in (("in-cluster", "w-cluster", "w-linked"),
                                          ("linked", "w-linked", "w-cluster")):
                    only(head, name, [other])
                    client.complete(prompts[1], max_tokens=8, temperature=0, timeout_s=300)
                    runs[kind].append({"latency": sequential(client, prompts, args),
                                       "ceiling": ceiling(client, prompts, args)})
        for kind, done in runs.items():
            report[kind] = {part: {key: (statistics.median(r[part][key] for r in done)
                                         if isinstance(done[0][part][key], float)
                                         else done[0][part][key])
                                   for key in done[0][part]} for part in ("latency", "ceiling")}
            report[kind]["runs"] = done
        linked, cluster = report["linked"]["latency"], report["in-cluster"]["latency"]
        report["linked_over_in_cluster"] = {
            **{key.removesuffix("_ms"): linked[key] / cluster[key]
               for key in ("per_token_p50_ms", "per_token_p95_ms", "ttft_p50_ms")},
            "tokens_per_s": (report["linked"]["ceiling"]["tokens_per_s"]
                             / report["in-cluster"]["ceiling"]["tokens_per_s"])}
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if head is not None:
            head.stop()
        ray.shutdown()
        redis.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
