"""`sparkgrid up` and `sparkgrid demo`: the whole stack on this machine, in the foreground.

`up` starts it (`sparkgrid/stack.py`), prints where everything is, and runs until Ctrl-C or
SIGTERM, then stops all it started. `demo` starts it, says what the shipped model is, sends a
few real requests with their text streamed to the terminal and their figures, then a burst of
requests at once, with how many each worker got and why (the router's own predictions), a
short cost report, and stops. Every sentence it prints is built from what happened.

Knows: the terminal. Does not know: how the stack's parts work.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from scheduler.config import shown_url
from sparkgrid.home import home
from sparkgrid.options import int_at_least, number_in, port, port_or_off

GREEDY = dict(temperature=0.0, max_tokens=64, stop=["\n\n"])
"""Greedy, up to the first blank line: the shipped model's greedy text turns into repetition
within a few lines, so a greedy request ends where its function or block does."""
SAMPLED = dict(temperature=0.7, max_tokens=64, seed=1)
DEMO_REQUESTS = (  # (prompt, settings): prompts where the shipped model writes its best
    ('    @property\n    def name(self):\n        """Return the name of the file."""', GREEDY),
    ("try:\n    import _thread\nexcept ImportError:", GREEDY),
    ("class Stack:\n    def __init__(self):", SAMPLED),
)
BURST = dict(temperature=0.8, max_tokens=64)
BURST_PROMPTS = ("def mean(xs):", "def is_prime(n):", "import os\n\ndef walk(root):",
                 "def merge(a, b):", "class Queue:", "def parse(line):",
                 "def read_csv(path):", "def flatten(items):") * 3
"""24 requests at once: enough that, on a CPU, batching more of them on one worker stops paying
and the router sends some to another (see `_routing_lines`)."""


class _Stop(BaseException):
    """Ctrl-C or SIGTERM: stop what was started."""


def _on_signal(signum, frame):
    raise _Stop()


def _catch_signals() -> None:
    """Ctrl-C and SIGTERM raise _Stop. Called again once Ray is up: `ray.init` installs a
    SIGTERM handler of its own that would exit without stopping what we started."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def up_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int_at_least(1), default=2,
                   help="worker actors on the shipped pair (default 2, at most 16)")
    p.add_argument("--grpc-port", type=port, default=50051, help="the API's port (0: any free one)")
    p.add_argument("--linked-workers", type=int_at_least(0), default=None, metavar="N",
                   help="workers that serve through the worker link, each with its own process "
                        "and Ray, under the operator `guest` (default: 0 for up, 1 for demo)")
    p.add_argument("--worker-link-port", type=port, default=50060,
                   help="the worker link's port, TLS by a local CA (0: any free one)")
    p.add_argument("--redis-url", default=None, help="a Redis to use (default: a private "
                   "redis-server, append-only, in $SPARKGRID_HOME/redis)")
    p.add_argument("--metrics-port", type=port_or_off, default=9464,
                   help="the scheduler's Prometheus port (-1: off)")
    p.add_argument("--dashboard-port", type=port, default=8265, help="the Ray dashboard's port")
    p.add_argument("--price-per-hour", type=number_in(0, 1e6), default=0.10,
                   help="the workers' price, USD per hour (notional for a CPU; it gives the cost "
                        "reports GPU costs)")


def _stack(args, **changes):
    from sparkgrid.stack import Stack, StackOptions

    options = dict(home=home(), workers=args.workers, grpc_port=args.grpc_port,
                   worker_link_port=args.worker_link_port,
                   linked_workers=args.linked_workers or 0,
                   redis_url=args.redis_url,
                   metrics_port=args.metrics_port,
                   dashboard_port=args.dashboard_port, price_per_hour=args.price_per_hour)
    options.update(changes)
    return Stack(StackOptions(**options))


def _say(*parts) -> None:
    print(*parts, flush=True)


def _run_stack(stack, body, on_stop: str, done: str) -> int:
    """Start the stack, run `body(stack, info)`, and stop all of it, whatever happens."""
    from sparkgrid.stack import StackError

    _catch_signals()
    try:
        info = stack.start(log=_say)
        _catch_signals()
        _print_info(stack, info)
        body(stack, info)
    except StackError as err:
        raise ValueError(str(err)) from None
    except _Stop:
        _say(on_stop)
    finally:
        stack.stop(log=_say)
    _say(done)
    return 0


def run_up(args) -> int:
    def serve(stack, info):
        _say("running; Ctrl-C (or SIGTERM) stops everything started here")
        while True:
            time.sleep(3600)
    return _run_stack(_stack(args), serve, "stopping", "stopped")


