"""`sparkgrid worker --join` around its link sessions (`worker/link.py`): its options say what
to fix, the Ray adapter turns Ray's errors into the session's, and on cuda one worker goes on
each GPU of the operator's Ray. No Ray here: the actor module is faked."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sparkgrid.cli import main
from sparkgrid.registration import new_token
from worker.launcher import LaunchOptions
from worker.link import RayWorker, _places
from worker.link_session import WorkerGone
from worker.worker_config import WorkerConfig


def test_the_adapter_turns_ray_errors_into_the_sessions():
    class Died(Exception):
        pass

    class TaskError(Exception):
        def __init__(self, cause):
            super().__init__(f"traceback ... {cause}")
            self.cause = cause

    class FakeActorModule:
        WorkerDied = Died

    adapter = RayWorker(FakeActorModule, handle=None, name="w1")
    refused = adapter._translated(TaskError(ValueError("params.top_p: expected (0, 1]")))
    assert type(refused) is ValueError and str(refused) == "params.top_p: expected (0, 1]"
    draining = RuntimeError("worker w1 is draining")
    assert adapter._translated(TaskError(draining)) is draining
    assert isinstance(adapter._translated(Died("actor died\nmore")), WorkerGone)


def test_on_cuda_one_worker_per_gpu_of_the_operators_ray_each_named_by_its_index():
    class FakeActorModule:
        @staticmethod
        def gpu_nodes():
            return [{"node_id": "n1", "gpus": 2, "resources": {"accelerator_type:H200": 1}},
                    {"node_id": "n2", "gpus": 1, "resources": {}}]

        @staticmethod
        def accelerator_type(resources):
            return "H200" if "accelerator_type:H200" in resources else None

    config = WorkerConfig(name="rig", target="t", draft="d", gpu_type="NVIDIA H200",
                          device="cuda")
    launch = LaunchOptions("10.0.0.5:6379", config)
    places = _places(FakeActorModule, launch, {"node_id": "n1"})
    assert [(p.config.name, p.node_id, p.num_gpus, p.config.gpu_type) for p in places] == [
        ("rig-0", "n1", 1, "H200"), ("rig-1", "n1", 1, "H200"), ("rig-2", "n2", 1, "NVIDIA H200")]
    FakeActorModule.gpu_nodes = staticmethod(lambda: [{"node_id": "n1", "gpus": 1,
                                                       "resources": {}}])
    assert [p.config.name for p in _places(FakeActorModule, launch, {"node_id": "n1"})] == ["rig"]
    cpu = replace(launch, config=replace(config, device="cpu", gpu_type="cpu"))
    assert [(p.config.name, p.num_gpus) for p in _places(FakeActorModule, cpu,
                                                         {"node_id": "n1"})] == [("rig", 0)]


# -- the command's options ---------------------------------------------------------------------
@pytest.fixture
def models(served_pair):
    return ["--target", served_pair[0], "--draft", served_pair[1]]


@pytest.mark.parametrize("extra, expected", [
    (["--join", "headnode"], "--join headnode: expected HOST:PORT"),
    (["--join", "head:50052", "--token", "sgo_nope"], "--token/--operator-token: malformed"),
    (["--join", "head:50052", "--token", "{token}", "--ca", "{missing}"], "--ca {missing}: "
     "not found"),
    (["--join", "head:50052", "--token", "{token}", "--ca", "{ca}", "--plaintext"],
     "--ca and --plaintext: choose one"),
    (["--join", "head:50052"], "--token is required with --join"),
    ([], "--ray-address is required"),
])
def test_join_options_say_what_to_fix(capsys, monkeypatch, models, tmp_path, extra, expected):
    monkeypatch.delenv("SPARKGRID_OPERATOR_TOKEN", raising=False)
    _, token = new_token()
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    names = {"token": token, "missing": str(tmp_path / "nope.pem"), "ca": str(ca)}
    argv = ["worker", *models, *(arg.format(**names) for arg in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert expected.format(**names) in err
