"""deploy/scripts: the start scripts' own behaviour, with stand-in `ray` and `sparkgrid`
commands: their error messages, and that a stop drains the worker before Ray goes. No Ray,
Redis, Docker or network is used.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from deploy_common import SCRIPTS

# -- the start scripts, with stand-ins for ray and sparkgrid -------------------------------------
FAKE_RAY = """#!/usr/bin/env bash
echo "ray $*" >> "$FAKE_LOG"
if [[ $1 == start ]]; then
    trap 'echo "ray stopped" >> "$FAKE_LOG"; exit 1' TERM
    for ((i = 0; i < ${FAKE_RAY_TENTHS:-600}; i++)); do sleep 0.1; done
    echo "ray died" >> "$FAKE_LOG"
    exit 7
fi
"""

FAKE_SPARKGRID = """#!/usr/bin/env bash
echo "sparkgrid $* auth=$RAY_AUTH_MODE" >> "$FAKE_LOG"
trap 'echo "worker draining" >> "$FAKE_LOG"; sleep 0.5; \
echo "worker drained" >> "$FAKE_LOG"; exit 0' TERM
for ((i = 0; i < 600; i++)); do sleep 0.1; done
"""


@pytest.fixture
def fake_node(tmp_path):
    """A PATH with stand-in `ray` and `sparkgrid`, model directories, and the environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("ray", FAKE_RAY), ("sparkgrid", FAKE_SPARKGRID),
                       ("python-ok", "#!/bin/sh\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    models = {}
    for name in ("target", "draft"):
        models[name] = tmp_path / name
        models[name].mkdir()
        (models[name] / "config.json").write_text("{}")
    log = tmp_path / "log"
    log.touch()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SPARKGRID_", "RAY_", "KUBERAY_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", HOME=str(tmp_path),
               FAKE_LOG=str(log), SPARKGRID_PYTHON=str(bin_dir / "python-ok"),
               RAY_AUTH_TOKEN="test-token", SPARKGRID_TARGET=str(models["target"]),
               SPARKGRID_DRAFT=str(models["draft"]), SPARKGRID_DEVICE="cpu",
               SPARKGRID_RAY_SETTLE_S="1",
               # KubeRay's generated command: no reachability check of the head.
               KUBERAY_GEN_RAY_START_CMD="ray start --address=head.invalid:6379 "
                                         "--metrics-export-port=8080")
    return env, log


def _run(script: str, env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / script)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _wait_for(log: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text()}"
        time.sleep(0.05)