def _print_info(stack, info: dict) -> None:
    _say("")
    _say(f"  endpoint:   {info['endpoint']}")
    _say(f"  api key:    {info['api_key']}   (tenant {info['tenant']})")
    _say(f"  redis:      {shown_url(info['redis_url'])}")
    _say(f"  dashboard:  {info['dashboard_url']}")
    if info.get("metrics_url"):
        _say(f"  metrics:    {info['metrics_url']}")
    _say(f"  written to: {stack.home / 'up.json'}")
    _say(f"  a worker more, from another shell of this user (Ray's token in ~/.ray/auth_token): "
         f"sparkgrid worker --ray-address {info['ray_address']} --target DIR --draft DIR")
    _say("")


def run_demo(args) -> int:
    def demo(stack, info):
        _say(_model_line())
        _demo_requests(stack, info)
        _demo_report(stack, args.price_per_hour)
    linked = 1 if args.linked_workers is None else args.linked_workers
    return _run_stack(_stack(args, grpc_port=0, worker_link_port=0, metrics_port=None,
                             linked_workers=linked), demo,
                      "interrupted", "demo finished; everything it started is stopped")


def _model_line() -> str:
    """What the shipped pair is, from its build record (`pair.json`)."""
    from worker.models import PAIR_DIR

    try:
        source = json.loads((PAIR_DIR / "pair.json").read_text())["source"]
        target, draft = source["target"], source["dspark"]
        size = (f"a Qwen3 of {target['num_params'] / 1e6:.1f}M parameters trained on "
                f"{target['tokens'] / 1e6:.1f}M tokens of")
        drafter = f"a DSpark drafter of {draft['num_params'] / 1e6:.1f}M parameters"
    except (OSError, ValueError, KeyError, TypeError):
        size, drafter = "a small Qwen3 trained on", "its DSpark drafter"
    return (f"--- the model: {size} the Python standard library's source, with {drafter}. Its "
            "code looks like Python but rarely means anything, and its greedy text repeats "
            "itself within a few lines, so the greedy requests below stop at the first blank line.")


def _settings(fields: dict) -> str:
    tokens = f"up to {fields['max_tokens']} tokens"
    if fields["temperature"] == 0:
        return f"greedy, {tokens}, stops at a blank line" if fields.get("stop") == ["\n\n"] \
            else f"greedy, {tokens}"
    return f"sampled at T={fields['temperature']:g}, seed {fields['seed']}, {tokens}"


def _demo_requests(stack, info: dict) -> None:
    from scheduler.client import Client

    with Client(info["endpoint"], info["api_key"]) as client:
        _say("--- the workers: " + "; ".join(
            f"{w.name} ({w.kind or 'unregistered'}, operator {w.operator or '-'})"
            for w in client.workers()))
        for i, (prompt, fields) in enumerate(DEMO_REQUESTS, 1):
            _say(f"--- request {i}/{len(DEMO_REQUESTS)} ({_settings(fields)}) " + "-" * 20)
            sys.stdout.write(prompt)
            start, last = time.perf_counter(), None
            for chunk in client.generate(prompt, timeout_s=300, **fields):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
            _say("")
            _say(_figures(client, last, time.perf_counter() - start))
        _demo_burst(stack, client)


def _demo_burst(stack, client) -> None:
    n, budget = len(BURST_PROMPTS), BURST["max_tokens"]
    _say(f"--- a burst of {n} requests at once (T={BURST['temperature']:g}, {budget} tokens "
         "each) " + "-" * 20)
    pool, asked = stack.scheduler.pool, time.monotonic()
    before = stack.call(_snapshots(pool))
    deadline = asked + 10
    # The router's figures must be read after the requests above ended (a busy machine can
    # make a read late): else they would show the workers as before those requests.
    while (any(s.queued_requests for s in before) or not pool.read_since(asked)) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
        before = stack.call(_snapshots(pool))
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as ex:
        done = list(ex.map(lambda p: client.complete(p, timeout_s=300, **BURST), BURST_PROMPTS))
    seconds = time.perf_counter() - start
    tokens = sum(c.usage.completion_tokens for c in done)
    got, moved = {s.name: 0 for s in before}, 0
    for c in done:
        workers = client.job(c.job_id).workers
        moved += len(workers) > 1
        for w in workers:
            got[w] = got.get(w, 0) + 1
    _say(f"    {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.0f} tok/s); "
         f"requests per worker: {dict(sorted(got.items()))}")
    if moved:
        _say(f"    {moved} of them moved to another worker mid-way (a worker failed), so they "
             "count for both")
    else:
        for line in _routing_lines(stack.scheduler.dispatcher.router.policy, before, got, budget):
            _say(f"    {line}")


