"""Ledger benchmark: how long cost reports take over a synthetic month of jobs.

For each size in `--jobs` (10,000 and 100,000) a private `redis-server` is filled through the
real `RedisStore`: every job is created, dispatched (`start_job`, once per segment: a few jobs
fail over to a second worker) and settled with a `ledger.Bill` carrying its charge
(`finish_job`), concurrently in batches; then each worker's online and active time per UTC day
is recorded (`record_worker_time`). The population: `--tenants` tenants (a few heavy, many
light), `--workers` workers over five GPU types with their prices, `--days` UTC days. Then
`build_report` is timed for each `by` (median of `--repeats`), and the four reports of
`--format html` together (`build_reports`).

Prints one JSON object and writes it to `--out`. Not a test: it asserts nothing; the
`totals_match_billed` check says whether every report's totals equal what was billed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from scheduler.jobs import JobState
from scheduler.ledger import Bill, Segment, utc_day
from scheduler.local_redis import LocalRedis
from scheduler.redis_store import RedisStore
from scheduler.reports import BY, build_report, build_reports, cell_cost_uusd

GPUS = {  # GPU type: (asked price in micro-dollars per hour, decode tokens/s of one request)
    "H200": (3_490_000, 220), "H100": (2_490_000, 160), "A100": (1_290_000, 110),
    "L40S": (790_000, 70), "L4": (390_000, 35)}
PRICE_UUSD_PER_MTOK = (10_000_000, 30_000_000)  # charged per million prompt, completion tokens
FIRST_DAY = date(2025, 5, 1)
GAMMA = 7  # draft tokens per speculative step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", default="10000,100000", help="comma-separated ledger sizes")
    p.add_argument("--tenants", type=int, default=20)
    p.add_argument("--workers", type=int, default=40, help="spread evenly over the 5 GPU types")
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--failover-rate", type=float, default=0.02, help="share of jobs on 2 workers")
    p.add_argument("--concurrency", type=int, default=64, help="jobs written at once")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/ledger.json")
    return p.parse_args(argv)


def make_workers(num_workers: int, rng: random.Random) -> dict[str, dict]:
    """name -> registration: GPU type, price (the type's, +-10%), node, model."""
    gpus = list(GPUS)
    out = {}
    for i in range(num_workers):
        gpu = gpus[i % len(gpus)]
        price = round(GPUS[gpu][0] * rng.uniform(0.9, 1.1))
        out[f"{gpu.lower()}-{i // len(gpus):02d}"] = {
            "gpu_type": gpu, "price_uusd_per_hour": price,
            "node_ip": f"10.0.{i // 250}.{i % 250 + 1}", "model": "qwen3-8b"}
    return out


def segment(worker: str, gpu: str, prompt: int, completion: int, rng: random.Random) -> Segment:
    steps = math.ceil(completion / rng.uniform(2.2, 3.6)) if completion else 0
    accepted = completion - steps  # each step commits its accepted tokens plus one
    busy_ms = 40 + prompt // 20 + completion * 1000 // GPUS[gpu][1]
    return Segment(worker, gpu, prompt, completion, draft_tokens=steps * GAMMA,
                   verified_tokens=steps * GAMMA, accepted_tokens=accepted, busy_ms=busy_ms,
                   spec_steps=steps)


def make_bill(i: int, tenants, weights, workers, args, rng: random.Random) -> Bill:
    day = FIRST_DAY + timedelta(days=rng.randrange(args.days))
    finished_at = datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp()
    finished_at += rng.uniform(0, 86_399)
    prompt, completion = rng.randint(20, 2000), rng.randint(1, 800)
    names = rng.sample(list(workers), 2)
    first = workers[names[0]]["gpu_type"]
    if rng.random() < args.failover_rate and completion > 1:
        cut = rng.randint(1, completion - 1)
        segments = (segment(names[0], first, prompt, cut, rng),
                    segment(names[1], workers[names[1]]["gpu_type"], prompt + cut,
                            completion - cut, rng))
    else:
        segments = (segment(names[0], first, prompt, completion, rng),)
    charge = (prompt * PRICE_UUSD_PER_MTOK[0] + completion * PRICE_UUSD_PER_MTOK[1]) // 1_000_000
    return Bill(f"job-{i:07d}", rng.choices(tenants, weights)[0], "qwen3-8b", finished_at,
                prompt, completion, segments, charge_uusd=charge)


async def write_job(store: RedisStore, bill: Bill) -> None:
    await store.create_job({"job_id": bill.job_id, "tenant": bill.tenant, "model": bill.model,
                            "request_id": "", "params": {"max_tokens": 800}, "owner": "bench",
                            "created_at": bill.finished_at - 30})
    for k, seg in enumerate(bill.segments):
        await store.start_job(bill.job_id, seg.worker, bill.finished_at - 20 + k)
    await store.finish_job(bill.job_id, JobState.FINISHED,
                           {"finished_at": bill.finished_at, "prompt_tokens": bill.prompt_tokens,
                            "completion_tokens": bill.completion_tokens}, bill)


async def write_ledger(store: RedisStore, bills: list[Bill], workers: dict, args,
                       rng: random.Random) -> dict[str, int]:
    """Writes the jobs, then each worker's time per day; returns the billed totals."""
    limit = asyncio.Semaphore(args.concurrency)

    async def one(bill):
        async with limit:
            await write_job(store, bill)

    await asyncio.gather(*(one(b) for b in bills))
    busy: dict[tuple[str, str], int] = {}
    for bill in bills:
        for seg in bill.segments:
            key = (seg.worker, utc_day(bill.finished_at))
            busy[key] = busy.get(key, 0) + seg.busy_ms
    target = {w: rng.uniform(0.25, 0.9) for w in workers}  # each worker's utilisation
    gpu_cost = 0
    for d in range(args.days):
        day = (FIRST_DAY + timedelta(days=d)).isoformat()
        for worker, info in workers.items():
            active = min(busy.get((worker, day), 0), 86_400_000)
            online = min(86_400_000, max(active, round(active / target[worker])))
            if online:
                await store.record_worker_time(worker, info, day, online, active)
                gpu_cost += cell_cost_uusd(online * info["price_uusd_per_hour"])
    return {"charge_uusd": sum(b.charge_uusd for b in bills), "gpu_cost_uusd": gpu_cost,
            "completion_tokens": sum(b.completion_tokens for b in bills)}


def totals_match(reports: dict, billed: dict[str, int]) -> bool:
    def uusd(value) -> int:
        return int(value * 1_000_000)

    t, w, g, d = (reports[by].totals for by in ("tenant", "worker", "gpu", "day"))
    return (all(uusd(x["gpu_cost_usd"]) == billed["gpu_cost_uusd"] for x in (t, w, g, d))
            and all(uusd(x) == billed["charge_uusd"] for x in (t["charges_usd"], w["revenue_usd"],
                                                               g["revenue_usd"], d["charges_usd"]))
            and w["tokens_served"] == g["tokens_served"] == billed["completion_tokens"])


async def timed(make, repeats: int) -> tuple[float, list[float]]:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        await make()
        runs.append(round(time.perf_counter() - start, 4))
    return statistics.median(runs), runs


async def bench_size(url: str, num_jobs: int, args) -> dict:
    rng = random.Random(args.seed + num_jobs)
    tenants = [f"tenant-{i:02d}" for i in range(args.tenants)]
    weights = [1 / (i + 1) for i in range(args.tenants)]  # Zipf: a few heavy tenants
    workers = make_workers(args.workers, rng)
    bills = [make_bill(i, tenants, weights, workers, args, rng) for i in range(num_jobs)]
    store = RedisStore(url, prefix=f"bench{num_jobs}", timeout_s=30.0)
    since = FIRST_DAY.isoformat()
    until = (FIRST_DAY + timedelta(days=args.days - 1)).isoformat()
    try:
        start = time.perf_counter()
        billed = await write_ledger(store, bills, workers, args, rng)
        write_s = time.perf_counter() - start
        report_s, runs = {}, {}
        for by in BY:
            report_s[by], runs[by] = await timed(
                lambda by=by: build_report(store, since, until, by), args.repeats)
        html_s, runs["all_four"] = await timed(lambda: build_reports(store, since, until),
                                               args.repeats)
        reports = await build_reports(store, since, until)
    finally:
        await store.close()
    return {"jobs": num_jobs, "failover_jobs": sum(len(b.segments) > 1 for b in bills),
            "write_s": round(write_s, 2), "jobs_written_per_s": round(num_jobs / write_s),
            "report_s": report_s, "all_four_reports_s": html_s, "runs_s": runs,
            "rows": {by: len(r.rows) for by, r in reports.items()},
            "totals_match_billed": totals_match(reports, billed)}


async def main_async(args) -> dict:
    sizes = [int(n) for n in args.jobs.split(",")]
    with tempfile.TemporaryDirectory(prefix="sparkgrid-bench-") as workdir:
        server = LocalRedis(workdir)
        server.start()
        try:
            results = [await bench_size(server.url, n, args) for n in sizes]
        finally:
            server.stop()
    return {"benchmark": "ledger reports", "cpus": os.cpu_count(),
            "config": {"tenants": args.tenants, "workers": args.workers, "gpu_types": list(GPUS),
                       "days": args.days, "first_day": FIRST_DAY.isoformat(),
                       "failover_rate": args.failover_rate, "concurrency": args.concurrency,
                       "repeats": args.repeats, "seed": args.seed},
            "results": results}


def main(argv=None) -> int:
    args = parse_args(argv)
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
