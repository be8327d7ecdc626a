"""Routing benchmark: the scheduler's policies side by side on two unequal workers.

Two workers serve the shipped pair on this machine, one of them with `--emulate-slowdown`
(default 3: every step takes 3x as long, and it reports a 3x smaller SPS(B), as a slower GPU
would). First the workers' combined capacity is measured (both saturated at once, through the
scheduler); then one request trace (prompts, token budgets, Poisson arrival times at `--load`
times that capacity, all from `--seed`) is replayed open-loop, through real gRPC, once per
policy, with a fresh scheduler each time. Reported per policy: latency p50/p95/p99, time to
first token, throughput, the share of requests sent to the slow worker, and the scheduler's own
cost per request (routing decision; arrival to decision, which includes the Redis job record).

Prints one JSON object, writes it to `--out` and a plot beside it. Not a test: it asserts
nothing; the `checks` say whether the figures meet the scheduler issue's targets.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from scheduler.client import Client
from scheduler.config import SchedulerConfig
from scheduler.head import SchedulerThread
from scheduler.local_redis import LocalRedis
from worker import actor
from worker.launcher import LaunchOptions, launch
from worker.models import shipped_pair
from worker.worker_config import WorkerConfig

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"  # bench/prompts/README.md
FALLBACK_PROMPTS = ("def fib(n):\n", "import json\n\ndef load(path):\n", "class Stack:\n",
                    "def quicksort(items):\n", "for i in range(10):\n")
POLICIES = ("fastest", "round_robin", "jsq", "p2c")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=160, help="requests in the trace")
    p.add_argument("--load", type=float, default=0.7, help="arrival rate / combined capacity")
    p.add_argument("--slowdown", type=float, default=3.0, help="emulated slowdown of worker 2")
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch-tokens", type=int, default=64, help="of each worker")
    p.add_argument("--out", default="bench/results/routing.json")
    return p.parse_args(argv)


def load_prompts() -> list[str]:
    prompts = []
    for name in ("humaneval.jsonl", "mbpp.jsonl"):
        path = PROMPT_DIR / name
        if path.is_file():
            prompts += [json.loads(line)["turns"][0]
                        for line in path.read_text().splitlines() if line]
    return [p for p in prompts if len(p) < 1500] or list(FALLBACK_PROMPTS)


def make_trace(n: int, rate: float, args) -> list[dict]:
    """The same requests, budgets and arrival offsets for every policy."""
    rng = random.Random(args.seed)
    prompts = load_prompts()
    t, trace = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        trace.append({"i": i, "at": t, "prompt": rng.choice(prompts),
                      "max_tokens": rng.randint(args.min_tokens, args.max_tokens)})
    return trace


def one_request(client: Client, req: dict, start: float) -> dict:
    delay = start + req["at"] - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    sent = time.perf_counter()
    first = None
    for chunk in client.generate(req["prompt"], max_tokens=req["max_tokens"], temperature=0,
                                 timeout_s=600):
        if first is None and chunk.token_ids:
            first = time.perf_counter()
        last = chunk
    done = time.perf_counter()
    return {"i": req["i"], "job_id": last.job_id, "latency_s": done - sent,
            "ttft_s": (first or done) - sent, "tokens": last.usage.completion_tokens,
            "sent": sent, "done": done}


def replay(endpoint: str, api_key: str, trace: list[dict]) -> tuple[list[dict], float]:
    with Client(endpoint, api_key) as client, ThreadPoolExecutor(len(trace)) as ex:
        start = time.perf_counter() + 0.5
        results = list(ex.map(lambda r: one_request(client, r, start), trace))
    return results, start


def pct(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def summarize(results, start, decisions, slow_name: str) -> dict:
    lat = [r["latency_s"] for r in results]
    end = max(r["done"] for r in results)
    by_job = {d.job_id: d for d in decisions}
    mine = [by_job[r["job_id"]] for r in results if r["job_id"] in by_job]
    return {
        "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95),
        "latency_p99_s": pct(lat, 0.99),
        "latency_mean_s": statistics.fmean(lat),
        "ttft_p50_s": pct([r["ttft_s"] for r in results], 0.5),
        "ttft_p95_s": pct([r["ttft_s"] for r in results], 0.95),
        "throughput_tok_s": sum(r["tokens"] for r in results) / (end - start),
        "completion_tokens": sum(r["tokens"] for r in results),
        "share_to_slow_worker": sum(d.worker == slow_name for d in mine) / max(1, len(mine)),
        "routing_decision_p50_us": 1e6 * pct([d.route_s for d in mine], 0.5),
        "routing_decision_p99_us": 1e6 * pct([d.route_s for d in mine], 0.99),
        "arrival_to_dispatch_p50_ms": 1e3 * pct([d.overhead_s for d in mine], 0.5),
        "arrival_to_dispatch_p99_ms": 1e3 * pct([d.overhead_s for d in mine], 0.99),
    }


def wait_idle(names, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = [ray.get(actor.find_worker(n).stats.remote()) for n in names]
        if all(s["num_running"] + s["num_waiting"] == 0 for s in stats):
            return
        time.sleep(0.2)


def bench_key(head: SchedulerThread) -> str:
    """A key of the tenant `bench`, on the unmetered plan: the load must not hit a quota or the
    standard plan's cap on open jobs."""
    key = head.call(head.scheduler.store.create_key("bench"))[1]
    head.call(head.scheduler.store.set_tenant_plan("bench", "internal"))
    return key


