"""Helpers for tests that run the project's commands as processes."""

from __future__ import annotations

import queue
import threading
import time

import pytest


class Lines:
    """Reads a process's stdout on a thread, so a test can wait for a line with a deadline:
    a child of the process may keep the pipe open after the process itself died, so EOF alone
    cannot be waited for."""

    def __init__(self, proc):
        self.proc = proc
        self._lines: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)

    def until(self, marker: str, timeout_s: float) -> list[str]:
        """Lines up to the first holding `marker`; fails the test (with what the process said)
        when it does not come in time."""
        seen, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                seen.append(self._lines.get(timeout=0.2))
            except queue.Empty:
                if self.proc.poll() is not None and self._lines.empty():
                    break
                continue
            if marker in seen[-1]:
                return seen
        self.proc.kill()
        pytest.fail(f"no {marker!r} within {timeout_s:g} s (exit {self.proc.poll()}); stdout: "
                    f"{''.join(seen)!r}; stderr: {self.proc.stderr.read()[-2000:]!r}")

    def rest(self, timeout_s: float) -> str:
        """Everything printed after the last `until`, once the process has exited."""
        self.proc.wait(timeout_s)
        time.sleep(0.2)  # let the reader thread take the last lines
        out = []
        while not self._lines.empty():
            out.append(self._lines.get())
        return "".join(out)
