"""The committed gRPC stubs are what `scripts/gen_protos.sh` makes of the current .proto."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py", "worker_pb2.py",
         "worker_pb2.pyi", "worker_pb2_grpc.py")


def test_committed_stubs_are_current(tmp_path):
    subprocess.run(["bash", str(ROOT / "scripts/gen_protos.sh"), str(tmp_path)], check=True,
                   env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    for name in STUBS:
        fresh = (tmp_path / "protos" / name).read_text()
        assert fresh == (ROOT / "protos" / name).read_text(), \
            f"protos/{name} is stale: run `bash scripts/gen_protos.sh`"


def test_the_contract_names_exist():
    from protos import inference_pb2, inference_pb2_grpc

    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    assert inference_pb2.DESCRIPTOR.package == "sparkgrid.v1"
    assert ({"Generate", "Complete", "Cancel", "GetJob", "ListWorkers", "GetUsage"}
            <= set(service.methods_by_name))
    assert service.methods_by_name["Generate"].server_streaming
    fields = set(inference_pb2.GenerateRequest.DESCRIPTOR.fields_by_name)
    assert {"prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "request_id"} <= fields
    assert ({"job_id", "text", "token_ids", "finish_reason", "usage"}
            <= set(inference_pb2.GenerateChunk.DESCRIPTOR.fields_by_name))
    assert hasattr(inference_pb2_grpc, "InferenceServicer")


def test_the_worker_link_names_exist():
    from protos import worker_pb2, worker_pb2_grpc

    service = worker_pb2.DESCRIPTOR.services_by_name["WorkerLink"]
    link = service.methods_by_name["Link"]
    assert link.client_streaming and link.server_streaming
    assert ({"hello", "figures", "chunk", "ended", "score"}
            <= set(worker_pb2.FromWorker.DESCRIPTOR.fields_by_name))
    assert ({"welcome", "generate", "cancel", "renew", "score"}
            <= set(worker_pb2.ToWorker.DESCRIPTOR.fields_by_name))
    assert hasattr(worker_pb2_grpc, "WorkerLinkServicer")
