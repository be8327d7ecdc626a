"""Retention benchmark: Redis memory per 100,000 finished jobs, and what each TTL frees.

A private `redis-server` is filled through the real `RedisStore` with `--jobs` realistic jobs:
each is created (with a request id, under a plan with quotas, so its quota and concurrency
keys are used too), dispatched to one of `--workers` workers, noted in progress, and settled
with a `ledger.Bill` and its output: `--output-tokens` token ids (about 200) and their text
(about 4.2 characters a token), concurrently in batches. Redis's own `used_memory` is read
(after a `MEMORY PURGE`) at four points:
- empty;
- all jobs finished, everything kept (what the first 24 h hold: record, events, request id,
  output, ledger);
- after the output TTL (`keep_text_s`): the `job_output:*` keys removed, as their expiry would;
- after the record TTL (`keep_jobs_s`): `job:*`, `job_events:*` and `request:*` removed too:
  what stays for ever is the ledger (per tenant, model, worker, GPU and day) and key sets.
Expiry itself is checked, not waited for: the TTL of a sample of keys is read back. Figures
are bytes per job and MiB per 100,000 jobs.

Prints one JSON object and writes it to `--out`. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import redis

from scheduler.jobs import JobState
from scheduler.ledger import Bill, Segment, utc_day
from scheduler.local_redis import LocalRedis
from scheduler.quota import Admission, Limits
from scheduler.redis_store import RedisStore

PREFIX = "sparkgrid"
WORDS = ("the", "def", "return", "value", "parser", "self", "import", "args", "for", "in",
         "result", "None", "if", "else", "list", "dict", "print", "error", "config", "data")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--output-tokens", type=int, default=200)
    p.add_argument("--tenants", type=int, default=50)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--batch", type=int, default=64, help="jobs written concurrently")
    p.add_argument("--keep-text-s", type=float, default=24 * 3600.0)
    p.add_argument("--keep-jobs-s", type=float, default=30 * 86400.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/retention.json")
    return p.parse_args(argv)


def memory(raw: redis.Redis) -> int:
    raw.execute_command("MEMORY", "PURGE")
    return int(raw.info("memory")["used_memory"])


async def one_job(store: RedisStore, i: int, rng: random.Random, args, now: float) -> None:
    job_id = f"{i:024x}"
    tenant = f"tenant-{rng.randrange(args.tenants):03d}"
    prompt_tokens = rng.randint(50, 400)
    params = {"max_tokens": 256, "temperature": 0.7, "top_p": 1.0, "top_k": 0, "seed": None,
              "stop": []}
    await store.create_job({
        "job_id": job_id, "tenant": tenant, "model": "org/model-7b",
        "request_id": f"req-{i:012d}", "params": params, "prompt_sha256": "ab" * 32,
        "owner": "scheduler-0123abcd", "created_at": now, "prompt_tokens": prompt_tokens,
        "plan": "standard"},
        Admission(Limits(tokens_per_day=10**12, tokens_per_month=10**13,
                         max_concurrent_jobs=10**6), prompt_tokens + 256, now))
    worker = f"worker-{rng.randrange(args.workers):02d}"
    await store.start_job(job_id, worker, now + 0.01)
    n = args.output_tokens
    await store.record_progress(job_id, n // 2, now + 1.0)
    token_ids = [rng.randrange(150_000) for _ in range(n)]
    text = " ".join(rng.choice(WORDS) for _ in range(n))
    segment = Segment(worker, "H100", prompt_tokens, n, draft_tokens=3 * n, verified_tokens=2 * n,
                      accepted_tokens=n, spec_steps=n // 2, busy_ms=2000)
    bill = Bill(job_id, tenant, "org/model-7b", now + 2.0, prompt_tokens, n, (segment,),
                charge_uusd=prompt_tokens // 10 + 4 * n // 10)
    await store.finish_job(job_id, JobState.FINISHED, {
        "finish_reason": "length", "error": "", "finished_at": now + 2.0,
        "prompt_tokens": prompt_tokens, "completion_tokens": n, "charge_uusd": bill.charge_uusd,
        "plan": "standard", "price_version": "2026-12-01", "segments": [segment],
        "spec": {"draft_tokens": 3 * n, "verified_tokens": 2 * n, "accepted_tokens": n,
                 "spec_steps": n // 2},
        "text": text, "token_ids": token_ids, "workers": [worker]}, bill)


def delete(raw: redis.Redis, pattern: str) -> int:
    removed, batch = 0, []
    for key in raw.scan_iter(match=pattern, count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            removed += raw.unlink(*batch)
            batch = []
    if batch:
        removed += raw.unlink(*batch)
    return removed


async def fill(url: str, args) -> dict:
    rng = random.Random(args.seed)
    store = RedisStore(url, PREFIX, keep_text_s=args.keep_text_s, keep_jobs_s=args.keep_jobs_s)
    now = time.time()
    started = time.perf_counter()
    try:
        for first in range(0, args.jobs, args.batch):
            await asyncio.gather(*(one_job(store, i, rng, args, now)
                                   for i in range(first, min(args.jobs, first + args.batch))))
    finally:
        await store.close()
    return {"fill_s": round(time.perf_counter() - started, 1), "day": utc_day(now)}


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        server = LocalRedis(workdir)
        server.start()
        try:
            raw = redis.Redis.from_url(server.url, decode_responses=True)
            empty = memory(raw)
            filled = asyncio.run(fill(server.url, args))
            p = f"{PREFIX}:"
            sample = f"{0:024x}"
            ttls = {"job_output": raw.ttl(f"{p}job_output:{sample}"),
                    "job": raw.ttl(f"{p}job:{sample}"),
                    "job_events": raw.ttl(f"{p}job_events:{sample}"),
                    "request": raw.ttl(f"{p}request:" + raw.hget(f"{p}job:{sample}", "tenant")
                                       + f":req-{0:012d}"),
                    "ledger": raw.ttl(next(raw.scan_iter(match=f"{p}usage:tenant:*")))}
            all_kept = memory(raw) - empty
            keys_all = raw.dbsize()
            delete(raw, f"{p}job_output:*")
            after_text = memory(raw) - empty
            for kind in ("job", "job_events", "request"):
                delete(raw, f"{p}{kind}:*")
            after_jobs = memory(raw) - empty
            keys_left = raw.dbsize()
            server_version = raw.info("server")["redis_version"]
        finally:
            server.stop()
    per_100k = 100_000 / args.jobs

    def figures(used: int) -> dict:
        return {"bytes": used, "bytes_per_job": round(used / args.jobs, 1),
                "mib_per_100k_jobs": round(used * per_100k / 2**20, 1)}

    result = {
        "bench": "retention", "jobs": args.jobs, "output_tokens": args.output_tokens,
        "tenants": args.tenants, "workers": args.workers, **filled,
        "keep_text_s": args.keep_text_s, "keep_jobs_s": args.keep_jobs_s,
        "ttl_s_read_back": ttls, "keys_all_kept": keys_all, "keys_left_forever": keys_left,
        "memory": {"all_kept": figures(all_kept),
                   "after_text_ttl": figures(after_text),
                   "after_record_ttl": figures(after_jobs),
                   "freed_by_text_ttl": figures(all_kept - after_text),
                   "freed_by_record_ttl": figures(after_text - after_jobs)},
        "redis_server": server_version, "redis_py": redis.__version__,
        "python": sys.version.split()[0]}
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
