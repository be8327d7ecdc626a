"""deploy/scripts: the start scripts' own behaviour, with stand-in `ray` and `sparkgrid`
commands: their error messages, the command lines they build (the worker link's settings, a
linked worker's), and that a stop drains the worker before Ray goes. No Ray, Redis, Docker or
network is used.
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
echo "pid=$$ token=${SPARKGRID_OPERATOR_TOKEN:-none}" >> "$FAKE_LOG"
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
    env["SPARKGRID_WORKER_LINK_PORT"] = "off"
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
    env["SPARKGRID_WORKER_LINK_PORT"] = "off"
    env["SPARKGRID_GRPC_PORT"] = "50052"
    lines, stderr = _stop_once_started(env, log, "start-head.sh", "sparkgrid head")
    assert not any(line.startswith("ray start") for line in lines)  # no second Ray head
    head = next(line for line in lines if line.startswith("sparkgrid head"))
    assert "--ray-address 10.8.0.1:6379" in head and "--grpc-port 50052" in head
    assert "--worker-link" not in head  # SPARKGRID_WORKER_LINK_PORT=off
    assert "a-real-password" not in head and "a-real-password" not in stderr
    assert "worker drained" in lines  # the stand-in's SIGTERM handler ran: it was stopped


def test_a_second_scheduler_needs_a_ray_address_with_a_port(fake_node):
    env, log = fake_node
    env["SPARKGRID_REDIS_URL"] = "redis://:a-real-password@127.0.0.1:6380/0"
    env["SPARKGRID_JOIN_RAY"] = "10.8.0.1"
    env["SPARKGRID_WORKER_LINK_PORT"] = ""  # set and empty: no link, as "off"
    result = _run("start-head.sh", env)
    assert result.returncode == 1 and "SPARKGRID_JOIN_RAY: expected HOST:PORT" in result.stderr
    assert "sparkgrid head" not in log.read_text()


# -- the head's worker link -----------------------------------------------------------------------
@pytest.fixture
def head_env(fake_node, tmp_path):
    """start-head.sh as a second scheduler (no Ray started), with PEM files for TLS at hand."""
    env, log = fake_node
    env.update(SPARKGRID_REDIS_URL="redis://:a-real-password@127.0.0.1:6380/0",
               SPARKGRID_JOIN_RAY="10.8.0.1:6379")
    pems = {}
    for name in ("api.crt", "api.key", "link.crt", "link.key"):
        pems[name] = tmp_path / name
        pems[name].write_text("PEM\n")
    return env, log, pems


def _head_line(env: dict, log: Path) -> str:
    lines, _ = _stop_once_started(env, log, "start-head.sh", "sparkgrid head")
    return next(line for line in lines if line.startswith("sparkgrid head"))


def test_the_link_needs_tls_unless_it_is_off_or_plaintext(head_env):
    env, log, _ = head_env
    result = _run("start-head.sh", env)  # the link is on by default, and nothing gives it TLS
    assert result.returncode == 1
    assert "error: the worker link (SPARKGRID_WORKER_LINK_PORT=50060) needs TLS" in result.stderr
    for way_out in ("SPARKGRID_WORKER_LINK_CERT", "SPARKGRID_TLS_CERT",
                    "SPARKGRID_WORKER_LINK_PORT=off", "SPARKGRID_WORKER_LINK_PLAINTEXT=1"):
        assert way_out in result.stderr
    assert "sparkgrid head" not in log.read_text()


@pytest.mark.parametrize("settings, expected", [
    # the API's certificate serves the link too
    ({"SPARKGRID_TLS_CERT": "api.crt", "SPARKGRID_TLS_KEY": "api.key"},
     "--worker-link-port 50060 --worker-link-cert {api.crt} --worker-link-key {api.key}"),
    # its own certificate, on its own port
    ({"SPARKGRID_TLS_CERT": "api.crt", "SPARKGRID_TLS_KEY": "api.key",
      "SPARKGRID_WORKER_LINK_PORT": "50070", "SPARKGRID_WORKER_LINK_CERT": "link.crt",
      "SPARKGRID_WORKER_LINK_KEY": "link.key"},
     "--worker-link-port 50070 --worker-link-cert {link.crt} --worker-link-key {link.key}"),
    ({"SPARKGRID_WORKER_LINK_PLAINTEXT": "1", "SPARKGRID_ALLOW_UNREGISTERED": "1"},
     "--worker-link-port 50060 --worker-link-plaintext --allow-unregistered"),
])
def test_the_link_settings_reach_the_head_command(head_env, settings, expected):
    env, log, pems = head_env
    env.update({k: str(pems.get(v, v)) for k, v in settings.items()})
    head = _head_line(env, log)
    for name, path in pems.items():
        expected = expected.replace(f"{{{name}}}", str(path))
    assert expected in head
    assert head.count("--worker-link-port") == 1
    if "SPARKGRID_ALLOW_UNREGISTERED" not in settings:
        assert "--allow-unregistered" not in head


@pytest.mark.parametrize("settings, message", [
    ({"SPARKGRID_WORKER_LINK_PORT": "50051", "SPARKGRID_WORKER_LINK_PLAINTEXT": "1"},
     "SPARKGRID_WORKER_LINK_PORT=50051: the API or its metrics have that port"),
    ({"SPARKGRID_WORKER_LINK_PORT": "70000"},
     "SPARKGRID_WORKER_LINK_PORT: expected a port in 1..65535"),
    ({"SPARKGRID_WORKER_LINK_PLAINTEXT": "yes"},
     "SPARKGRID_WORKER_LINK_PLAINTEXT: expected 1 (on) or 0 (off), got 'yes'"),
    ({"SPARKGRID_WORKER_LINK_CERT": "link.crt"},
     "SPARKGRID_WORKER_LINK_CERT and SPARKGRID_WORKER_LINK_KEY go together"),
    ({"SPARKGRID_WORKER_LINK_CERT": "link.crt", "SPARKGRID_WORKER_LINK_KEY": "missing.key"},
     "SPARKGRID_WORKER_LINK_KEY="),
    ({"SPARKGRID_WORKER_LINK_CERT": "link.crt", "SPARKGRID_WORKER_LINK_KEY": "link.key",
      "SPARKGRID_WORKER_LINK_PLAINTEXT": "1"},
     "SPARKGRID_WORKER_LINK_PLAINTEXT=1 and SPARKGRID_WORKER_LINK_CERT: choose one"),
    ({"SPARKGRID_WORKER_LINK_PORT": "off", "SPARKGRID_ALLOW_UNREGISTERED": "true"},
     "SPARKGRID_ALLOW_UNREGISTERED: expected 1 (on) or 0 (off)"),
])
def test_the_head_refuses_bad_link_settings(head_env, settings, message):
    env, log, pems = head_env
    env.update({k: str(pems.get(v, v)) for k, v in settings.items()})
    result = _run("start-head.sh", env)
    assert result.returncode == 1 and f"error: {message}" in result.stderr
    assert "sparkgrid head" not in log.read_text()


# -- join-worker.sh: a linked worker --------------------------------------------------------------
TOKEN = "sgo_0123456789ab_" + "x" * 43


@pytest.fixture
def linked_node(fake_node, tmp_path):
    """join-worker.sh's settings: the link, the token in a file (with a CR, as an editor may
    leave it), the platform's CA; no Ray token, no KubeRay, no head address."""
    env, log = fake_node
    for name in ("RAY_AUTH_TOKEN", "KUBERAY_GEN_RAY_START_CMD", "SPARKGRID_RAY_SETTLE_S"):
        del env[name]
    token_file = tmp_path / "operator_token"
    token_file.write_text(TOKEN + "\r\n")
    token_file.chmod(0o600)
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n")
    env.update(SPARKGRID_LINK="127.0.0.1:1", SPARKGRID_OPERATOR_TOKEN_FILE=str(token_file),
               SPARKGRID_CA=str(ca))
    return env, log


