"""Fixtures for engine integration tests: real weights on disk, loaded in float64 so that
greedy comparisons against `transformers` are exact rather than tie-prone."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from structured import structured_draft, structured_target, word_tokenizer  # noqa: E402

from worker.engine.drafter import DSparkDraft  # noqa: E402
from worker.engine.model_runner import load_target  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def structured_pairs(tmp_path_factory):
    """(family, head_type) -> (target model, draft model, tokenizer), float64 on CPU."""
    root = tmp_path_factory.mktemp("structured")
    cache = {}

    def get(family: str, head_type: str, *, rank: int = 32, confidence: bool = True,
            bend: float = 0.6, sharpness: float = 4.0):
        key = (family, head_type, rank, confidence, bend, sharpness)
        if key not in cache:
            tdir = root / f"{family}-{bend}-{sharpness}"
            if not tdir.exists():
                structured_target(tdir, family, bend=bend, sharpness=sharpness)
            target = load_target(str(tdir), device=CPU, dtype=torch.float64)
            ddir = root / f"draft-{family}-{head_type}-{rank}-{confidence}-{bend}-{sharpness}"
            structured_draft(ddir, target, head_type=head_type, rank=rank,
                             confidence=confidence)
            draft = DSparkDraft.from_pretrained(ddir, target.config, device=CPU,
                                                dtype=torch.float64)
            cache[key] = (target, draft, word_tokenizer(root / "tok"), ddir)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def cluster(request):
    """A local Ray cluster (token authentication on) joined by this process, for one module;
    with the dashboard when the module sets `RAY_DASHBOARD = True`."""
    import ray

    from worker import actor

    options = dict(num_cpus=8, namespace=actor.NAMESPACE, logging_level="ERROR",
                   include_dashboard=getattr(request.module, "RAY_DASHBOARD", False))
    try:
        ctx = ray.init(**options)
    except RuntimeError as err:  # a daemon that failed to start (seen once under load): again
        warnings.warn(f"ray.init failed, retrying once: {err}", stacklevel=2)
        ray.shutdown()
        ctx = ray.init(**options)
    yield ctx
    ray.shutdown()


@pytest.fixture(scope="module")
def make_worker(cluster, served_pair, sps_cache_dir):
    """Starts a worker through `launch` (what `sparkgrid worker` runs); returns (its handle,
    its config, what the launcher printed). Every worker started is killed at the module's end."""
    import io

    import ray

    from worker import actor
    from worker.launcher import LaunchOptions, launch
    from worker.worker_config import WorkerConfig

    target, draft = served_pair
    started = []

    def make(name: str, operator_token: str | None = None, **changes):
        config = WorkerConfig(name=name, target=target, draft=draft, gpu_type="cpu",
                              sps_cache_dir=sps_cache_dir, max_batch_tokens=64, **changes)
        out = io.StringIO()
        assert launch(LaunchOptions(ray.get_runtime_context().gcs_address, config,
                                    operator_token=operator_token), out=out) == 0
        started.append(name)
        return actor.find_worker(name), config, out.getvalue()
    yield make
    for name in started:
        if (handle := actor.find_worker(name)) is not None:
            actor.kill(handle)



# -- the scheduler end to end (test_scheduler_*.py) ---------------------------------------------
PRICE_BOOK = """
version = "test-1"
default_plan = "standard"
[plans.standard]
[plans.standard.prices."*"]
prompt_per_million = "1.00"
completion_per_million = "3.00"
[plans.tiny]
tokens_per_day = 300
[plans.tiny.prices."*"]
prompt_per_million = "1.00"
completion_per_million = "3.00"
"""


@pytest.fixture(scope="module")
def workers(make_worker):
    """Two workers; `w-2` is emulated 2x slower, so jobs last long enough to act on."""
    return {"w-1": make_worker("w-1")[0], "w-2": make_worker("w-2", emulate_slowdown=2.0)[0]}


@pytest.fixture(scope="module")
def head(cluster, workers, persistent_redis, tmp_path_factory):
    """The scheduler on its own event-loop thread in this process, on the module's workers and
    a private append-only Redis (so that an outage can be staged), with PRICE_BOOK's prices."""
    from scheduler_common import wait_for

    from scheduler.config import SchedulerConfig
    from scheduler.head import SchedulerThread

    prices = tmp_path_factory.mktemp("prices") / "prices.toml"
    prices.write_text(PRICE_BOOK)
    config = SchedulerConfig(redis_url=persistent_redis.url, redis_prefix="sched-test",
                             grpc_port=0, max_tokens_cap=512, discovery_interval_s=0.5,
                             stats_interval_s=0.25, ledger_retry_s=0.2, prices=str(prices))
    running = SchedulerThread(config)
    wait_for(lambda: len(running.scheduler.pool.stats()) >= 2, 30, "both workers adopted")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def store_call(head):
    """Runs a coroutine of a RedisStore of the head's Redis, on the head's loop."""
    from scheduler.redis_store import RedisStore

    store = RedisStore(head.scheduler.config.redis_url, prefix=head.scheduler.config.redis_prefix)

    def call(method: str, *args):
        return head.call(getattr(store, method)(*args))
    yield call
    head.call(store.close())


@pytest.fixture(scope="module")
def tenant_keys(store_call):
    return {t: store_call("create_key", t) for t in ("acme", "globex")}


@pytest.fixture(scope="module")
def client(head, tenant_keys):
    """A client of the tenant `acme`."""
    from scheduler.client import Client

    with Client(head.endpoint, tenant_keys["acme"][1]) as c:
        yield c