def start_scheduler(redis_url: str, policy: str) -> SchedulerThread:
    config = SchedulerConfig(redis_url=redis_url, redis_prefix=f"bench-{policy}", grpc_port=0,
                             policy=policy, max_tokens_cap=4096)
    head = SchedulerThread(config)
    deadline = time.monotonic() + 60
    while len(head.scheduler.pool.stats()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    return head


def measure_capacity(redis_url, names, args) -> dict:
    """Saturate both workers at once (the trace's budgets, all sent at the start, shared out
    by queue length); each worker's rate is the tokens it served over the time until its last
    request ended, and the capacity is their sum."""
    head = start_scheduler(redis_url, "jsq")
    try:
        key = bench_key(head)
        trace = [dict(r, at=0.0) for r in make_trace(48, 1.0, args)]
        results, start = replay(head.endpoint, key, trace)
        worker_of = {d.job_id: d.worker for d in head.scheduler.dispatcher.decisions}
    finally:
        head.stop()
    rates = {}
    for name in names:
        mine = [r for r in results if worker_of.get(r["job_id"]) == name]
        rates[name] = sum(r["tokens"] for r in mine) / (max(r["done"] for r in mine) - start)
    per_request = sum(r["tokens"] for r in results) / len(results)
    total = sum(rates.values())
    return {"tokens_per_s": total, "tokens_per_s_by_worker": rates,
            "mean_tokens_per_request": per_request, "requests_per_s": total / per_request}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for policy, runs in report["latencies"].items():
        xs = sorted(runs)
        left.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=policy)
    left.set(xlabel="latency (s)", ylabel="fraction of requests", title="latency CDF")
    left.legend()
    names = list(report["policies"])
    p95 = [report["policies"][n]["latency_p95_s"] for n in names]
    right.bar(names, p95, color=["tab:blue", "tab:orange", "tab:green", "tab:red"][:len(names)])
    right.set(ylabel="p95 latency (s)", title=f"load {report['setup']['load']:.0%} of capacity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    pair = shipped_pair()
    if pair is None:
        print("error: the shipped pair is not installed", file=sys.stderr)
        return 2
    policies = args.policies.split(",")
    ray.init(num_cpus=8, namespace=actor.NAMESPACE, include_dashboard=False, logging_level="ERROR")
    tmp = tempfile.TemporaryDirectory()
    redis = LocalRedis(Path(tmp.name) / "redis")
    redis.start()
    names = ("fast", "slow")
    try:
        for name, slowdown in zip(names, (1.0, args.slowdown)):
            config = WorkerConfig(name=name, target=str(pair[0]), draft=str(pair[1]),
                                  gpu_type="cpu", emulate_slowdown=slowdown,
                                  max_batch_tokens=args.max_batch_tokens,
                                  sps_cache_dir=str(Path(tmp.name) / "sps"))
            launch(LaunchOptions(ray.get_runtime_context().gcs_address, config), out=io.StringIO())
        capacity = measure_capacity(redis.url, names, args)
        rate = args.load * capacity["requests_per_s"]
        trace = make_trace(args.requests, rate, args)
        report = {"setup": {"requests": args.requests, "load": args.load, "slowdown": args.slowdown,
                            "arrival_rate_per_s": rate, "capacity": capacity, "seed": args.seed,
                            "max_tokens_range": [args.min_tokens, args.max_tokens],
                            "max_batch_tokens": args.max_batch_tokens},
                  "policies": {}, "latencies": {}}
        for policy in policies:
            wait_idle(names)
            head = start_scheduler(redis.url, policy)
            try:
                key = bench_key(head)
                results, start = replay(head.endpoint, key, trace)
                decisions = list(head.scheduler.dispatcher.decisions)
            finally:
                head.stop()
            report["policies"][policy] = summarize(results, start, decisions, "slow")
            report["latencies"][policy] = [r["latency_s"] for r in results]
            print(f"{policy}: {json.dumps(report['policies'][policy])}", file=sys.stderr,
                  flush=True)
        report["checks"] = checks(report["policies"])
    finally:
        for name in names:
            if (handle := actor.find_worker(name)) is not None:
                actor.kill(handle)
        redis.stop()
        ray.shutdown()
        tmp.cleanup()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in report.items() if k != "latencies"}
    out.write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))
    return 0


def checks(p: dict) -> dict:
    if not {"fastest", "round_robin", "jsq"} <= set(p):
        return {}
    f, rr, jsq = p["fastest"], p["round_robin"], p["jsq"]
    return {
        "p95_fastest_over_round_robin": f["latency_p95_s"] / rr["latency_p95_s"],
        "p95_fastest_over_jsq": f["latency_p95_s"] / jsq["latency_p95_s"],
        "throughput_fastest_over_round_robin": f["throughput_tok_s"] / rr["throughput_tok_s"],
        "throughput_fastest_over_jsq": f["throughput_tok_s"] / jsq["throughput_tok_s"],
        "met_p95_at_most_0.75x_round_robin": f["latency_p95_s"] <= 0.75 * rr["latency_p95_s"],
        "met_p95_no_worse_than_jsq": f["latency_p95_s"] <= jsq["latency_p95_s"],
        "met_throughput_at_least_theirs": f["throughput_tok_s"] >= max(rr["throughput_tok_s"],
                                                                       jsq["throughput_tok_s"]),
    }


if __name__ == "__main__":
    sys.exit(main())