def test_join_worker_execs_the_linked_worker_with_the_token_in_its_environment(linked_node):
    env, log = linked_node
    env.update(SPARKGRID_GPU_TYPE="RTX 4090", SPARKGRID_PRICE_PER_HOUR="0.45",
               SPARKGRID_WORKER_NAME="gpu-7", SPARKGRID_MAX_BATCH_TOKENS="256",
               SPARKGRID_WORKER_EXTRA_ARGS="--ready-timeout 60")
    proc = subprocess.Popen(["bash", str(SCRIPTS / "join-worker.sh")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for(log, "pid=")
        proc.send_signal(signal.SIGTERM)  # to the script's pid: exec made it the worker's
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr
    lines = log.read_text().splitlines()
    worker = next(line for line in lines if line.startswith("sparkgrid worker"))
    assert worker.startswith("sparkgrid worker --join 127.0.0.1:1 "
                             f"--target {env['SPARKGRID_TARGET']} "
                             f"--draft {env['SPARKGRID_DRAFT']} --device cpu")
    for part in ("--price-per-hour 0.45", f"--ca {env['SPARKGRID_CA']}", "--gpu-type RTX 4090",
                 "--name gpu-7", "--max-batch-tokens 256", "--ready-timeout 60", "auth=token"):
        assert part in worker
    for absent in ("--ray-address", "--plaintext", "--token", TOKEN):
        assert absent not in worker
    assert f"pid={proc.pid} token={TOKEN}" in lines  # exec: the script's own process
    assert "worker drained" in lines
    # It starts no Ray itself (the command does), but makes its token first, mode 600.
    assert not any(line.startswith("ray start") for line in lines)
    assert "ray get-auth-token --generate" in lines
    assert TOKEN not in stderr


@pytest.mark.parametrize("settings, message", [
    ({"SPARKGRID_LINK": None}, "error: SPARKGRID_LINK is not set: the head's worker link"),
    ({"SPARKGRID_LINK": None, "SPARKGRID_HEAD": "10.8.0.1:6379"},
     "SPARKGRID_HEAD is the Ray address a cluster member joins"),
    ({"SPARKGRID_LINK": "head.example.org"}, "SPARKGRID_LINK=head.example.org: expected HOST:PORT"),
    ({"SPARKGRID_LINK": "head.example.org:0"}, "SPARKGRID_LINK's port: expected a port"),
    ({"SPARKGRID_OPERATOR_TOKEN_FILE": None}, "error: no operator token: set"),
    ({"SPARKGRID_OPERATOR_TOKEN_FILE": "/nonexistent/token"},
     "SPARKGRID_OPERATOR_TOKEN_FILE=/nonexistent/token is not a readable file"),
    ({"SPARKGRID_OPERATOR_TOKEN_FILE": None, "SPARKGRID_OPERATOR_TOKEN": "hunter2"},
     "SPARKGRID_OPERATOR_TOKEN: not an operator token (expected sgo_<id>_<secret>"),
    ({"SPARKGRID_CA": "/nonexistent/ca.pem"}, "SPARKGRID_CA=/nonexistent/ca.pem is not a readable"),
    ({"SPARKGRID_LINK_PLAINTEXT": "1"}, "SPARKGRID_CA and SPARKGRID_LINK_PLAINTEXT=1: choose one"),
    ({"SPARKGRID_DEVICE": "gpu"}, "SPARKGRID_DEVICE: expected cuda, cuda:N or cpu"),
    ({"SPARKGRID_PRICE_PER_HOUR": "cheap"}, "SPARKGRID_PRICE_PER_HOUR: expected USD per hour"),
    ({"SPARKGRID_WORKER_NAME": "gpu 7"}, "SPARKGRID_WORKER_NAME: expected up to 63"),
    ({"SPARKGRID_DRAFT": None}, "set both SPARKGRID_TARGET and SPARKGRID_DRAFT, or neither"),
    ({"RAY_AUTH_MODE": "disabled"}, "RAY_AUTH_MODE=disabled: sparkgrid nodes run with Ray token"),
])
def test_join_worker_refuses_missing_or_bad_settings(linked_node, settings, message):
    env, log = linked_node
    for key, value in settings.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    result = _run("join-worker.sh", env)
    assert result.returncode == 1
    assert message in result.stderr
    assert log.read_text() == ""  # nothing was started
    assert "hunter2" not in result.stderr


def test_join_worker_refuses_a_ca_that_is_no_certificate(linked_node, tmp_path):
    env, log = linked_node
    (tmp_path / "ca.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    result = _run("join-worker.sh", env)
    assert result.returncode == 1 and "not a PEM certificate" in result.stderr
    assert log.read_text() == ""


def test_join_worker_plaintext_and_own_ray_cluster(linked_node):
    env, log = linked_node
    del env["SPARKGRID_CA"]
    env.update(SPARKGRID_LINK_PLAINTEXT="1", SPARKGRID_RAY_ADDRESS="10.0.0.2:6379",
               SPARKGRID_OPERATOR_TOKEN=TOKEN)
    del env["SPARKGRID_OPERATOR_TOKEN_FILE"]
    result = _run("join-worker.sh", env)  # your own cluster: its token, never a new one
    assert result.returncode == 1 and "error: no Ray token on this node" in result.stderr
    env["RAY_AUTH_TOKEN"] = "own-cluster-token"
    lines, _ = _stop_once_started(env, log, "join-worker.sh", "pid=")
    assert lines[0].startswith("sparkgrid worker --join")  # no `ray get-auth-token --generate`
    assert "--plaintext" in lines[0] and "--ray-address 10.0.0.2:6379" in lines[0]
    assert "--ca" not in lines[0]
    assert lines[1].endswith(f"token={TOKEN}")
