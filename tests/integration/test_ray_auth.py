"""`sparkgrid worker --ray-address` from a second shell joins a running cluster that uses Ray's
token authentication (as `sparkgrid up`'s does), or says in one line that the token is
missing or wrong, without Ray's raw InvalidAuthToken warnings.

The cluster is this module's own (`cluster`, started by `ray.init()` with token auth on); each
command runs in a fresh process whose environment is a new shell's: no RAY_AUTH_MODE (which
`ray.init()` set in this process), and in some cases another HOME, so no token file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

pytestmark = pytest.mark.integration
SPARKGRID = str(Path(sys.executable).with_name("sparkgrid"))


def _second_shell(sparkgrid_home, **env) -> dict:
    base = {k: v for k, v in os.environ.items()
            if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    return {**base, "SPARKGRID_HOME": str(sparkgrid_home), **env}


def _worker(args, env, timeout_s=240) -> tuple[int, str, str, float]:
    start = time.monotonic()
    done = subprocess.run([SPARKGRID, "worker", *args], capture_output=True, text=True,
                          env=env, timeout=timeout_s)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - start


def test_a_second_shell_joins_with_the_token_in_its_home(cluster, served_pair, sparkgrid_home):
    """The reported case: `up` in one shell, `sparkgrid worker` in another (same user)."""
    address = cluster.address_info["gcs_address"]
    env = _second_shell(sparkgrid_home)
    code, out, err, _ = _worker(["--ray-address", address, "--target", served_pair[0],
                                 "--draft", served_pair[1], "--name", "w-second",
                                 "--max-batch-tokens", "64"], env)
    try:
        assert code == 0, err[-2000:]
        assert "worker w-second ready" in out
        assert "InvalidAuthToken" not in err
    finally:
        code, out, err, _ = _worker(["--ray-address", address, "--stop", "w-second"], env)
    assert code == 0 and "worker w-second removed" in out, err[-2000:]


def test_a_shell_without_the_token_gets_one_clear_error(cluster, sparkgrid_home, tmp_path):
    env = _second_shell(sparkgrid_home, HOME=str(tmp_path))  # no ~/.ray/auth_token there
    code, out, err, seconds = _worker(["--ray-address", cluster.address_info["gcs_address"],
                                       "--stop", "nobody"], env)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "requires an authentication token" in err and "this shell has none" in err
    assert "ray get-auth-token" in err and "RAY_AUTH_TOKEN" in err
    assert "InvalidAuthToken" not in err and "Traceback" not in err
    assert seconds < 20, "Ray's own retries (20 s of warnings) must not run"


def test_a_shell_with_another_clusters_token_is_told_it_does_not_match(cluster, sparkgrid_home):
    env = _second_shell(sparkgrid_home, RAY_AUTH_TOKEN="0" * 64)
    code, out, err, _ = _worker(["--ray-address", cluster.address_info["gcs_address"],
                                 "--stop", "nobody"], env)
    assert code == 2 and err.count("\n") == 1, err
    assert "does not accept this shell's authentication token (from RAY_AUTH_TOKEN)" in err
    assert "InvalidAuthToken" not in err


def test_a_token_named_by_ray_auth_token_path_is_used(cluster, sparkgrid_home, tmp_path):
    token = (Path.home() / ".ray" / "auth_token").read_text()
    (tmp_path / "token").write_text(token)
    env = _second_shell(sparkgrid_home, HOME=str(tmp_path / "home"),
                        RAY_AUTH_TOKEN_PATH=str(tmp_path / "token"))
    code, out, err, _ = _worker(["--ray-address", cluster.address_info["gcs_address"],
                                 "--stop", "nobody"], env)
    # past authentication: the cluster answers that no such worker runs
    assert code == 2 and "no worker of that name is running" in err, err
    assert "InvalidAuthToken" not in err
