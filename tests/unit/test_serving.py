"""The worker's engine loop (no Ray): streaming, cancel, drain, health, reported figures."""

import threading
import time
from dataclasses import replace

import pytest

from sparkgrid.contract import Chunk, Usage
from worker.engine import profile_cache
from worker.engine.config import SamplingParams
from worker.serving import EngineLoop, WorkerDraining, WorkerFailed, build_engine
from worker.worker_config import WorkerConfig

PROMPTS = ["def add(a, b):\n", "import os\n", "class Point:\n"]


@pytest.fixture
def config(served_pair, sps_cache_dir):
    target, draft = served_pair
    return WorkerConfig(name="w-test", target=target, draft=draft, gpu_type="cpu",
                        sps_cache_dir=sps_cache_dir, max_batch_tokens=64)


@pytest.fixture
def loop(config):
    loop = EngineLoop(config, lambda: build_engine(config))
    loop.start()
    _wait(lambda: loop.state == "ready", 120)
    yield loop
    loop.stop()


class Collector:
    """A sink that keeps a job's chunks and wakes the test at the last one."""

    def __init__(self):
        self.items, self.done = [], threading.Event()

    def __call__(self, item):
        self.items.append(item)
        if isinstance(item, BaseException) or item.finish_reason:
            self.done.set()

    def wait(self, timeout=60):
        assert self.done.wait(timeout), "the job did not finish"
        return self

    @property
    def token_ids(self):
        return [t for c in self.items if isinstance(c, Chunk) for t in c.token_ids]


def _wait(cond, timeout):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_streamed_chunks_equal_the_engines_direct_output(config):
    """Jobs one after another (sampled output depends on how the batch was scheduled, so the
    engine's direct run must see the same schedule: one request at a time), and the direct
    engine plans with the loop's cost tables: which rows draft depends on them, and a cached
    table is measured again where its spot check finds it slowed (a neighbouring test's load
    had made the two engines' tables, and so their sampled texts, differ)."""
    loop = EngineLoop(config, lambda: build_engine(config))
    loop.start()
    _wait(lambda: loop.state == "ready", 120)
    params = [SamplingParams(temperature=t, max_tokens=24, seed=7 + i)
              for i, t in enumerate((0, 0.8, 1.0))]
    sinks = []
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        sinks.append(Collector())
        loop.submit(f"job-{i}", prompt, p, sinks[-1]).result(10)
        sinks[-1].wait()
    figures, costs = loop.figures(), loop.engine.costs
    loop.stop()
    engine = build_engine(config)
    engine.costs = costs
    direct = [engine.generate([prompt], p)[0] for prompt, p in zip(PROMPTS, params)]
    for sink, ref in zip(sinks, direct):
        last = sink.items[-1]
        assert sink.token_ids == ref["token_ids"]
        assert "".join(c.text for c in sink.items) == ref["text"]
        assert last.finish_reason == ref["finish_reason"]
        assert last.usage == Usage(prompt_tokens=ref["stats"]["prompt_tokens"],
                                   completion_tokens=len(ref["token_ids"]))
        assert all(c.finish_reason is None for c in sink.items[:-1])
    assert (figures["requests"] == 3
            and figures["generated_tokens"] == sum(len(r["token_ids"]) for r in direct))


def test_concurrent_greedy_jobs_give_the_targets_greedy_output(config):
    """Jobs joining a running batch at any step: greedy output is still the target's own (float64,
    so that batching cannot flip a near-tie)."""
    config = replace(config, dtype="float64")
    loop = EngineLoop(config, lambda: build_engine(config))
    loop.start()
    _wait(lambda: loop.state == "ready", 120)
    params = SamplingParams(temperature=0, max_tokens=24)
    sinks = [Collector() for _ in PROMPTS]
    for i, (prompt, sink) in enumerate(zip(PROMPTS, sinks)):
        loop.submit(f"job-{i}", prompt, params, sink).result(10)
        time.sleep(0.05 * i)
    for sink in sinks:
        sink.wait()
    loop.stop()
    direct = build_engine(config).generate(PROMPTS, params, policy="ar")
    assert [s.token_ids for s in sinks] == [r["token_ids"] for r in direct]


def test_cancel_frees_the_slot_within_a_step(config):
    slow = EngineLoop(_slowed(config, 20), lambda: build_engine(config))
    slow.start()
    try:
        _wait(lambda: slow.state == "ready", 120)
        sink = Collector()
        slow.submit("long", "x = 1\n", SamplingParams(max_tokens=400, ignore_eos=True),
                    sink).result(10)
        _wait(lambda: slow.figures()["num_running"] == 1, 30)
        assert slow.figures()["cache_used_fraction"] > 0
        assert slow.cancel("long").result(30) is True
        assert sink.wait(10).items[-1].finish_reason == "abort"
        _wait(lambda: slow.figures()["num_running"] == 0, 10)
        assert slow.figures()["cache_used_fraction"] == 0
        assert slow.cancel("long").result(10) is False
    finally:
        slow.stop()


