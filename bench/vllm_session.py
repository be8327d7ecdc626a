"""vLLM's CPU build as an arm of `bench/peers.py`: one process in its own virtualenv
(`bench/vllm_peer.py`) kept for the whole run, asked for one arm at a time, so that its arms
interleave with the engine's.

Knows: how to start, drive and stop that process. Does not know: what a benchmark reports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path

PEER = Path(__file__).with_name("vllm_peer.py")


class VllmSession:
    """`run(c)`: one run of vLLM at concurrency c, the figures `vllm_peer._run` gives. A
    process that dies or answers nothing raises SystemExit with the end of its log."""

    def __init__(self, python: str, spec: dict, threads: int):
        self._dir = tempfile.TemporaryDirectory(prefix="sparkgrid-peers-")
        work = Path(self._dir.name)
        (work / "spec.json").write_text(json.dumps(spec))
        self._log_path = work / "vllm.log"
        self._log = open(self._log_path, "w")
        read, write = os.pipe()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        env.pop("PYTHONPATH", None)
        self._proc = subprocess.Popen(
            [python, str(PEER), str(work / "spec.json"), str(write)], env=env, cwd=work,
            stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, text=True,
            pass_fds=(write,), start_new_session=True)  # its own group: stopped whole
        os.close(write)  # the child holds its own end: EOF here once it exits
        self._results = os.fdopen(read, "r")
        self.version = self._answer()["version"]

    def run(self, c: int) -> dict:
        try:
            self._proc.stdin.write(json.dumps({"c": c}) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            self._fail()
        return self._answer()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(120)
            except subprocess.TimeoutExpired:
                pass
        try:  # vLLM's engine-core and worker processes too, whatever became of the peer
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._proc.wait()
        self._results.close()
        self._log.close()
        self._dir.cleanup()

    def _answer(self) -> dict:
        line = self._results.readline()
        if not line:
            self._fail()
        return json.loads(line)

    def _fail(self):
        code = self._proc.wait()
        self._log.flush()
        tail = self._log_path.read_text()[-4000:]
        self.close()
        raise SystemExit(f"vLLM peer failed ({code}):\n{tail}")
