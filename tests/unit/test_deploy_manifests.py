"""deploy/: the KubeRay manifest says what the design needs, and every image is pinned.

The RayCluster's required fields, its two GPU worker groups of different types, secrets for the
Ray token and the Redis URL, the gRPC Service; pinned base images, non-root users, the compose
file's Redis, head and worker images that share Python and Ray, and the worker link where each
head serves it. No Ray, Docker or network is used.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from deploy_common import (
    COMPOSE,
    DEPLOY,
    DOCKERFILES,
    DRAIN_S,
    RAYCLUSTER,
    container_env,
    needs_yaml,
    path_ids,
    raycluster,
    yaml,
    yaml_docs,
)


# -- KubeRay ------------------------------------------------------------------------------------
@needs_yaml
def test_raycluster_has_the_fields_kuberay_requires():
    rc = raycluster()
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
    groups = raycluster()["spec"]["workerGroupSpecs"]
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
        env = container_env(container)
        assert env["SPARKGRID_DEVICE"]["value"] == "cuda"
        assert float(env["SPARKGRID_PRICE_PER_HOUR"]["value"]) > 0
        gpu_types.add(env["SPARKGRID_GPU_TYPE"]["value"])
    assert len(names) == len(groups), "group names must differ"
    assert len(gpu_types) == len(groups), f"each group serves another GPU type: {gpu_types}"


@needs_yaml
def test_raycluster_takes_ray_token_and_redis_url_from_secrets():
    rc = raycluster()
    spec = rc["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + \
           [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        env = container_env(pod["containers"][0])
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    head_env = container_env(spec["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert "secretKeyRef" in head_env["SPARKGRID_REDIS_URL"]["valueFrom"]
    # start-*.sh run KubeRay's generated `ray start` themselves.
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"


@needs_yaml
def test_raycluster_has_a_service_for_the_grpc_api():
    name = raycluster()["metadata"]["name"]
    services = [d for d in yaml_docs(RAYCLUSTER) if d.get("kind") == "Service"]
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


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=path_ids(DOCKERFILES))
def test_dockerfile_base_images_are_pinned(dockerfile):
    froms = _from_lines(dockerfile)
    assert froms, f"{dockerfile.name} has no FROM line"
    stages: set[str] = set()
    for image, alias in froms:
        assert image in stages or _pinned(image), \
            f"{dockerfile.name}: FROM {image} is not pinned to a version tag or digest"
        if alias:
            stages.add(alias)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=path_ids(DOCKERFILES))
def test_dockerfile_runs_as_a_user(dockerfile):
    users = [line.split()[1] for line in dockerfile.read_text().splitlines()
             if line.split()[:1] == ["USER"]]
    assert users and users[-1] not in ("root", "0"), \
        f"{dockerfile.name} must end as a non-root USER"


@needs_yaml
def test_compose_and_kuberay_images_are_pinned():
    images = [s["image"] for s in yaml.safe_load(COMPOSE.read_text())["services"].values()]
    spec = raycluster()["spec"]
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
    ray = {re.search(r"^ARG RAY_VERSION=(\S+)$", d.read_text(), re.M).group(1)
           for d in (head, worker)}
    assert ray == {raycluster()["spec"]["rayVersion"]}


# -- two schedulers behind one address -------------------------------------------------------------
ENVOY = DEPLOY / "envoy" / "envoy.yaml"


@needs_yaml
def test_envoy_spreads_grpc_over_two_schedulers_and_drops_a_draining_one():
    config = yaml.safe_load(ENVOY.read_text())
    [cluster] = config["static_resources"]["clusters"]
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for group in cluster["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]
    assert sorted(ports) == [50051, 50052]
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]  # gRPC is HTTP/2
    [check] = cluster["health_checks"]
    # the service whose status a stopping scheduler turns to NOT_SERVING first (head.py)
    assert check["grpc_health_check"]["service_name"] == "sparkgrid.v1.Inference"
    assert check["unhealthy_threshold"] == 1
    [listener] = config["static_resources"]["listeners"]
    [chain] = listener["filter_chains"]
    assert chain["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    manager = chain["filters"][0]["typed_config"]
    route = manager["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["cluster"] == "schedulers" and route["timeout"] == "0s"  # streams are long


@needs_yaml
def test_compose_runs_the_second_scheduler_on_the_running_ray_behind_envoy():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    second, envoy = services["scheduler-b"], services["envoy"]
    assert second["environment"]["SPARKGRID_JOIN_RAY"].endswith(":6379")
    assert second["environment"]["SPARKGRID_GRPC_PORT"] == "50052"
    assert "SPARKGRID_REDIS_URL" not in second["environment"]  # the secret file, not the env
    assert any(v.startswith("../envoy/envoy.yaml:") for v in envoy["volumes"])
    assert second["profiles"] == envoy["profiles"] == ["two-schedulers"]


# -- the worker link ----------------------------------------------------------------------------
LINK_PORT = 50060


@needs_yaml
def test_compose_head_serves_the_worker_link_over_tls_and_the_second_scheduler_none():
    compose = yaml.safe_load(COMPOSE.read_text())
    head, second = compose["services"]["head"], compose["services"]["scheduler-b"]
    env = head["environment"]
    assert env["SPARKGRID_WORKER_LINK_PORT"] == str(LINK_PORT)
    assert "SPARKGRID_WORKER_LINK_PLAINTEXT" not in env
    for setting, secret in (("SPARKGRID_WORKER_LINK_CERT", "link.crt"),
                            ("SPARKGRID_WORKER_LINK_KEY", "link.key")):
        assert env[setting] == f"/run/secrets/{secret}"
        assert secret in head["secrets"] and secret in compose["secrets"]
    # Both run on one host (host networking): one of them may bind the link's port.
    assert second["environment"]["SPARKGRID_WORKER_LINK_PORT"] == "off"


@needs_yaml
def test_kuberay_head_starts_without_a_link_and_routes_to_its_own_workers():
    # start-head.sh refuses a link without TLS; this manifest mounts no certificate.
    env = container_env(raycluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert env["SPARKGRID_WORKER_LINK_PORT"]["value"] == "off"
    # Its worker pods carry no operator token: every member is the platform's own.
    assert env["SPARKGRID_ALLOW_UNREGISTERED"]["value"] == "1"


def test_head_image_exposes_the_worker_link():
    exposed = [line.split()[1:] for line in
               (DEPLOY / "docker" / "Dockerfile.head").read_text().splitlines()
               if line.startswith("EXPOSE ")]
    assert str(LINK_PORT) in [port for ports in exposed for port in ports]


def test_worker_image_documents_the_linked_workers_docker_run():
    worker = (DEPLOY / "docker" / "Dockerfile.worker").read_text()
    top = worker[:worker.index("\nFROM ")]
    assert "--entrypoint /opt/sparkgrid/bin/join-worker.sh" in top
    assert "SPARKGRID_LINK=" in top and "SPARKGRID_OPERATOR_TOKEN_FILE=" in top
    # The image carries the script (every file of deploy/scripts is copied and made executable).
    assert "COPY deploy/scripts/ /opt/sparkgrid/bin/" in worker
