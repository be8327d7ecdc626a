"""The shape of the code: imports run one way, the scheduler's process loads no torch, and no
hand-written module outgrows 450 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOINERS = {"sparkgrid/cli.py", "sparkgrid/stack.py", "sparkgrid/up_cli.py"}
"""The only modules that may import both sides: the command and the one-machine stack."""
MAX_LINES = 450
GENERATED = ("protos/inference_pb2.py", "protos/inference_pb2_grpc.py", "protos/worker_pb2.py",
             "protos/worker_pb2_grpc.py")


def _py_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package,forbidden", [("worker", "scheduler"), ("scheduler", "worker")])
def test_worker_and_scheduler_never_import_each_other(package, forbidden):
    offenders = [f"{p.relative_to(ROOT)} imports {name}" for p in _py_files(package)
                 for name in sorted(_imports(p)) if _top(name) == forbidden]
    assert not offenders, offenders


def test_the_neutral_package_imports_neither_side_outside_its_joiners():
    offenders = [f"{p.relative_to(ROOT)} imports {name}" for p in _py_files("sparkgrid")
                 if str(p.relative_to(ROOT)) not in JOINERS
                 for name in sorted(_imports(p)) if _top(name) in ("worker", "scheduler", "torch")]
    assert not offenders, offenders


def test_the_checker_sees_function_level_imports(tmp_path):
    """The graph test must catch an import hidden in a function, the usual way around it."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from scheduler.client import Client\n    import worker.actor\n")
    assert {"scheduler.client", "worker.actor"} <= _imports(probe)


def test_the_scheduler_process_loads_no_torch():
    """`sparkgrid head` imports every scheduler module and reads a worker's tokenizer; none of
    it may pull in torch (or transformers, which imports torch)."""
    code = """
import pkgutil, importlib, sys
from pathlib import Path
from sparkgrid.cli import build_parser
for command in ("head", "keys", "report", "generate", "operators"):
    build_parser(command)
import scheduler
for m in pkgutil.walk_packages(scheduler.__path__, "scheduler."):
    importlib.import_module(m.name)
from scheduler.model_info import PromptTokenizer
from scheduler.text_check import ContentCheck
from worker.models import shipped_pair
tok = PromptTokenizer((Path(shipped_pair()[0]) / "tokenizer.json").read_bytes())
ids = tok.encode("def f(x):\\n    return x")
assert ContentCheck(tok, len(tok), ids[:3], ()).check(ids[3:], tok.decode(ids[3:]), True) is None
loaded = sorted(m for m in ("torch", "transformers", "safetensors") if m in sys.modules)
print(" ".join(loaded) or "none")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "none", f"the scheduler's process loaded: {out.stdout.strip()}"


def test_the_probe_would_see_torch():
    """The same probe reports torch when the engine is imported: the test above can fail."""
    code = "import sys, worker.engine.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_no_hand_written_module_is_over_450_lines():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "*.py"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    long = {name: n for name in tracked + untracked if name not in GENERATED
            and (ROOT / name).is_file()
            and (n := len((ROOT / name).read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_nothing_reaches_outside_the_repository():
    """The project stands alone: no file reads data from beside the repository."""
    files = subprocess.run(["git", "ls-files", "*.py", "*.sh", "*.md", "*.toml", "*.yaml"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = ("parents[1].parent", "parents[2].parent", "shared/data/", "../shared")
    hits = [f"{name}: {pattern}" for name in files if name != "tests/unit/test_layering.py"
            and (ROOT / name).is_file()
            for pattern in outside if pattern in (ROOT / name).read_text(errors="replace")]
    assert not hits, hits
