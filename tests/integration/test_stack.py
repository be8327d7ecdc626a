"""The one-command stack end to end, as a newcomer runs it: `sparkgrid up` as a real process
on a fresh `$SPARKGRID_HOME`, with no Redis URL (so the private `redis-server` path runs),
then the client commands against the running `up` with no flags. Afterwards no process it
started may be left running. (`sparkgrid demo` runs once, in test_demo.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from procs import Lines

pytestmark = pytest.mark.integration
SPARKGRID = str(Path(sys.executable).with_name("sparkgrid"))


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKGRID_", "RAY_ADDRESS"))}
    return {**env, "SPARKGRID_HOME": str(home)}


def _left_running(home: Path) -> list[str]:
    """Live processes started by a stack of `home`: every process it starts (Redis, Ray's
    GCS, raylet, dashboard, worker actors) inherits SPARKGRID_HOME from it."""
    marker = f"SPARKGRID_HOME={home}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
            cmd = (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                   .decode(errors="replace"))
        except OSError:
            continue
        if state != "Z" and marker in env:
            found.append(f"{pid}: {cmd[:200]}")
    return found


def test_up_serves_the_client_commands_refuses_a_second_up_and_stops_cleanly(tmp_path):
    home = tmp_path / "home"
    proc = subprocess.Popen([SPARKGRID, "up", "--workers", "1", "--grpc-port", "0",
                             "--worker-link-port", "0", "--metrics-port", "-1",
                             "--dashboard-port", "8385"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(home))
    try:
        Lines(proc).until("running; Ctrl-C", 300)
        info = json.loads((home / "up.json").read_text())
        assert {"endpoint", "api_key", "redis_url", "dashboard_url", "worker_link", "ca",
                "ray_address"} <= set(info)
        assert b"BEGIN CERTIFICATE" in Path(info["ca"]).read_bytes()
        assert int(info["worker_link"].rsplit(":", 1)[1]) > 0
        assert oct((home / "up.json").stat().st_mode & 0o777) == "0o600"
        assert _left_running(home)  # the check below can see the stack's processes
        # Ray's token authentication is on: the dashboard takes no job from a caller without it
        job = urllib.request.Request(f"{info['dashboard_url']}/api/jobs/", method="POST",
                                     data=json.dumps({"entrypoint": "echo pwned"}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(job, timeout=30)
        assert refused.value.code == 401

        def run(*args):
            return subprocess.run([SPARKGRID, *args], capture_output=True, text=True, timeout=120,
                                  env=_env(home))
        second = run("up", "--grpc-port", "0")
        assert second.returncode == 2 and "already running" in second.stderr.replace(
            "another `sparkgrid up` is running", "already running")
        got = run("generate", "--max-tokens", "8", "--temperature", "0", "def f(x):\n")
        assert got.returncode == 0 and got.stdout and "8 completion tokens" in got.stderr
        table = run("workers")
        assert table.returncode == 0 and "up-1" in table.stdout
        key = run("keys", "create", "--tenant", "newco")
        assert key.returncode == 0 and "api key: sg_" in key.stdout
        report = run("report", "--format", "json")
        assert report.returncode == 0 and json.loads(report.stdout)["totals"]["requests"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (home / "up.json").exists()
    time.sleep(2)
    assert _left_running(home) == []