async def _snapshots(pool) -> list:
    return sorted(pool.snapshots(), key=lambda s: s.name)


def _replay(before: list, n: int, budget: int) -> list[str]:
    """The workers the router's rule picks for `n` requests of `budget` tokens arriving
    together, in turn, on the figures of `before` (what each worker last reported)."""
    from dataclasses import replace

    from scheduler.router import Router

    router, workers, picks = Router("fastest"), {s.name: s for s in before}, []
    for _ in range(n):
        w = router.choose(list(workers.values()), before[0].model, budget)
        picks.append(w.name)
        workers[w.name] = replace(w, pending_requests=w.pending_requests + 1,
                                  pending_tokens=w.pending_tokens + budget)
    return picks


def _routing_lines(policy: str, before: list, got: dict[str, int], budget: int) -> list[str]:
    """Why the burst went where it did: the router's rule, what it predicted for each worker
    just before the burst, and whether those figures alone give the split that happened."""
    from scheduler.router import throughput

    n = sum(got.values())
    if len(before) == 1:
        return [f"{before[0].name} is the only worker, so it served all {n}."]
    if policy != "fastest" or {s.name for s in before} != set(got):
        return [f"routing policy {policy}."]
    snapshot = {s.name: s for s in before}
    alone = " and ".join(
        f"{throughput(s, 1):.0f} tok/s on {s.name} (accepted length "
        + (f"{s.mean_accept_length:.2f}, measured)" if s.mean_accept_length else
           "not measured yet, so taken as 1: no gain from speculation)") for s in before)
    lines = ["routing (policy fastest): each request goes to the worker predicted to finish it "
             "first, counting the requests it already holds. Just before the burst a lone "
             f"request was predicted at {alone}."]
    picks = _replay(before, n, budget)
    replayed = {name: picks.count(name) for name in sorted(got)}
    if replayed != got:
        return lines + [f"Those figures alone give {replayed}; the split differs because the "
                        "workers reported new figures during the burst."]
    rates = {name: throughput(snapshot[name], count) / count
             for name, count in got.items() if count}
    if len(rates) == 1:
        (busy, rate), = rates.items()
        lone = max((s for s in before if s.name != busy), key=lambda s: throughput(s, 1))
        return lines + [f"Those figures give exactly this split: with all {n} batched, {busy} was "
                        f"predicted at {rate:.0f} tok/s per request, still more than a lone "
                        f"request's {throughput(lone, 1):.0f} tok/s on {lone.name}."]
    shares = ", ".join(f"{name} with {got[name]} at {rate:.0f} tok/s per request"
                       for name, rate in sorted(rates.items()))
    return lines + ["Those figures give exactly this split, taking the requests one at a time; "
                    f"with it the router predicted {shares}."]


def _figures(client, last, seconds: float) -> str:
    job = client.job(last.job_id)
    spec = job.spec
    tau = f"{1 + spec.accepted_tokens / spec.spec_steps:.2f}" if spec.spec_steps else "-"
    n = last.usage.completion_tokens
    return (f"    [{n} tokens in {seconds:.2f} s, {n / seconds:.0f} tok/s; "
            f"finish {last.finish_reason}; "
            f"worker {', '.join(job.workers)}; accepted length {tau}; "
            f"draft tokens accepted {spec.accepted_tokens}/{spec.verified_tokens} verified]")


def _demo_report(stack, price_per_hour: float) -> None:
    from scheduler.report_formats import to_table
    from scheduler.reports import build_reports

    stack.call(stack.scheduler._flush_worker_time())
    today = time.strftime("%Y-%m-%d", time.gmtime())
    reports = stack.call(build_reports(stack.scheduler.store, today, today, ("tenant", "worker")))
    _say("")
    _say("--- cost report (sparkgrid report --by tenant / --by worker) " + "-" * 18)
    price = f"{price_per_hour:.2f}" if round(price_per_hour, 2) == price_per_hour else \
        f"{price_per_hour:g}"
    _say(f"    (GPU cost: each worker's time online, as the scheduler saw it, at the notional "
         f"${price}/h it was started with; charges: the tenant's plan prices per token)")
    for by in ("tenant", "worker"):
        _say(to_table(reports[by]))
        _say("")


COMMANDS = {  # name: (add options, run); the help is sparkgrid.cli's
    "up": (up_options, run_up),
    "demo": (up_options, run_demo),
}
