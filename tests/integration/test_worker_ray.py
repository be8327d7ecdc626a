"""Workers on a real local Ray cluster, started through the launcher's own code path:
streaming, cancel, drain, death, the dashboard's metrics and Ray's state CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray")
import ray.util.state  # noqa: E402
from procs import Lines  # noqa: E402

from sparkgrid.contract import Chunk  # noqa: E402
from worker import actor  # noqa: E402
from worker.engine.config import SamplingParams  # noqa: E402
from worker.engine.profiler import EngineCosts  # noqa: E402
from worker.launcher import LaunchError  # noqa: E402
from worker.serving import WorkerDraining, build_engine  # noqa: E402

pytestmark = pytest.mark.integration
RAY_DASHBOARD = True  # the metrics test reads the dashboard's metrics endpoint


def _chunk(ref) -> Chunk:
    """One streamed item of `generate`, read as the scheduler reads it: through the contract."""
    return Chunk.from_dict(ray.get(ref))


@pytest.fixture(scope="module")
def worker_a(make_worker):
    return make_worker("w-a")


@pytest.fixture(scope="module")
def worker_b(make_worker):
    """The second worker; its steps are 3x slower, as on a slower device."""
    return make_worker("w-b", emulate_slowdown=3.0)


@pytest.fixture(scope="module")
def slow_worker(make_worker):
    """Steps 10x slower, so that a job is surely still running when the test acts on it."""
    return make_worker("w-slow", emulate_slowdown=10.0)


def _stream(handle, job_id, prompt, **params):
    return [_chunk(ref) for ref in handle.generate.remote(job_id, prompt, params)]


def _wait(cond, timeout):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return value


def test_launcher_starts_a_named_detached_worker_pinned_to_this_node(worker_a):
    handle, config, printed = worker_a
    stats = ray.get(handle.stats.remote())
    assert stats["state"] == "ready" and stats["name"] == "w-a"
    assert stats["node_id"] == ray.get_runtime_context().get_node_id()
    assert stats["sps"] and stats["sps"]["batch_tokens"][0] == 1
    assert "worker w-a ready" in printed and stats["node_ip"] in printed and "SPS(B)" in printed
    info = ray.util.state.get_actor(handle._actor_id.hex(),
                                    address=ray.get_runtime_context().gcs_address)
    assert info.name == "w-a" and info.ray_namespace == actor.NAMESPACE and info.state == "ALIVE"


def test_streaming_matches_the_engines_direct_output_for_the_same_seed(worker_a):
    handle, config, _ = worker_a
    engine = build_engine(config)
    # the worker's own cost tables (which rows draft follows them, and the cache it read them
    # from is measured again where a spot check finds a table slowed)
    engine.costs = EngineCosts.from_json(ray.get(handle.costs.remote()))
    for i, (prompt, temperature) in enumerate((("def add(a, b):\n", 0.0), ("import os\n", 0.9))):
        chunks = _stream(handle, f"same-seed-{i}", prompt, temperature=temperature, max_tokens=24,
                         seed=11)
        direct = engine.generate([prompt], SamplingParams(temperature=temperature, max_tokens=24,
                                                          seed=11))[0]
        assert [t for c in chunks for t in c.token_ids] == direct["token_ids"]
        assert "".join(c.text for c in chunks) == direct["text"]
        assert chunks[-1].finish_reason == direct["finish_reason"]
        assert chunks[-1].usage.completion_tokens == len(direct["token_ids"])
        assert len(chunks) > 1  # streamed in increments, not one final blob


def test_bad_sampling_params_are_refused_naming_the_field(worker_a):
    handle = worker_a[0]
    with pytest.raises(ValueError, match="temperature"):
        _stream(handle, "bad-1", "x", temperature=-1)
    with pytest.raises(ValueError, match="colour"):
        _stream(handle, "bad-2", "x", colour="red")


def test_cancel_frees_the_slot(slow_worker):
    handle = slow_worker[0]
    gen = handle.generate.remote("long", "x = 1\n", {"max_tokens": 500, "ignore_eos": True})
    first = _chunk(next(gen))
    assert first.job_id == "long"
    assert ray.get(handle.stats.remote())["num_running"] == 1
    assert ray.get(handle.cancel.remote("long")) is True
    rest = [_chunk(ref) for ref in gen]
    assert rest[-1].finish_reason == "abort"
    stats = ray.get(handle.stats.remote())
    assert stats["num_running"] == 0 and stats["cache_used_fraction"] == 0
    # A caller that goes away (the generator cancelled) frees the slot too.
    gen = handle.generate.remote("gone", "x = 2\n", {"max_tokens": 500, "ignore_eos": True})
    ray.get(next(gen))
    ray.cancel(gen)
    _wait(lambda: ray.get(handle.stats.remote())["num_running"] == 0, 30)


def test_a_job_whose_lease_lapses_is_aborted_and_a_renewed_one_runs_on(slow_worker):
    """A caller that dies cannot cancel; Ray would run its job on to max_tokens. On a lease,
    the job ends (reason `abort`) once nobody renews it."""
    handle = slow_worker[0]
    params = {"max_tokens": 500, "ignore_eos": True}
    # `kept` starts with a lease long enough for a busy machine to reach the first renewal;
    # then `orphan` holds its 1 s lease, and only `kept`'s is renewed, for 5 s each time (a
    # renewal slowed past a 1 s lease on a loaded machine had let `kept` lapse too)
    orphan = handle.generate.remote("orphan", "x = 1\n", params, None, 1.0)
    kept = handle.generate.remote("kept", "x = 2\n", params, None, 30.0)
    ray.get(next(kept))
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # renew only `kept`, as a live scheduler would
        assert ray.get(handle.renew.remote(["kept", "never-seen"], 5.0)) == ["never-seen"]
        time.sleep(0.3)
    orphan_chunks = [_chunk(ref) for ref in orphan]
    assert orphan_chunks[-1].finish_reason == "abort"
    assert sum(len(c.token_ids) for c in orphan_chunks) < 499  # stopped, not run to the end
    assert ray.get(handle.stats.remote())["num_running"] == 1  # `kept` still runs
    assert ray.get(handle.cancel.remote("kept")) is True
    assert [_chunk(ref) for ref in kept][-1].finish_reason == "abort"
    assert ray.get(handle.renew.remote(["kept"], 1.0)) == ["kept"]  # no lease once it ended
    with pytest.raises(ValueError, match="lease_s"):
        ray.get(handle.renew.remote(["kept"], 0))


def test_two_workers_report_their_own_speeds(worker_a, worker_b):
    for handle in (worker_a[0], worker_b[0]):
        _stream(handle, "speed", "def h():\n", max_tokens=32, ignore_eos=True, temperature=0)
    a, b = (ray.get(w[0].stats.remote()) for w in (worker_a, worker_b))
    assert a["name"] != b["name"] and b["emulate_slowdown"] == 3.0
    assert a["tokens_per_s"] > 0 and b["tokens_per_s"] > 0


def test_drain_finishes_running_work_and_refuses_new(worker_b):
    handle = worker_b[0]
    gen = handle.generate.remote("running", "def f():\n", {"max_tokens": 40, "ignore_eos": True})
    ray.get(next(gen))
    drained = handle.drain.remote(60)
    chunks = [_chunk(ref) for ref in gen]
    assert chunks[-1].finish_reason == "length"
    figures = ray.get(drained)
    assert figures["state"] == "draining" and figures["num_running"] == 0
    with pytest.raises(WorkerDraining):
        _stream(handle, "late", "x", max_tokens=4)


def test_a_taken_name_is_refused_with_a_clear_message(worker_a, make_worker):
    with pytest.raises(LaunchError, match="w-a.*already running"):
        make_worker("w-a")


def test_foreground_launcher_drains_and_removes_its_worker_on_ctrl_c(cluster, served_pair,
                                                                     sparkgrid_home):
    """The real command in its own process, joining this cluster by address."""
    cmd = [str(Path(sys.executable).with_name("sparkgrid")), "worker",
           "--ray-address", cluster.address_info["gcs_address"], "--target", served_pair[0],
           "--draft", served_pair[1], "--name", "w-fg", "--max-batch-tokens", "64", "--foreground"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SPARKGRID_HOME": str(sparkgrid_home)})
    try:
        stdout = Lines(proc)
        lines = stdout.until("serving in the foreground", 180)
        assert any("worker w-fg ready" in ln for ln in lines), "".join(lines)
        assert actor.find_worker("w-fg") is not None
        proc.send_signal(signal.SIGINT)
        out = stdout.rest(120)
    finally:
        proc.kill()
    assert proc.returncode == 0, proc.stderr.read()
    assert "worker w-fg removed" in out
    _wait(lambda: actor.find_worker("w-fg") is None, 30)


def test_metrics_reach_the_ray_metrics_endpoint_with_worker_tags(worker_a):
    handle = worker_a[0]
    _stream(handle, "metrics", "def g():\n", max_tokens=16, ignore_eos=True)
    node = next(n for n in ray.nodes() if n["NodeID"] == ray.get_runtime_context().get_node_id())
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    wanted = ("ray_sparkgrid_generated_tokens", "ray_sparkgrid_requests",
              "ray_sparkgrid_queue_depth", "ray_sparkgrid_tokens_per_second",
              "ray_sparkgrid_accepted_length", "ray_sparkgrid_verify_tokens_per_step",
              "ray_sparkgrid_step_seconds")

    def tagged_lines():
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        lines = [ln for ln in text.splitlines() if 'worker="w-a"' in ln and 'gpu_type="cpu"' in ln]
        return lines if all(any(ln.startswith(w) for ln in lines) for w in wanted) else None
    lines = _wait(tagged_lines, 60)
    tokens = [ln for ln in lines if ln.startswith("ray_sparkgrid_generated_tokens")]
    assert float(tokens[0].rsplit(" ", 1)[1]) >= 16
    assert any('finish_reason="length"' in ln
               for ln in lines if ln.startswith("ray_sparkgrid_requests"))


def test_ray_list_actors_shows_workers_by_name(worker_a, cluster):
    ray_cli = Path(sys.executable).with_name("ray")
    result = subprocess.run([str(ray_cli), "list", "actors", "--format", "json",
                             "--address", cluster.address_info["gcs_address"],
                             "--filter", "ray_namespace=sparkgrid"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert any(r["name"] == "w-a" and r["class_name"] == "WorkerActor" for r in rows)


def test_a_killed_worker_is_a_distinct_catchable_error(slow_worker):
    handle = slow_worker[0]
    gen = handle.generate.remote("doomed", "x = 1\n", {"max_tokens": 500, "ignore_eos": True})
    ray.get(next(gen))
    actor.kill(handle)
    with pytest.raises(actor.WorkerDied):
        for ref in gen:
            ray.get(ref)
    with pytest.raises(actor.WorkerDied):
        ray.get(handle.stats.remote())
