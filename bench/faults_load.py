"""The client side of the fault benchmark (`faults.py`): a mixed load of API calls from several
tenants spread over several schedulers and retried as a real client retries, and the
reconciliation of what the clients received with what the ledger billed.

The load (`make_specs`, `Load`): each request is a streamed `Generate`, a `Complete`, a stream
cancelled (`Cancel`) after its first chunk, or a repeat of an earlier request of the same
tenant (the same `request_id`, prompt and parameters). Every request has a `request_id`, so a
retry (on UNAVAILABLE, or RESOURCE_EXHAUSTED with a short retry-after) asks for the same job;
each attempt goes to the next scheduler in turn. Every chunk's token ids are counted per job id
as they arrive, so a stream cut off by a fault still counts what it delivered.

The reconciliation (`reconcile`): per tenant, the completion tokens the clients received (each
job once: the most any call saw of it, since a repeat returns the first job's tokens again)
against those billed (the ledger's usage hashes); each job's record against what its clients
received, listing every job billed more or less than delivered; quota overspend; the jobs left
open.

Knows: the public gRPC API (`scheduler.client.Client`), the job store's read methods.
Does not know: how the faults are staged, Ray, processes.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

import grpc

from scheduler.client import Client
from scheduler.redis_store import RedisStore

KINDS = ("stream", "complete", "cancel", "repeat")
KIND_WEIGHTS = (0.45, 0.25, 0.15, 0.15)
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
CALL_TIMEOUT_S = 180.0
RETRY_FOR_S = 90.0
"""How long a request keeps retrying (covers a 10 s Redis stop and a scheduler restart)."""
ORPHAN_ERROR = "the scheduler that ran it"
"""How the error of a job settled by another scheduler (`billing.orphan_end`) begins."""
SHORT_RETRY_AFTER_S = 5.0
"""RESOURCE_EXHAUSTED is retried only when its retry-after is this short (a full queue, not a
spent quota)."""


@dataclass(frozen=True)
class Spec:
    """One request of the load."""

    index: int
    tenant: str
    kind: str
    prompt: str
    max_tokens: int
    temperature: float
    seed: int
    request_id: str

    def fields(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature,
                "seed": self.seed, "request_id": self.request_id}


def make_specs(n: int, tenants: list[str], prompts: list[str], rng: random.Random,
               min_tokens: int, max_tokens: int) -> list[Spec]:
    """`n` requests, the tenants in turn; a repeat copies an earlier request of its tenant."""
    specs: list[Spec] = []
    firsts: dict[str, list[Spec]] = {t: [] for t in tenants}
    for i in range(n):
        tenant = tenants[i % len(tenants)]
        kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
        if kind == "repeat" and firsts[tenant]:
            first = rng.choice(firsts[tenant][-20:])  # a recent one: often still running
            specs.append(Spec(i, tenant, kind, first.prompt, first.max_tokens, first.temperature,
                              first.seed, first.request_id))
            continue
        kind = "stream" if kind == "repeat" else kind
        spec = Spec(i, tenant, kind, rng.choice(prompts), rng.randint(min_tokens, max_tokens),
                    rng.choice((0.0, 0.7, 1.0)), i, f"req-{i:05d}")
        firsts[tenant].append(spec)
        specs.append(spec)
    return specs


def _retry_after(err: grpc.RpcError) -> float | None:
    for key, value in err.trailing_metadata() or ():
        if key == "retry-after-s":
            return float(value)
    return None


class Load:
    """Runs specs against the schedulers' endpoints with one `Client` per (tenant, endpoint);
    `done` counts finished requests (the fault schedule watches it)."""

    def __init__(self, endpoints: list[str], api_keys: dict[str, str]):
        self.clients = {t: [Client(e, k) for e in endpoints] for t, k in api_keys.items()}
        self.done = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        for clients in self.clients.values():
            for c in clients:
                c.close()

    def run_one(self, spec: Spec) -> dict:
        clients = self.clients[spec.tenant]
        out = {"index": spec.index, "tenant": spec.tenant, "kind": spec.kind, "code": "OK",
               "retried_codes": [], "attempts": 0, "jobs": {}, "usage": None,
               "finish_reason": None, "cancel": None, "usage_mismatch": False}
        started = time.monotonic()
        while True:
            client = clients[(spec.index + out["attempts"]) % len(clients)]
            out["attempts"] += 1
            seen: dict[str, int] = {}  # this attempt's tokens per job id
            try:
                self._attempt(client, spec, seen, out)
                break
            except grpc.RpcError as err:
                code = err.code()
                retry_after = _retry_after(err) if code in RETRIED else None
                short = code is grpc.StatusCode.UNAVAILABLE or (
                    retry_after is not None and retry_after <= SHORT_RETRY_AFTER_S)
                if not short or time.monotonic() - started > RETRY_FOR_S:
                    out["code"], out["details"] = code.name, (err.details() or "")[:200]
                    break
                out["retried_codes"].append(code.name)
                time.sleep(min(2.0, 0.25 * out["attempts"]))
            except Exception as err:  # a bug of this client: reported, the load goes on
                out["code"], out["details"] = "CLIENT_ERROR", f"{type(err).__name__}: {err}"
                break
            finally:
                for job_id, tokens in seen.items():  # a repeat may return a job seen before
                    out["jobs"][job_id] = max(out["jobs"].get(job_id, 0), tokens)
        out["latency_s"] = round(time.monotonic() - started, 3)
        with self._lock:
            self.done += 1
        return out

    @staticmethod
    def _attempt(client: Client, spec: Spec, seen: dict[str, int], out: dict) -> None:
        if spec.kind in ("complete", "repeat"):
            reply = client.complete(spec.prompt, timeout_s=CALL_TIMEOUT_S, **spec.fields())
            seen[reply.job_id] = len(reply.token_ids)
            last = reply
        else:
            last = None
            for chunk in client.generate(spec.prompt, timeout_s=CALL_TIMEOUT_S, **spec.fields()):
                seen[chunk.job_id] = seen.get(chunk.job_id, 0) + len(chunk.token_ids)
                if spec.kind == "cancel" and out["cancel"] is None and not chunk.finish_reason:
                    try:
                        client.cancel(chunk.job_id)
                        out["cancel"] = "OK"
                    except grpc.RpcError as err:
                        out["cancel"] = err.code().name
                last = chunk
        if last is None:
            return
        out["usage"] = [last.usage.prompt_tokens, last.usage.completion_tokens]
        out["finish_reason"] = last.finish_reason
        out["usage_mismatch"] = last.usage.completion_tokens != seen.get(last.job_id, 0)


# -- after the load ------------------------------------------------------------------------------
def outcomes(results: list[dict]) -> dict:
    """Final status codes per kind of request, the retries, and calls whose final usage did
    not equal the tokens they streamed."""
    by_kind: dict[str, Counter] = {}
    for r in results:
        by_kind.setdefault(r["kind"], Counter())[r["code"]] += 1
    failed = [{k: r.get(k) for k in ("index", "tenant", "kind", "code", "details", "attempts")}
              for r in results if r["code"] != "OK"]
    return {"requests": len(results), "ok": sum(r["code"] == "OK" for r in results),
            "failed": len(failed), "codes": dict(Counter(r["code"] for r in results)),
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "finish_reasons": dict(Counter(str(r["finish_reason"]) for r in results)),
            "retried_calls": dict(Counter(c for r in results for c in r["retried_codes"])),
            "requests_retried": sum(bool(r["retried_codes"]) for r in results),
            "cancel_calls": dict(Counter(r["cancel"] for r in results if r["cancel"])),
            "usage_not_equal_to_streamed": sum(r["usage_mismatch"] for r in results),
            "failed_requests": failed[:50]}


def received_by_job(results: list[dict]) -> dict[str, tuple[str, int]]:
    """job id -> (tenant, the most completion tokens any call received of it)."""
    jobs: dict[str, tuple[str, int]] = {}
    for r in results:
        for job_id, tokens in r["jobs"].items():
            jobs[job_id] = (r["tenant"], max(tokens, jobs.get(job_id, ("", 0))[1]))
    return jobs


async def ledger_view(url: str, prefix: str, tenants: list[str], job_ids: list[str],
                      days: list[str]) -> dict:
    """What the store holds after the load: usage per tenant over `days`, each job's record,
    each tenant's quota use per day, and the open jobs."""
    store = RedisStore(url, prefix=prefix, timeout_s=10.0)
    try:
        usage = {}
        for t in tenants:
            per_day = await store.usage("tenant", t, days[0], days[-1])
            usage[t] = {f: sum(d.get(f, 0) for _, d in per_day)
                        for f in ("jobs", "prompt_tokens", "completion_tokens", "charge_uusd")}
        every = {key.rsplit(":", 1)[1] async for key in store._redis.scan_iter(f"{prefix}:job:*")}
        records = {j: await store.get_job(j) for j in sorted(set(job_ids) | every)}
        quota = {t: {d: await store.quota_use(t, d) for d in days} for t in tenants}
        open_jobs = await store.open_jobs()
    finally:
        await store.close()
    return {"usage": usage, "records": records, "quota": quota, "open_jobs": open_jobs}


