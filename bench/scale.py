"""Scale benchmark: routing and workers' figures at network scale, with simulated workers.

1. Decision cost: per routing decision (choose, then count the job as sent to the chosen
   worker) at 100, 1,000 and 10,000 workers, for `fastest` over a plain list (every worker
   scored: the router before the candidate index) and over the pool's candidate index (a
   bounded sample scored): decisions per second, p50 and p99 of the wall time and of the
   thread's CPU time (on a machine that other processes share, the wall time's tail is their
   time slices: `setup.load_average` says how busy it was). Also the cost of one figures
   update in the index (a worker's snapshot put again).
2. Routing quality: one simulated trace (Poisson arrivals at `--load` of the workers' combined
   capacity, budgets from 16 to 1,024 tokens) over heterogeneous workers (three device speeds,
   accepted lengths from 2 to 3.5, continuous batching of up to 8 requests following SPS(B)),
   whose figures the router sees as the pool would: refreshed every 0.5 s, plus its own count
   of what it sent since. p95 request latency of the sampled router against the exhaustive
   one on the same trace: the target is at most +10%.
3. Figures path: the calls per second one scheduler makes to learn the workers' figures,
   polled (stats + check_health per worker per interval) against pushed (one call per board
   per interval); and, on a real local Ray cluster, one figures board under `--pushers`
   simulated workers pushing every 0.5 s: push latency, read latency, entries per read and
   the age of the figures read (the staleness actually seen).

Prints one JSON object, writes it to `--out` and a plot beside it. Not a test: it asserts
nothing; `checks` say whether the figures meet the issue's targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from scheduler.router import CandidateIndex, PoolView, Router, WorkerSnapshot, modelled_throughput
from sparkgrid.costs import SPSTable

KINDS = {  # device speed: target forwards per second by tokens per forward
    "fast": SPSTable([1, 32, 256], [60.0, 60.0, 20.0]),
    "mid": SPSTable([1, 32, 256], [36.0, 36.0, 12.0]),
    "slow": SPSTable([1, 32, 256], [18.0, 18.0, 6.0]),
}
SHARES = {"fast": 0.2, "mid": 0.4, "slow": 0.4}
MAX_NUM_SEQS = 8
REFRESH_S = 0.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100,1000,10000", help="pool sizes of the decision cost")
    p.add_argument("--decisions", type=int, default=3000, help="per size, sampled router")
    p.add_argument("--exhaustive-budget-s", type=float, default=8.0,
                   help="time spent per size on the exhaustive router's decisions")
    p.add_argument("--trace-workers", type=int, default=1000)
    p.add_argument("--trace-seconds", type=float, default=12.0, help="of simulated arrivals")
    p.add_argument("--load", type=float, default=0.85, help="arrival rate / capacity")
    p.add_argument("--pushers", type=int, default=300, help="0: skip the real-Ray part")
    p.add_argument("--push-seconds", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/scale.json")
    return p.parse_args(argv)


def pct(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def loaded_worker(rng: random.Random, i: int) -> WorkerSnapshot:
    kind = rng.choices(list(SHARES), list(SHARES.values()))[0]
    running = rng.randint(0, MAX_NUM_SEQS)
    return WorkerSnapshot(f"w{i:05d}", "m", "ready", True, rng.randint(0, 4), running,
                          running * rng.randint(50, 600), rng.uniform(0, 900),
                          rng.uniform(2.0, 3.5), KINDS[kind], MAX_NUM_SEQS)


# -- 1. decision cost -----------------------------------------------------------------------
def decision_cost(n: int, sampled: bool, decisions: int, budget_s: float, seed: int) -> dict:
    rng = random.Random(seed)
    snaps = [loaded_worker(rng, i) for i in range(n)]
    where = {w.name: i for i, w in enumerate(snaps)}
    index = CandidateIndex()
    put_times = []
    for w in snaps:
        t0 = time.perf_counter()
        index.put(w)
        put_times.append(time.perf_counter() - t0)
    view = PoolView(lambda: snaps, {"m": index})
    router = Router("fastest", rng_seed=seed)
    times, cpu, started = [], [], time.perf_counter()
    while len(times) < decisions and (sampled or time.perf_counter() - started < budget_s):
        tokens = rng.randint(16, 1024)
        c0, t0 = time.thread_time(), time.perf_counter()
        chosen = router.choose(view if sampled else snaps, "m", tokens)
        sent = dataclasses.replace(chosen, pending_requests=chosen.pending_requests + 1,
                                   pending_tokens=chosen.pending_tokens + tokens)
        if sampled:
            index.put(sent)  # what the pool does when it counts the job as sent
        else:
            snaps[where[sent.name]] = sent
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return {"workers": n, "decisions": len(times), "decisions_per_s": len(times) / sum(times),
            "p50_us": 1e6 * pct(times, 0.5), "p99_us": 1e6 * pct(times, 0.99),
            "cpu_p50_us": 1e6 * pct(cpu, 0.5), "cpu_p99_us": 1e6 * pct(cpu, 0.99),
            "index_put_p50_us": 1e6 * pct(put_times, 0.5)}


# -- 2. routing quality over a simulated trace ------------------------------------------------
class SimWorker:
    """Continuous batching of up to MAX_NUM_SEQS requests; each running request commits tokens
    at the modelled per-request rate of the current batch (fluid between events)."""

    def __init__(self, snap: WorkerSnapshot):
        self.snap = snap
        self.running: list[list] = []  # [remaining tokens, arrival time]
        self.waiting: list[list] = []
        self.t = 0.0
        self.version = 0
        self.generated = 0.0

    def rate(self) -> float:
        n = len(self.running)
        return modelled_throughput(self.snap, n) / n if n else 0.0

    def advance(self, t: float) -> None:
        r, dt = self.rate(), t - self.t
        for req in self.running:
            req[0] -= r * dt
        self.generated += r * dt * len(self.running)
        self.t = t

    def next_done(self) -> float | None:
        if not self.running:
            return None
        return self.t + max(0.0, min(req[0] for req in self.running)) / self.rate()


def run_trace(workers: list[WorkerSnapshot], trace: list[tuple], sampled: bool,
              seed: int) -> dict:
    sims = [SimWorker(w) for w in workers]
    by_name = {w.name: i for i, w in enumerate(workers)}
    index = CandidateIndex()
    for w in workers:
        index.put(w)
    snaps = list(workers)
    view = PoolView(lambda: snaps, {"m": index})
    router = Router("fastest", rng_seed=seed)
    events: list[tuple] = []  # (time, kind 0 done / 1 refresh, worker, version)
    heapq.heappush(events, (REFRESH_S, 1, -1, 0))
    latencies, route_s, last_gen = [], [], [0.0] * len(sims)
    arrivals = iter(trace)
    nxt = next(arrivals, None)
    inflight = 0

    def schedule(i):
        s = sims[i]
        s.version += 1
        if (at := s.next_done()) is not None:
            heapq.heappush(events, (at, 0, i, s.version))

    while nxt is not None or events:
        if nxt is not None and (not events or nxt[0] <= events[0][0]):
            at, tokens = nxt
            nxt = next(arrivals, None)
            t0 = time.perf_counter()
            chosen = router.choose(view if sampled else snaps, "m", tokens)
            route_s.append(time.perf_counter() - t0)
            i = by_name[chosen.name]
            sent = dataclasses.replace(snaps[i], pending_requests=snaps[i].pending_requests + 1,
                                       pending_tokens=snaps[i].pending_tokens + tokens)
            snaps[i] = sent
            index.put(sent)
            s = sims[i]
            s.advance(at)
            (s.running if len(s.running) < MAX_NUM_SEQS else s.waiting).append([tokens, at])
            inflight += 1
            schedule(i)
            continue
        at, kind, i, version = heapq.heappop(events)
        if kind == 1:  # the figures the pool would hold now (pushed or polled)
            for j, s in enumerate(sims):
                s.advance(at)
                snap = dataclasses.replace(
                    snaps[j], num_running=len(s.running), num_waiting=len(s.waiting),
                    remaining_tokens=round(sum(r[0] for r in s.running + s.waiting)),
                    tokens_per_s=(s.generated - last_gen[j]) / REFRESH_S,
                    pending_requests=0, pending_tokens=0)
                last_gen[j] = s.generated
                if snap != snaps[j]:
                    snaps[j] = snap
                    index.put(snap)
            if nxt is not None or inflight:
                heapq.heappush(events, (at + REFRESH_S, 1, -1, 0))
            continue
        s = sims[i]
        if version != s.version:
            continue
        s.advance(at)
        for req in [r for r in s.running if r[0] <= 1e-6]:
            s.running.remove(req)
            latencies.append(at - req[1])
            inflight -= 1
        while s.waiting and len(s.running) < MAX_NUM_SEQS:
            s.running.append(s.waiting.pop(0))
        schedule(i)
    return {"requests": len(latencies), "latency_p50_s": pct(latencies, 0.5),
            "latency_p95_s": pct(latencies, 0.95), "latency_p99_s": pct(latencies, 0.99),
            "latency_mean_s": statistics.fmean(latencies),
            "route_p50_us": 1e6 * pct(route_s, 0.5), "route_p99_us": 1e6 * pct(route_s, 0.99)}


def quality(args) -> dict:
    rng = random.Random(args.seed + 1)
    workers = []
    for i in range(args.trace_workers):
        kind = rng.choices(list(SHARES), list(SHARES.values()))[0]
        workers.append(WorkerSnapshot(f"w{i:05d}", "m", "ready", True, 0, 0, 0, 0.0,
                                      rng.uniform(2.0, 3.5), KINDS[kind], MAX_NUM_SEQS))
    mean_tokens = (16 + 1024) / 2
    capacity = sum(modelled_throughput(w, MAX_NUM_SEQS) for w in workers) / mean_tokens
    rate, t, trace = args.load * capacity, 0.0, []
    while t < args.trace_seconds:
        t += rng.expovariate(rate)
        trace.append((t, rng.randint(16, 1024)))
    out = {"workers": args.trace_workers, "load": args.load, "arrival_rate_per_s": rate,
           "requests": len(trace), "kinds": {k: v for k, v in SHARES.items()}}
    for name, sampled in (("exhaustive", False), ("sampled", True)):
        started = time.perf_counter()
        out[name] = run_trace(workers, trace, sampled, args.seed)
        print(f"trace {name}: {json.dumps(out[name])} ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr, flush=True)
    out["p95_sampled_over_exhaustive"] = (out["sampled"]["latency_p95_s"]
                                          / out["exhaustive"]["latency_p95_s"])
    return out


# -- 3. the figures path ----------------------------------------------------------------------
def figures_calls(sizes: list[int], interval_s: float = 0.5, shards: int = 1) -> dict:
    """Calls per second one scheduler makes to learn every worker's figures (lease renewals,
    made only to workers that stream its jobs, come on top of both)."""
    return {str(n): {"polled_calls_per_s": 2 * n / interval_s,
                     "pushed_calls_per_s": shards / interval_s,
                     "pushes_per_s_at_most": n / interval_s} for n in sizes}


def board_measurement(pushers: int, seconds: float, figures: dict) -> dict:
    import ray

    from sparkgrid.board import layout, open_boards

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        board = open_boards(layout(1, 0.5, 5.0))[0]

        @ray.remote(num_cpus=0)
        class Load:  # many workers' pushes from one process: each pushes every 0.5 s, the
            # workers' pushes spread over the interval (as independent workers' would be)
            async def run(self, names, seconds):
                import asyncio

                lat, end = [], time.monotonic() + seconds

                async def worker(k, name):
                    await asyncio.sleep(0.5 * k / len(names))
                    while time.monotonic() < end:
                        t0 = time.monotonic()
                        await board.push.remote(name, {**figures, "name": name,
                                                       "uptime_s": t0})
                        lat.append(time.monotonic() - t0)
                        await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - t0)))
                await asyncio.gather(*(worker(k, n) for k, n in enumerate(names)))
                return lat

        groups = 2
        names = [f"sim-{i:04d}" for i in range(pushers)]
        loads = [Load.remote() for _ in range(groups)]
        runs = [ld.run.remote(names[g::groups], seconds) for g, ld in enumerate(loads)]
        cursor, reads = (None, 0), []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic()
            reply = ray.get(board.since.remote(*cursor))
            took = time.monotonic() - t0
            cursor = (reply["epoch"], reply["version"])
            reads.append((took, len(reply["entries"]),
                          max((e[3] for e in reply["entries"]), default=0.0)))
            time.sleep(max(0.0, 0.5 - took))
        push_lat = [x for lat in ray.get(runs) for x in lat]
        steady = reads[2:] or reads
        return {"pushers": pushers, "seconds": seconds, "push_interval_s": 0.5,
                "pushes_per_s": len(push_lat) / seconds,
                "push_p50_ms": 1e3 * pct(push_lat, 0.5), "push_p99_ms": 1e3 * pct(push_lat, 0.99),
                "read_p50_ms": 1e3 * pct([r[0] for r in steady], 0.5),
                "read_p99_ms": 1e3 * pct([r[0] for r in steady], 0.99),
                "entries_per_read_p50": pct([r[1] for r in steady], 0.5),
                "oldest_entry_read_s_max": max(r[2] for r in steady),
                "reads": len(reads)}
    finally:
        ray.shutdown()


def sample_figures() -> dict:
    return dict(name="x", node_id="n", node_ip="10.0.0.2", device="cuda:0", device_name="H200",
                gpu_type="H200", price_per_hour=2.5, model_id="org/m", target="/m/t",
                draft="/m/d", verify_policy="prefix", max_batch_tokens=512, max_num_seqs=64,
                max_context=8192, emulate_slowdown=1.0, version={"sparkgrid": "0.1.0"},
                started_at=1.0, state="ready", uptime_s=3.0, num_waiting=1, num_running=2,
                remaining_tokens=40, tokens_per_s=12.5, mean_accept_length=2.5,
                sps={"batch_tokens": [1, 8, 64, 512],
                     "steps_per_second": [50.0, 49.0, 45.0, 20.0]})


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, colour in (("exhaustive", "tab:blue"), ("sampled", "tab:red")):
        rows = report["decision_cost"][name]
        xs = [r["workers"] for r in rows]
        left.plot(xs, [r["cpu_p99_us"] / 1e3 for r in rows], "o-", color=colour,
                  label=f"{name}: p99 (CPU time)")
        left.plot(xs, [r["p50_us"] / 1e3 for r in rows], "x--", color=colour,
                  label=f"{name}: p50 (wall)")
        left.plot(xs, [r["p99_us"] / 1e3 for r in rows], ":", color=colour, alpha=0.5,
                  label=f"{name}: p99 (wall, shared CPUs)")
    left.axhline(1.0, color="grey", lw=0.8, ls=":")
    left.set(xscale="log", yscale="log", xlabel="workers", ylabel="ms per decision",
             title="routing decision cost")
    left.legend(fontsize=7)
    q = report["quality"]
    names = ["exhaustive", "sampled"]
    for k, key in enumerate(("latency_p50_s", "latency_p95_s", "latency_p99_s")):
        right.bar([x + 0.25 * k for x in range(2)], [q[n][key] for n in names], width=0.25,
                  label=key.split("_")[1])
    right.set_xticks([0.25, 1.25], names)
    right.set(ylabel="request latency (s)",
              title=f"simulated trace: {q['workers']} workers, load {q['load']:.0%}")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    report = {"setup": {**{k: v for k, v in vars(args).items() if k != "out"},
                        "load_average": os.getloadavg(), "cpus": os.cpu_count()},
              "decision_cost": {"exhaustive": [], "sampled": []}}
    for n in sizes:
        for name, sampled in (("exhaustive", False), ("sampled", True)):
            row = decision_cost(n, sampled, args.decisions, args.exhaustive_budget_s, args.seed)
            report["decision_cost"][name].append(row)
            print(f"{name} {n}: {json.dumps(row)}", file=sys.stderr, flush=True)
    report["quality"] = quality(args)
    report["figures"] = {"calls": figures_calls(sizes)}
    if args.pushers:
        report["figures"]["board"] = board_measurement(args.pushers, args.push_seconds,
                                                       sample_figures())
    largest = report["decision_cost"]["sampled"][-1]
    report["checks"] = {
        f"sampled_p99_under_1ms_at_{largest['workers']}": largest["p99_us"] < 1000,
        f"sampled_cpu_p99_under_1ms_at_{largest['workers']}": largest["cpu_p99_us"] < 1000,
        "p95_within_10pct_of_exhaustive": report["quality"]["p95_sampled_over_exhaustive"] <= 1.1,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
