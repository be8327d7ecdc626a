"""What the scheduler's end-to-end tests share (`test_scheduler_api.py`,
`test_scheduler_faults.py`): the prompt, waiting for a condition, the UTC days of the run, and
what the workers say they are running. Their fixtures (two workers, the scheduler, API keys, a
client) are in `conftest.py`.

Knows: time and the workers' Ray actors. Does not know: what any test checks.
"""

from __future__ import annotations

import time

PROMPT = "def parse_args(argv):\n"
# Greedy, the shipped pair continues PROMPT for 400 tokens with no end-of-sequence token, so
# the tests that act on a running job use it with max_tokens=400: the job surely still runs.
_FIRST_DAY = time.strftime("%Y-%m-%d", time.gmtime())


def days_so_far() -> tuple[str, str]:
    """The UTC days these tests have run on so far (a run may cross midnight)."""
    return _FIRST_DAY, time.strftime("%Y-%m-%d", time.gmtime())


def wait_for(cond, timeout_s: float, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def running_on_workers(head=None) -> int:
    """Requests running or waiting on every live worker, as the workers report them."""
    import ray

    from worker import actor

    live = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == actor.NAMESPACE]
    return sum(s.get("num_running", 0) + s.get("num_waiting", 0)
               for s in (ray.get(actor.find_worker(n).stats.remote()) for n in live))


def linked_scheduler(redis_url: str, prefix: str, tls_dir):
    """A scheduler that requires registrations, with a worker link over TLS by a CA made in
    `tls_dir`; (its thread, the CA's certificate path)."""
    from scheduler.config import SchedulerConfig
    from scheduler.head import SchedulerThread
    from sparkgrid.tls import make_ca, make_server_cert

    ca = make_ca(tls_dir)
    cert, key = make_server_cert(tls_dir, ["127.0.0.1", "localhost"], ca)
    head = SchedulerThread(SchedulerConfig(
        redis_url=redis_url, redis_prefix=prefix, grpc_port=0, worker_link_port=0,
        worker_link_cert=str(cert), worker_link_key=str(key), require_registration=True,
        discovery_interval_s=0.5, stats_interval_s=0.25))
    return head, ca[0]
