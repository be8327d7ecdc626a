"""`sparkgrid` run in-process: the engine run streams and reports, calibration writes
sts.json, and user errors exit 2 with a message that names the option, never a traceback.

Without --target the shipped pair is served; the tiny demo pair is the fallback of an
installation without it (built once into a temporary `$SPARKGRID_HOME`). Runs pick
`fixed` or `ar` rather than the default `prefix`, which first profiles the target (SPS) and
would dominate the time; `prefix` itself is covered by the engine's own tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil

import pytest

from sparkgrid.cli import main
from worker.models import shipped_pair


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("sparkgrid_home")


@pytest.fixture
def run(home, monkeypatch, capsys):
    """main(argv) with SPARKGRID_HOME=home; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("SPARKGRID_HOME", str(home))

    def call(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return call


def test_engine_serves_the_shipped_pair_by_default_and_streams_every_request(run, home):
    code, out, err = run("engine", "--num-prompts", "3", "--max-tokens", "12",
                         "--verify-policy", "fixed")
    assert code == 0, err
    assert "stdlib-pair/target" in out.splitlines()[0] and "gibberish" not in out
    assert "building" not in err and not (home / "tiny-pair").exists()
    lines = out.splitlines()
    for n in (1, 2, 3):
        done = [i for i, line in enumerate(lines) if line.startswith(f"[{n}] done: ")]
        assert len(done) == 1, out
        assert re.search(r"done: (length|stop); \d+ prompt \+ \d+ completion tokens; "
                         r"mean accepted length \d+\.\d\d", lines[done[0]])
    streamed = [int(m.group(1)) for line in lines if (m := re.match(r"\[(\d)\] \| ", line))]
    assert streamed, out  # text arrives as it is produced, before the request's done line
    first_text = {n: lines.index(next(line for line in lines if line.startswith(f"[{n}] | ")))
                  for n in set(streamed)}
    assert all(i < lines.index(next(line for line in lines if line.startswith(f"[{n}] done")))
               for n, i in first_text.items())
    assert re.search(r"^total: 3 requests, \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\), \d+ steps$",
                     out, re.M)
    assert re.search(r"^forwards: target \d+ \(1 prefill \+ \d+ verify\), draft \d+;", out, re.M)


def test_without_the_shipped_pair_the_tiny_demo_pair_is_built_once(run, home, monkeypatch):
    monkeypatch.setattr("worker.cli.shipped_pair", lambda: None)
    code, out, err = run("engine", "--num-prompts", "1", "--max-tokens", "4", "--policy", "ar")
    assert code == 0, err
    assert "building the tiny demo pair" in err and "gibberish" in out
    assert (home / "tiny-pair" / "target" / "config.json").is_file()
    code, out, err = run("engine", "--num-prompts", "1", "--max-tokens", "4", "--policy", "ar")
    assert code == 0 and "building" not in err


def test_engine_json_summary(run):
    code, out, err = run("engine", "--json", "--policy", "fixed", "--max-tokens", "10",
                         "--prompt", "def add(a, b):", "--prompt", "x = [")
    assert code == 0, err
    assert "building" not in err
    summary = json.loads(out)
    assert summary["policy"] == "fixed" and summary["gamma"] >= 1
    assert [r["prompt"] for r in summary["requests"]] == ["def add(a, b):", "x = ["]
    for r in summary["requests"]:
        assert r["finish_reason"] in ("length", "stop")
        assert 1 <= r["completion_tokens"] <= 10 and r["prompt_tokens"] >= 1
        assert r["mean_accept_length"] >= 1 and isinstance(r["text"], str)
    totals = summary["totals"]
    assert totals["requests"] == 2
    assert totals["completion_tokens"] == sum(r["completion_tokens"] for r in summary["requests"])
    assert totals["tokens_per_second"] > 0
    assert totals["target_forwards"] == totals["prefill_forwards"] + totals["verify_forwards"]
    assert totals["draft_forwards"] >= 1 and totals["steps"] >= 1


def test_calibrate_writes_sts_json_beside_the_draft(run, tmp_path):
    target, shipped_draft = shipped_pair()
    draft = tmp_path / "draft"
    shutil.copytree(shipped_draft, draft)  # calibrate writes into the draft: never the shipped one
    (draft / "sts.json").unlink()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"def f(x):"\n{"prompt": "import os\\n"}\n\n"class A:"\n')
    code, out, err = run("calibrate", "--target", str(target),
                         "--draft", str(draft), "--prompts-file", str(prompts),
                         "--max-tokens", "24", "--temperature", "1.0")
    assert code == 0, err
    saved = json.loads((draft / "sts.json").read_text())
    gamma = json.loads((draft / "config.json").read_text())["block_size"]
    assert len(saved["temperatures"]) == gamma and all(t > 0 for t in saved["temperatures"])
    assert "ECE before" in out and "sts.json" in out


@pytest.mark.parametrize("argv, option", [
    (["engine", "--target", "{tmp}/missing"], "--target"),
    (["engine", "--target", "{tmp}"], "--target"),  # a directory, but not a model
    (["engine", "--max-tokens", "0"], "--max-tokens"),
    (["engine", "--policy", "fastest"], "--policy"),
    (["engine", "--temperature", "-1"], "--temperature"),
    (["engine", "--draft", "{tmp}"], "--draft"),
    (["engine", "--prompts-file", "{tmp}/missing.jsonl"], "--prompts-file"),
    (["calibrate", "--target", "{tmp}"], "--draft"),
    (["teleport"], "command"),  # no such command
])
def test_user_errors_exit_2_naming_the_option(run, tmp_path, argv, option):
    code, out, err = run(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert err.startswith("error: ") and option in err, err
    assert "Traceback" not in err and out == ""


def test_bad_prompts_file_line_is_named(run, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('"ok"\n{"text": "no prompt key"}\n')
    code, _, err = run("engine", "--prompts-file", str(bad))
    assert code == 2 and "line 2" in err and "--prompts-file" in err


def test_engine_refusal_is_reported_without_traceback(run):
    code, out, err = run("engine", "--max-tokens", "5000", "--num-prompts", "1", "--policy", "ar")
    assert code == 2
    assert err.startswith("error: ") and "max_tokens" in err and "context" in err
    assert "Traceback" not in err


def test_engine_defaults_to_the_shipped_pair_when_installed(tmp_path, monkeypatch):
    """With a packaged pair in place, `sparkgrid engine` serves it instead of the tiny pair."""
    from worker import models
    from worker.training import build_pair

    out = tmp_path / "pair"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert build_pair.main(["--out", str(out), "--smoke"]) == 0
    monkeypatch.setattr(models, "PAIR_DIR", out / "package")
    monkeypatch.setenv("SPARKGRID_HOME", str(tmp_path / "home"))
    assert main(["engine", "--verify-policy", "fixed", "--max-tokens", "4", "--json"]) == 0
    assert not (tmp_path / "home" / "tiny-pair").exists()


def test_an_engine_command_without_the_worker_extra_says_what_to_install(tmp_path):
    """A head-only install (no torch) gets one line naming the extra, not a traceback."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None  # as if torch were not installed\n"
            "from sparkgrid.cli import main\n"
            "sys.exit(main(['engine', '--max-tokens', '2', '--num-prompts', '1']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "SPARKGRID_HOME": str(tmp_path)})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "sparkgrid[worker]" in out.stderr and "missing: torch" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True),
                                            ("::1", True), ("0.0.0.0", False),
                                            ("10.0.0.5", False), ("head.example", False)])
def test_the_head_warns_of_plaintext_off_loopback_only(host, loopback):
    from scheduler.cli import _loopback, head_options

    assert _loopback(host) is loopback
    parser = argparse.ArgumentParser()
    head_options(parser)
    assert parser.parse_args([]).host == "127.0.0.1"  # this machine only, unless told


@pytest.mark.parametrize("argv, option", [
    (["head", "--keep-text", "soon"], "--keep-text"),
    (["head", "--keep-jobs", "-3d"], "--keep-jobs"),
    (["head", "--lease", "x"], "--lease"),
    (["head", "--keep-text", "40d", "--keep-jobs", "30d"], "--keep-text"),  # outlives its record
    (["head", "--keep-text", "0", "--keep-jobs", "30d"], "--keep-text"),  # forever, record not
    (["head", "--lease", "0"], "--lease"),
    (["head", "--grace", "later"], "--grace"),
])
def test_head_retention_and_lease_errors_name_the_option(run, argv, option):
    code, out, err = run(*argv, "--redis-url", "redis://127.0.0.1:1/0")
    assert code == 2 and err.startswith("error: ") and option in err, err
    assert "Traceback" not in err and out == ""


def test_head_durations_take_units():
    from scheduler.cli import duration

    assert [duration(t) for t in ("24h", "30d", "90m", "45s", "3600", "0", "1.5h")] == \
           [86400, 30 * 86400, 5400, 45, 3600, 0, 5400]