def _stop_once_started(env: dict, log: Path, script: str, marker: str) -> tuple[list, str]:
    """Run `script` until `marker` is in the log, SIGTERM it, and return the log's lines and
    its stderr once it exited with status 0."""
    proc = subprocess.Popen(["bash", str(SCRIPTS / script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(log, marker)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr
    return log.read_text().splitlines(), stderr


@pytest.mark.parametrize("setting, value, message", [
    ("SPARKGRID_DEVICE", "gpu", "SPARKGRID_DEVICE: expected cuda, cuda:N or cpu"),
    ("SPARKGRID_PRICE_PER_HOUR", "cheap", "SPARKGRID_PRICE_PER_HOUR: expected USD per hour"),
    ("SPARKGRID_WORKER_NAME", "gpu 7", "SPARKGRID_WORKER_NAME: expected up to 63"),
    ("RAY_AUTH_MODE", "disabled",
     "RAY_AUTH_MODE=disabled: sparkgrid nodes run with Ray token authentication only"),
])
def test_start_worker_refuses_bad_settings(fake_node, setting, value, message):
    env, log = fake_node
    env[setting] = value
    result = _run("start-worker.sh", env)
    assert result.returncode == 1
    assert f"error: {message}" in result.stderr
    assert "ray start" not in log.read_text()  # nothing was started


@pytest.mark.parametrize("missing, message", [
    ("KUBERAY_GEN_RAY_START_CMD", "error: SPARKGRID_HEAD is not set"),  # the head's address
    ("RAY_AUTH_TOKEN", "error: no Ray token on this node"),
    ("SPARKGRID_DRAFT", "set both SPARKGRID_TARGET and SPARKGRID_DRAFT, or neither"),
])
def test_start_worker_refuses_a_missing_setting(fake_node, missing, message):
    env, _ = fake_node
    del env[missing]
    result = _run("start-worker.sh", env)
    assert result.returncode == 1
    assert message in result.stderr


def test_start_head_needs_a_redis_url_with_a_real_password(fake_node):
    env, log = fake_node
    result = _run("start-head.sh", env)
    assert result.returncode == 1 and "error: SPARKGRID_REDIS_URL is not set" in result.stderr
    env["SPARKGRID_REDIS_URL"] = "redis://:CHANGE-ME-to-a-long-random-password@127.0.0.1:6380/0"
    result = _run("start-head.sh", env)
    assert result.returncode == 1 and "placeholder password" in result.stderr
    assert "CHANGE-ME" not in result.stdout
    assert "ray start" not in log.read_text()


def test_a_stop_drains_the_worker_before_ray_stops(fake_node):
    env, log = fake_node
    env["SPARKGRID_PRICE_PER_HOUR"] = "0.45"
    env["SPARKGRID_GPU_TYPE"] = "RTX 4090"
    env["SPARKGRID_WORKER_NAME"] = "gpu-7"
    lines, stderr = _stop_once_started(env, log, "start-worker.sh", "sparkgrid worker")
    assert lines[0] == "ray start --address=head.invalid:6379 --metrics-export-port=8080 --block"
    worker = next(line for line in lines if line.startswith("sparkgrid worker"))
    for part in ("--ray-address head.invalid:6379", "--device cpu", "--price-per-hour 0.45",
                 "--gpu-type RTX 4090", "--name gpu-7", "--foreground", "auth=token"):
        assert part in worker
    assert lines.index("worker drained") < lines.index("ray stopped")


def test_the_worker_is_stopped_when_ray_dies(fake_node):
    env, log = fake_node
    env["FAKE_RAY_TENTHS"] = "30"  # Ray "dies" after 3 s, status 7
    result = _run("start-worker.sh", env)
    lines = log.read_text().splitlines()
    assert result.returncode == 7, result.stderr
    assert "Ray exited (status 7)" in result.stderr
    assert lines.index("ray died") < lines.index("worker drained")


def test_a_second_scheduler_joins_the_running_ray_and_drains_on_stop(fake_node):
    env, log = fake_node
    env["SPARKGRID_REDIS_URL"] = "redis://:a-real-password@127.0.0.1:6380/0"
    env["SPARKGRID_JOIN_RAY"] = "10.8.0.1:6379"
    env["SPARKGRID_GRPC_PORT"] = "50052"
    lines, stderr = _stop_once_started(env, log, "start-head.sh", "sparkgrid head")
    assert not any(line.startswith("ray start") for line in lines)  # no second Ray head
    head = next(line for line in lines if line.startswith("sparkgrid head"))
    assert "--ray-address 10.8.0.1:6379" in head and "--grpc-port 50052" in head
    assert "a-real-password" not in head and "a-real-password" not in stderr
    assert "worker drained" in lines  # the stand-in's SIGTERM handler ran: it was stopped


def test_a_second_scheduler_needs_a_ray_address_with_a_port(fake_node):
    env, log = fake_node
    env["SPARKGRID_REDIS_URL"] = "redis://:a-real-password@127.0.0.1:6380/0"
    env["SPARKGRID_JOIN_RAY"] = "10.8.0.1"
    result = _run("start-head.sh", env)
    assert result.returncode == 1 and "SPARKGRID_JOIN_RAY: expected HOST:PORT" in result.stderr
    assert "sparkgrid head" not in log.read_text()