def test_drain_finishes_running_work_and_refuses_new(loop):
    sink = Collector()
    loop.submit("running", "def f():\n", SamplingParams(max_tokens=32, ignore_eos=True),
                sink).result(10)
    drained = loop.drain()
    figures = drained.result(60)
    assert sink.done.is_set() and sink.items[-1].finish_reason == "length"
    assert figures["state"] == "draining" and figures["num_running"] == 0
    with pytest.raises(WorkerDraining, match="draining"):
        loop.submit("late", "x", SamplingParams(max_tokens=4), Collector()).result(10)


def test_bad_input_is_refused_with_the_field_named(loop):
    with pytest.raises(ValueError, match="max_tokens"):
        loop.submit("big", "x", SamplingParams(max_tokens=10**6), Collector()).result(10)
    loop.submit("dup", "x", SamplingParams(max_tokens=64, ignore_eos=True), Collector()).result(10)
    with pytest.raises(ValueError, match="req_id"):
        loop.submit("dup", "x", SamplingParams(max_tokens=4), Collector()).result(10)
    with pytest.raises(ValueError, match="job_id"):
        loop.submit("", "x", SamplingParams(), Collector())
    assert loop.state == "ready"


def test_a_model_that_fails_to_load_fails_the_health_check(config):
    def broken():
        raise OSError("weights file truncated")
    loop = EngineLoop(config, broken)
    loop.start()
    _wait(lambda: loop.state == "failed", 10)
    with pytest.raises(WorkerFailed, match="weights file truncated"):
        loop.check_health()
    with pytest.raises(WorkerFailed):
        loop.submit("j", "x", SamplingParams(), Collector()).result(5)


def test_a_dying_engine_fails_open_jobs_and_the_health_check(config):
    engine = build_engine(config)
    real_step = engine.step
    calls = []

    def step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA error: an illegal memory access")
        return real_step()
    engine.step = step
    loop = EngineLoop(config, lambda: engine)
    loop.start()
    sink = Collector()
    loop.submit("j", "x = 1\n", SamplingParams(max_tokens=64, ignore_eos=True), sink).result(30)
    assert isinstance(sink.wait(30).items[-1], WorkerFailed)
    with pytest.raises(WorkerFailed, match="illegal memory access"):
        loop.check_health()


def test_a_stuck_step_fails_the_health_check(config):
    engine = build_engine(config)
    release = threading.Event()
    real_step = engine.step

    def step():
        release.wait(30)
        return real_step()
    engine.step = step
    stuck_config = replace(config, stuck_after_s=0.5)
    loop = EngineLoop(stuck_config, lambda: engine)
    loop.start()
    _wait(lambda: loop.state == "ready", 30)
    loop.check_health()  # idle: healthy
    loop.submit("j", "x", SamplingParams(max_tokens=4), Collector()).result(10)
    time.sleep(1.0)
    with pytest.raises(WorkerFailed, match="not advanced"):
        loop.check_health()
    release.set()
    loop.stop()


def test_emulated_slowdown_slows_steps(config):
    """Step time is measured in each loop's own run, side by side: F = 4 must show."""
    figures = {}
    for factor in (1.0, 4.0):
        loop = EngineLoop(_slowed(config, factor), lambda: build_engine(config))
        seconds = []
        loop._on_step = lambda report, seconds=seconds: seconds.append(report.seconds)
        loop.start()
        _wait(lambda loop=loop: loop.state == "ready", 120)
        sink = Collector()
        loop.submit("j", "x = 1\n",
                    SamplingParams(max_tokens=48, ignore_eos=True, temperature=0),
                    sink).result(10)
        sink.wait(120)
        loop.stop()
        figures[factor] = sorted(seconds)[len(seconds) // 2]
    assert figures[4.0] > 2.5 * figures[1.0]


def test_an_emulated_slowdown_shows_in_the_reported_profile(config, monkeypatch):
    # both engines read one cached table; under another test's load its spot check may find
    # it slowed and measure it again (`profile_cache`), which this test is not about
    monkeypatch.setattr(profile_cache, "SLOWED", float("inf"))
    plain, slowed = build_engine(config).sps, build_engine(_slowed(config, 4.0)).sps
    assert plain.batch_tokens == slowed.batch_tokens
    assert [round(p / s, 6) for p, s in zip(plain.steps_per_second, slowed.steps_per_second)] == \
        [4.0] * len(plain.batch_tokens)


def _slowed(config, factor):
    return replace(config, emulate_slowdown=factor)


@pytest.mark.parametrize("field, value", [("name", "bad name!"), ("name", ""),
                                          ("price_per_hour", -1.0),
                                          ("emulate_slowdown", 0.5), ("gpu_type", " "),
                                          ("max_batch_tokens", 0), ("stuck_after_s", 0)])
def test_worker_config_names_the_bad_field(field, value):
    kwargs = dict(name="w", target="t", draft="d", gpu_type="cpu")
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        WorkerConfig(**kwargs)