def settle(url: str, prefix: str, timeout_s: float) -> float:
    """Waits until no job is open, or `timeout_s` passed; returns the time waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if not asyncio.run(_open_jobs(url, prefix)):
            break
        time.sleep(1.0)
    return time.monotonic() - start


async def _open_jobs(url: str, prefix: str) -> list[dict]:
    store = RedisStore(url, prefix=prefix, timeout_s=10.0)
    try:
        return await store.open_jobs()
    finally:
        await store.close()


def reconcile(results: list[dict], view: dict, limits: dict[str, int],
              live_owners: set[str]) -> dict:
    """Per tenant: received against billed; every job billed other than delivered (with why);
    quota overspend; open jobs. `limits`: tenant -> tokens per day (0: none). `live_owners`:
    schedulers that were never killed (an orphan settle of their job is a wrong settle)."""
    jobs = received_by_job(results)
    tenants = sorted(view["usage"])
    per_tenant = {t: {"jobs_seen_by_clients": 0, "received_completion_tokens": 0,
                      "billed_completion_tokens": view["usage"][t]["completion_tokens"],
                      "billed_prompt_tokens": view["usage"][t]["prompt_tokens"],
                      "billed_jobs": view["usage"][t]["jobs"],
                      "billed_charge_uusd": view["usage"][t]["charge_uusd"]} for t in tenants}
    wrong = []
    for job_id, (tenant, received) in sorted(jobs.items()):
        row = per_tenant[tenant]
        row["jobs_seen_by_clients"] += 1
        row["received_completion_tokens"] += received
        rec = view["records"].get(job_id) or {}
        billed = rec.get("completion_tokens", 0) if rec.get("billed") else 0
        if billed != received or not rec.get("billed"):
            error = rec.get("error", "")
            wrong.append({"job_id": job_id, "tenant": tenant, "received": received,
                          "billed": billed, "state": rec.get("state"),
                          "billed_flag": bool(rec.get("billed")), "owner": rec.get("owner"),
                          "settled_as_orphan": ORPHAN_ERROR in error,
                          "owner_was_alive": rec.get("owner") in live_owners,
                          "error": error[:160]})
    unseen = [{"job_id": j, "tenant": r.get("tenant"), "state": r.get("state"),
               "prompt_tokens": r.get("prompt_tokens"), "completion_tokens":
               r.get("completion_tokens"), "request_id": r.get("request_id"),
               "owner": r.get("owner"), "error": (r.get("error") or "")[:160]}
              for j, r in sorted(view["records"].items())
              if r and r.get("billed") and j not in jobs]
    for row in per_tenant.values():
        row["billed_minus_received"] = (row["billed_completion_tokens"]
                                        - row["received_completion_tokens"])
        row["equal"] = row["billed_minus_received"] == 0
        row["billed_jobs_no_client_saw"] = row["billed_jobs"] - row["jobs_seen_by_clients"]
    quota = {}
    for t in tenants:
        days = view["quota"][t]
        used = max((d["used"] for d in days.values()), default=0)
        limit = limits.get(t, 0)
        quota[t] = {"tokens_per_day": limit or None, "used_per_day": {k: v["used"]
                                                                      for k, v in days.items()},
                    "reserved_left": sum(d["reserved"] for d in days.values()),
                    "overspend": max(0, used - limit) if limit else 0}
    under = [w for w in wrong if w["billed"] < w["received"]]
    over = [w for w in wrong if w["billed"] > w["received"]]
    return {
        "tenants": per_tenant,
        "jobs_billed_other_than_delivered": {
            "count": len(wrong), "under_billed": len(under), "over_billed": len(over),
            "tokens_under_billed": sum(w["received"] - w["billed"] for w in under),
            "tokens_over_billed": sum(w["billed"] - w["received"] for w in over),
            "orphan_settled_while_owner_alive": sum(w["settled_as_orphan"]
                                                    and w["owner_was_alive"] for w in wrong),
            "jobs": wrong[:100]},
        "billed_jobs_no_client_saw": unseen[:100],
        "quota": quota,
        "open_jobs_left": len(view["open_jobs"]),
        "open_jobs": [{**{k: j.get(k) for k in ("job_id", "tenant", "state", "owner")},
                       "seen_by_a_client": j["job_id"] in jobs}
                      for j in view["open_jobs"][:20]],
        "checks": {"delivered_equals_billed": all(r["equal"] for r in per_tenant.values()),
                   "no_job_billed_other_than_delivered": not wrong,
                   "no_open_jobs": not view["open_jobs"],
                   "no_quota_overspend": all(q["overspend"] == 0 for q in quota.values())},
    }
