"""`sparkgrid worker` refuses wrong arguments at once, saying what to fix (no Ray cluster
is started: every case here fails before joining one)."""

import socket
import time

import pytest
import torch

from sparkgrid.cli import main


@pytest.fixture
def models(served_pair):
    return ["--target", served_pair[0], "--draft", served_pair[1]]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def _error(capsys, argv) -> str:
    start = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - start < 20, "a bad argument must fail fast"
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_missing_model_directory(capsys, models, tmp_path):
    err = _error(capsys, ["worker", "--ray-address", "auto", "--target", str(tmp_path / "nope"),
                          "--draft", models[3]])
    assert "--target" in err and "no such directory" in err


def test_a_directory_that_is_not_a_model(capsys, models, tmp_path):
    err = _error(capsys, ["worker", "--ray-address", "auto", "--target", models[1],
                          "--draft", str(tmp_path)])
    assert "--draft" in err and "config.json" in err


def test_target_is_required(capsys):
    assert "--target is required" in _error(capsys, ["worker", "--ray-address", "auto"])


def test_a_gpu_index_is_refused_because_ray_assigns_the_gpu(capsys, models):
    err = _error(capsys, ["worker", "--ray-address", "auto", *models, "--device", "cuda:1"])
    assert "--device cuda:1" in err and "pass --device cuda" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_asked_on_a_node_without_one(capsys, models):
    err = _error(capsys, ["worker", "--ray-address", "auto", *models, "--device", "cuda"])
    assert "--device cuda" in err and "no CUDA device" in err


def test_unreachable_ray_address(capsys, models):
    address = f"127.0.0.1:{_closed_port()}"
    err = _error(capsys, ["worker", "--ray-address", address, *models])
    assert f"--ray-address {address}" in err and "nothing answers" in err


def test_malformed_ray_address(capsys, models):
    err = _error(capsys, ["worker", "--ray-address", "headnode", *models])
    assert "--ray-address headnode" in err and "host:port" in err


@pytest.mark.parametrize("option, value, field", [
    ("--name", "my worker!", "name"),
    ("--price-per-hour", "-2", "--price-per-hour"),
    ("--emulate-slowdown", "0.5", "--emulate-slowdown"),
    ("--draft-vocab", "-1", "--draft-vocab"),
    ("--max-batch-tokens", "0", "--max-batch-tokens"),
    ("--ready-timeout", "0", "--ready-timeout"),
])
def test_bad_values_name_the_field(capsys, models, option, value, field):
    err = _error(capsys, ["worker", "--ray-address", "auto", *models, option, value])
    assert field in err


def test_stop_needs_a_reachable_cluster(capsys):
    address = f"127.0.0.1:{_closed_port()}"
    assert "nothing answers" in _error(capsys, ["worker", "--ray-address", address, "--stop", "w1"])
