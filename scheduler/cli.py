"""The scheduler's subcommands of `sparkgrid`: `head`, `keys`, `generate`, `workers`.

`COMMANDS` holds their (add options, run) pairs for `sparkgrid.cli`. A user error raises
ValueError with a message that names the option; `sparkgrid.cli.main` prints it and exits 2.

Knows: options and output. Does not know: how the scheduler works inside.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time

import grpc

from scheduler.config import (
    KEEP_JOBS_S,
    KEEP_TEXT_S,
    SchedulerConfig,
    load_tokenizer_pins,
    shown_url,
)
from scheduler.errors import SchedulerError
from scheduler.router import POLICIES
from sparkgrid.home import home
from sparkgrid.options import (
    add_redis_options,
    int_at_least,
    number_in,
    port,
    port_or_off,
    redis_url,
)


# -- sparkgrid head ----------------------------------------------------------------------------
def head_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", default="auto",
                   help="the Ray cluster's GCS address (host:port) or 'auto'")
    add_redis_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1, this machine only; 0.0.0.0 "
                        "for all, with --tls-cert outside a private network)")
    p.add_argument("--grpc-port", type=port, default=50051,
                   help="port of the API (0: any free one)")
    p.add_argument("--metrics-port", type=port_or_off, default=9464,
                   help="Prometheus /metrics port (-1: off)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS only")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--routing", "--policy", dest="routing", default="fastest", choices=POLICIES,
                   help="how a request's worker is chosen (default fastest; `--policy` is the "
                        "old name)")
    p.add_argument("--prices", default=None, help="the price book (TOML); default: the one "
                   "shipped in scheduler/prices.toml")
    p.add_argument("--max-tokens-cap", type=int_at_least(1), default=2048,
                   help="largest max_tokens a request may ask")
    p.add_argument("--max-attempts", type=int_at_least(1), default=3,
                   help="workers one job may try (failover)")
    p.add_argument("--keep-text", type=duration, default=KEEP_TEXT_S, metavar="DURATION",
                   help="how long a finished job's text and token ids are kept, e.g. 24h, 90m, "
                        "7d (default 24h; 0: forever)")
    p.add_argument("--keep-jobs", type=duration, default=KEEP_JOBS_S, metavar="DURATION",
                   help="how long a finished job's record, events and request id are kept "
                        "(default 30d; 0: forever; at least --keep-text). Usage totals are "
                        "kept forever")
    p.add_argument("--lease", type=duration, default=15.0, metavar="DURATION",
                   help="time to live of this scheduler's lease in Redis (default 15s); the "
                        "jobs of a scheduler whose lease lapsed are settled by the others")
    p.add_argument("--grace", type=duration, default=10.0, metavar="DURATION",
                   help="on Ctrl-C or SIGTERM, how long running streams may go on before they "
                        "are cut (default 10s); for a rolling restart, longer than the longest "
                        "job")
    p.add_argument("--drain-delay", type=duration, default=0.0, metavar="DURATION",
                   help="on Ctrl-C or SIGTERM, how long to keep taking calls after the health "
                        "service says NOT_SERVING, so that a load balancer in front of several "
                        "schedulers turns away first (default 0s; 3s behind deploy/envoy)")
    p.add_argument("--trusted-workers", default="", metavar="NAME,...",
                   help="workers the platform runs itself: they audit the others' output (a "
                        "share of their jobs, re-scored off the client's path; a failed audit "
                        "quarantines the worker). Default: none, no audits")
    p.add_argument("--worker-link-port", type=int, default=None, metavar="PORT",
                   help="serve the worker link (workers outside the Ray cluster dial it with an "
                        "operator token) on this port of --host; default: no link")
    p.add_argument("--worker-link-cert", default=None, metavar="PEM",
                   help="the link's TLS certificate chain (with --worker-link-key)")
    p.add_argument("--worker-link-key", default=None, metavar="PEM")
    p.add_argument("--worker-link-plaintext", action="store_true",
                   help="serve the link without TLS (tokens in the clear: private networks only)")
    p.add_argument("--allow-unregistered", action="store_true",
                   help="also route to worker actors without an operator's registration (any "
                        "actor of the Ray namespace); only where every member of the cluster is "
                        "the platform's own")
    p.add_argument("--audit-rate", type=number_in(0, 1), default=0.02, metavar="SHARE",
                   help="share of a worker's jobs audited after its first --audit-first")
    p.add_argument("--audit-first", type=int_at_least(0), default=20, metavar="N",
                   help="a new worker's first N jobs are all audited (default 20)")
    p.add_argument("--figure-boards", type=int_at_least(1), default=1, metavar="N",
                   help="figures boards the workers push their figures to (default 1; about "
                        "one per 300 workers); the first scheduler of a cluster sets it")
    p.add_argument("--bill-journal", default=None, metavar="DIR",
                   help="where bills waiting for Redis are kept on disk, so that a crash during "
                        "an outage loses none (default: $SPARKGRID_HOME/bills)")
    p.add_argument("--tokenizer-pins", default=None, metavar="TOML",
                   help="serve only the models of this file's [tokenizers] table, each by "
                        "workers whose tokenizer.json has the SHA-256 given (default: a "
                        "model's first worker sets it)")


def run_head(args) -> int:
    from scheduler.head import Scheduler

    try:
        config = SchedulerConfig(
            ray_address=args.ray_address, redis_url=redis_url(args.redis_url),
            redis_prefix=args.redis_prefix, host=args.host, grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            tls_cert=args.tls_cert, tls_key=args.tls_key, policy=args.routing, prices=args.prices,
            max_tokens_cap=args.max_tokens_cap, max_attempts=args.max_attempts,
            tokenizer_pins=args.tokenizer_pins, keep_text_s=args.keep_text,
            keep_jobs_s=args.keep_jobs, lease_s=args.lease, drain_delay_s=args.drain_delay,
            figure_boards=args.figure_boards, audit_rate=args.audit_rate,
            audit_first_jobs=args.audit_first, require_registration=not args.allow_unregistered,
            worker_link_port=args.worker_link_port, worker_link_cert=args.worker_link_cert,
            worker_link_key=args.worker_link_key,
            worker_link_plaintext=args.worker_link_plaintext,
            trusted_workers=tuple(n for n in args.trusted_workers.split(",") if n.strip()),
            bill_journal_dir=args.bill_journal or str(home() / "bills"))
        load_tokenizer_pins(config.tokenizer_pins)  # a bad file is an option error, now
    except ValueError as err:  # "grpc_port: expected ..." -> "--grpc-port: expected ..."
        field, _, problem = str(err).partition(":")
        option = _OPTION_OF.get(field, field.replace("_", "-"))
        raise ValueError(f"--{option}:{problem}") from None
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not config.tls_cert and not _loopback(config.host):
        logging.getLogger("sparkgrid.head").warning(
            "serving plaintext on %s: API keys and text cross the network unencrypted; give "
            "--tls-cert/--tls-key unless this is a private network", config.host)
    return asyncio.run(_serve(Scheduler(config), args.grace))


_OPTION_OF = {"keep_text_s": "keep-text", "keep_jobs_s": "keep-jobs", "lease_s": "lease",
              "drain_delay_s": "drain-delay", "bill_journal_dir": "bill-journal",
              "figure_boards": "figure-boards", "audit_first_jobs": "audit-first"}
"""Settings whose option is not the field's name with dashes."""
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """An option type: seconds, given as a number with a unit s, m, h or d (`24h`, `30d`,
    `90m`), or a plain number of seconds; 0 is `forever` where the option says so."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 24h, 30d, 90m or 3600s (>= 0), got {text!r}")
    return value


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _serve(scheduler, grace_s: float = 10.0) -> int:
    try:
        port = await scheduler.start()
    except (SchedulerError, ConnectionError, OSError) as err:
        await scheduler.stop(grace_s=0)
        raise ValueError(str(err)) from None
    c = scheduler.config
    print(f"sparkgrid scheduler {scheduler.owner} serving sparkgrid.v1.Inference on "
          f"{c.host}:{port} ({'TLS' if c.tls_cert else 'plaintext'}), policy {c.policy}, "
          f"Redis {shown_url(c.redis_url)}, workers: {len(scheduler.pool.stats())}"
          + (f", metrics on :{c.metrics_port}/metrics" if c.metrics_port is not None else ""),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"stopping: letting running streams end (up to {grace_s:g} s)", flush=True)
    await scheduler.stop(grace_s=grace_s)
    return 0


# -- sparkgrid keys ----------------------------------------------------------------------------
def keys_options(p: argparse.ArgumentParser) -> None:
    redis = argparse.ArgumentParser(add_help=False)  # accepted after the action too
    add_redis_options(redis, "API keys")
    sub = p.add_subparsers(dest="action", metavar="action", required=True)
    create = sub.add_parser("create", parents=[redis],
                            help="a new API key for a tenant (shown once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--plan", default=None,
                        help="set the tenant's plan (a plan of the price book)")
    plan = sub.add_parser("plan", parents=[redis], help="set a tenant's plan")
    plan.add_argument("--tenant", required=True)
    plan.add_argument("--plan", required=True)
    for action in (create, plan):
        action.add_argument("--prices", default=None, help="price book the plan must be in "
                            "(default: the shipped one)")
    revoke = sub.add_parser("revoke", parents=[redis],
                            help="revoke a key by its id; it stops working at once")
    revoke.add_argument("key_id")
    listing = sub.add_parser("list", parents=[redis],
                             help="keys (ids, tenants, dates; never the keys)")
    listing.add_argument("--tenant", default=None)


def run_keys(args) -> int:
    return asyncio.run(_keys(args))


async def _keys(args) -> int:
    from scheduler.keys import check_tenant
    from scheduler.redis_store import RedisStore

    store = RedisStore(redis_url(args.redis_url), prefix=args.redis_prefix)
    try:
        if args.action in ("create", "plan"):
            check_tenant(args.tenant)
            if args.plan is not None:
                _check_plan(args.plan, args.prices)
                await store.set_tenant_plan(args.tenant, args.plan)
        if args.action == "plan":
            print(f"tenant {args.tenant}: plan {args.plan}")
        elif args.action == "create":
            key_id, api_key = await store.create_key(args.tenant)
            plan = await store.tenant_plan(args.tenant) or "(the price book's default)"
            print(f"key id:  {key_id}\ntenant:  {args.tenant}\nplan:    {plan}\n"
                  f"api key: {api_key}\n(the key is shown only now; it is stored as a hash)")
        elif args.action == "revoke":
            if not await store.revoke_key(args.key_id):
                raise ValueError(f"key_id: no active key {args.key_id!r}")
            print(f"revoked {args.key_id}")
        else:
            for key in await store.list_keys(args.tenant):
                state = "revoked" if key.get("revoked_at") else "active"
                print(f"{key['key_id']}  {key['tenant']:<24} {state}")
    except SchedulerError as err:
        raise ValueError(str(err)) from None
    finally:
        await store.close()
    return 0


def _check_plan(plan: str, prices: str | None) -> None:
    from scheduler.prices import DEFAULT_BOOK, PriceBook

    book = PriceBook.load(prices or DEFAULT_BOOK)
    if plan not in book.plans:
        raise ValueError(f"--plan: {plan!r} is not a plan of the price book {book.version} "
                         f"(plans: {', '.join(sorted(book.plans))})")


# -- sparkgrid generate / workers ---------------------------------------------------------------
def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default=None,
                   help="host:port of the scheduler (default: up.json's)")
    p.add_argument("--api-key", default=None, help="default: $SPARKGRID_API_KEY, else up.json's")
    p.add_argument("--tls-ca", default=None, help="PEM CA certificate: connect with TLS")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def generate_options(p: argparse.ArgumentParser) -> None:
    _client_options(p)
    p.add_argument("--max-tokens", type=int_at_least(0), default=0,
                   help="most tokens (0: the server's default)")
    p.add_argument("--temperature", type=number_in(0, 2), default=None,
                   help="0 is greedy (default 1)")
    p.add_argument("--top-p", type=number_in(0, 1, open_low=True), default=None,
                   help="nucleus mass in (0, 1] (default 1: off)")
    p.add_argument("--top-k", type=int_at_least(0), default=0, help="0: off")
    p.add_argument("--seed", type=int_at_least(0), default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--request-id", default="", help="idempotency key")
    p.add_argument("--model", default="")
    p.add_argument("--timeout", type=number_in(0, 86400, open_low=True), default=300.0,
                   help="deadline in seconds (default 300)")
    p.add_argument("prompt")


def run_generate(args) -> int:
    from scheduler.client import Client, connection_from_home

    endpoint, api_key = connection_from_home(args.endpoint, args.api_key)
    fields = {k: v for k, v in dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop, request_id=args.request_id,
        model=args.model).items() if v is not None}
    with Client(endpoint, api_key, args.tls_ca) as client:
        try:
            last = None
            for chunk in client.generate(args.prompt, timeout_s=args.timeout, **fields):
                if args.json:
                    print(json.dumps({"job_id": chunk.job_id, "text": chunk.text,
                                      "token_ids": list(chunk.token_ids)}), flush=True)
                else:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                last = chunk
        except grpc.RpcError as err:
            raise ValueError(f"{err.code().name}: {err.details()}") from None
    usage = last.usage
    summary = {"job_id": last.job_id, "finish_reason": last.finish_reason,
               "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"\n[job {last.job_id}: {last.finish_reason}, {usage.prompt_tokens} prompt + "
              f"{usage.completion_tokens} completion tokens]", file=sys.stderr)
    return 0


def workers_options(p: argparse.ArgumentParser) -> None:
    _client_options(p)
    redis = argparse.ArgumentParser(add_help=False)
    add_redis_options(redis, "the quarantines")
    sub = p.add_subparsers(dest="action", metavar="action")
    release = sub.add_parser("release", parents=[redis],
                             help="lift a worker's quarantine (its withheld payout stays so)")
    release.add_argument("name")
    sub.add_parser("quarantined", parents=[redis],
                   help="quarantined workers, why and since when, and the withheld periods")


async def _quarantines(args) -> int:
    from scheduler.redis_store import RedisStore

    store = RedisStore(redis_url(args.redis_url), prefix=args.redis_prefix)
    try:
        if args.action == "release":
            period = await store.release_worker(args.name, time.time())
            if period is None:
                raise ValueError(f"name: worker {args.name!r} is not quarantined")
            print(f"released {args.name} (quarantined since {utc_time(period['since'])}: "
                  f"{period['reason']}); its payout from then to now stays withheld")
            return 0
        rows = [{"worker": p["worker"], "since": utc_time(p["since"]),
                 "until": utc_time(p["until"]) if p["until"] else "(now)", "reason": p["reason"]}
                for p in await store.withheld_periods()]
        print(json.dumps(rows, indent=2) if args.json else
              _table(rows) if rows else "no worker is or was quarantined")
        return 0
    finally:
        await store.close()


def utc_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def run_workers(args) -> int:
    from scheduler.client import Client, connection_from_home

    if args.action is not None:
        return asyncio.run(_quarantines(args))

    endpoint, api_key = connection_from_home(args.endpoint, args.api_key)
    with Client(endpoint, api_key, args.tls_ca) as client:
        try:
            workers = client.workers()
        except grpc.RpcError as err:
            raise ValueError(f"{err.code().name}: {err.details()}") from None
    rows = [{"name": w.name, "state": w.state, "kind": w.kind or "-",
             "operator": w.operator or "-", "model": w.model, "gpu": w.gpu_type,
             "node": w.node_ip, "waiting": w.num_waiting, "running": w.num_running,
             "queued_tokens": w.remaining_tokens, "tok/s": round(w.tokens_per_second, 1),
             "seen_tok/s": round(w.observed_tokens_per_second, 1),
             "accept_len": round(w.mean_accept_length, 2), "usd/h": w.price_per_hour,
             **({"why": w.quarantine_reason} if w.quarantine_reason else {})}
            for w in workers]
    if any("why" in r for r in rows):
        rows = [{**r, "why": r.get("why", "")} for r in rows]  # one column for all rows
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no live workers (start one with `sparkgrid worker`)")
    else:
        print(_table(rows))
    return 0


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


COMMANDS = {  # name: (add options, run); the help is sparkgrid.cli's
    "head": (head_options, run_head),
    "keys": (keys_options, run_keys),
    "generate": (generate_options, run_generate),
    "workers": (workers_options, run_workers),
}
