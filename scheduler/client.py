"""A small synchronous client of the API, for the command line and scripts.

`Client(endpoint, api_key)` opens a channel (TLS when `ca_file` is given) and adds the
`authorization: Bearer` metadata to every call. `connection_from_home()` reads the endpoint and
key that `sparkgrid up` wrote to `$SPARKGRID_HOME/up.json`.

Knows: gRPC client calls, up.json. Does not know: the scheduler's insides.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from sparkgrid.home import read_up_file, up_file

API_KEY_ENV = "SPARKGRID_API_KEY"
ENDPOINT_ENV = "SPARKGRID_ENDPOINT"


def connection_from_home(endpoint: str | None, api_key: str | None) -> tuple[str, str]:
    """(endpoint, api key): the given ones, else the environment's, else up.json's."""
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV)
    api_key = api_key or os.environ.get(API_KEY_ENV)
    if endpoint and api_key:
        return endpoint, api_key
    info = read_up_file()
    endpoint, api_key = endpoint or info.get("endpoint"), api_key or info.get("api_key")
    if not (endpoint and api_key):
        missing, env = (("--endpoint", ENDPOINT_ENV) if not endpoint
                        else ("--api-key", API_KEY_ENV))
        raise ValueError(f"{missing}: not given, not in ${env}, and no {up_file()} "
                         "(written by a running `sparkgrid up`)")
    return endpoint, api_key


class Client:
    def __init__(self, endpoint: str, api_key: str, ca_file: str | None = None):
        if ca_file:
            creds = grpc.ssl_channel_credentials(Path(ca_file).read_bytes())
            self.channel = grpc.secure_channel(endpoint, creds)
        else:
            self.channel = grpc.insecure_channel(endpoint)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),)

    def generate(self, prompt: str, timeout_s: float | None = None, **fields):
        """The stream of `GenerateChunk`s."""
        return self.stub.Generate(pb.GenerateRequest(prompt=prompt, **fields),
                                  metadata=self.metadata, timeout=timeout_s)

    def complete(self, prompt: str, timeout_s: float | None = None, **fields) -> pb.Completion:
        return self.stub.Complete(pb.GenerateRequest(prompt=prompt, **fields),
                                  metadata=self.metadata, timeout=timeout_s)

    def workers(self, timeout_s: float = 10.0) -> list:
        return list(self.stub.ListWorkers(pb.ListWorkersRequest(), metadata=self.metadata,
                                          timeout=timeout_s).workers)

    def job(self, job_id: str, timeout_s: float = 10.0) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=self.metadata,
                                timeout=timeout_s)

    def cancel(self, job_id: str, timeout_s: float = 10.0) -> pb.CancelResponse:
        return self.stub.Cancel(pb.CancelRequest(job_id=job_id), metadata=self.metadata,
                                timeout=timeout_s)

    def usage(self, since: str = "", until: str = "", timeout_s: float = 10.0) -> pb.UsageReport:
        return self.stub.GetUsage(pb.GetUsageRequest(since=since, until=until),
                                  metadata=self.metadata, timeout=timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
