"""What the tests of deploy/ share: where the operators' files are, and how to read them.

Knows: the layout of deploy/. Does not know: what any test checks.
"""

from __future__ import annotations

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


def path_ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def raycluster() -> dict:
    clusters = [d for d in yaml_docs(RAYCLUSTER) if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1, "deploy/kuberay/raycluster.yaml holds exactly one RayCluster"
    return clusters[0]


def container_env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}
