"""`sparkgrid up` and `sparkgrid demo`: the whole stack on this machine, in the foreground.

`up` starts it (`sparkgrid/stack.py`), prints where everything is, and runs until Ctrl-C or
SIGTERM, then stops all it started. `demo` starts it, sends a few real requests with their text
streamed to the terminal (then a burst that both workers share), prints each request's figures
and a short cost report, and stops.

Knows: the terminal. Does not know: how the stack's parts work.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from scheduler.config import shown_url
from sparkgrid.home import home
from sparkgrid.options import int_at_least, number_in, port, port_or_off

DEMO_PROMPTS = (
    "def fibonacci(n):\n",
    "class Stack:\n    def __init__(self):\n",
    "import json\n\ndef load_config(path):\n",
)
BURST_PROMPTS = ("def mean(xs):\n", "def is_prime(n):\n", "import os\n\ndef walk(root):\n",
                 "def merge(a, b):\n", "class Queue:\n", "def parse(line):\n",
                 "def read_csv(path):\n", "def flatten(items):\n")


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
    p.add_argument("--redis-url", default=None, help="a Redis to use (default: a private "
                   "redis-server, append-only, in $SPARKGRID_HOME/redis)")
    p.add_argument("--metrics-port", type=port_or_off, default=9464,
                   help="the scheduler's Prometheus port (-1: off)")
    p.add_argument("--dashboard-port", type=port, default=8265, help="the Ray dashboard's port")
    p.add_argument("--price-per-hour", type=number_in(0, 1e6), default=0.10, help="the workers' price, USD "
                   "per hour (notional for a CPU; it gives the cost reports GPU costs)")


def _stack(args, **changes):
    from sparkgrid.stack import Stack, StackOptions

    options = dict(home=home(), workers=args.workers, grpc_port=args.grpc_port,
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
    _say("")


def run_demo(args) -> int:
    def demo(stack, info):
        _demo_requests(info)
        _demo_report(stack)
    return _run_stack(_stack(args, grpc_port=0, metrics_port=None), demo, "interrupted",
                      "demo finished; everything it started is stopped")


def _demo_requests(info: dict) -> None:
    from scheduler.client import Client

    with Client(info["endpoint"], info["api_key"]) as client:
        for i, prompt in enumerate(DEMO_PROMPTS, 1):
            _say(f"--- request {i}/{len(DEMO_PROMPTS)} (greedy, 96 tokens) " + "-" * 30)
            sys.stdout.write(prompt)
            start, last = time.perf_counter(), None
            for chunk in client.generate(prompt, max_tokens=96, temperature=0, timeout_s=300):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
            _say("")
            _say(_figures(client, last, time.perf_counter() - start))
        _say(f"--- a burst of {len(BURST_PROMPTS)} requests at once (T=0.8), shared by the workers")
        start = time.perf_counter()
        with ThreadPoolExecutor(len(BURST_PROMPTS)) as ex:
            done = list(ex.map(lambda p: client.complete(p, max_tokens=64, temperature=0.8,
                                                         timeout_s=300), BURST_PROMPTS))
        seconds = time.perf_counter() - start
        tokens = sum(c.usage.completion_tokens for c in done)
        workers = {}
        for c in done:
            for w in client.job(c.job_id).workers:
                workers[w] = workers.get(w, 0) + 1
        _say(f"    {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.0f} tok/s); "
             f"requests per worker: {dict(sorted(workers.items()))}")


def _figures(client, last, seconds: float) -> str:
    job = client.job(last.job_id)
    spec = job.spec
    tau = f"{1 + spec.accepted_tokens / spec.spec_steps:.2f}" if spec.spec_steps else "-"
    n = last.usage.completion_tokens
    return (f"    [{n} tokens in {seconds:.2f} s, {n / seconds:.0f} tok/s; finish {last.finish_reason}; "
            f"worker {', '.join(job.workers)}; accepted length {tau}; "
            f"draft tokens accepted {spec.accepted_tokens}/{spec.verified_tokens} verified]")


def _demo_report(stack) -> None:
    from scheduler.report_formats import to_table
    from scheduler.reports import build_reports

    stack.call(stack.scheduler._flush_worker_time())
    today = time.strftime("%Y-%m-%d", time.gmtime())
    reports = stack.call(build_reports(stack.scheduler.store, today, today, ("tenant", "worker")))
    _say("")
    _say("--- cost report (sparkgrid report --by tenant / --by worker) " + "-" * 18)
    for by in ("tenant", "worker"):
        _say(to_table(reports[by]))
        _say("")


COMMANDS = {  # name: (add options, run); the help is sparkgrid.cli's
    "up": (up_options, run_up),
    "demo": (up_options, run_demo),
}
