"""Exit 0 when the sparkgrid scheduler on this host answers the standard gRPC health check
(`grpc.health.v1.Health/Check`, service "") with SERVING, else print why and exit 1.

For container HEALTHCHECKs and Kubernetes exec probes; run it with the Python sparkgrid is
installed in (it needs grpcio and grpcio-health-checking). Reads the same variables as
start-head.sh: SPARKGRID_GRPC_PORT [50051]; when SPARKGRID_TLS_CERT is set, the check goes
over TLS, trusting SPARKGRID_HEALTH_CA [the certificate itself, right for a self-signed one]
and expecting the name SPARKGRID_HEALTH_SERVER_NAME [the name the certificate was made for
must then be given, as 127.0.0.1 is rarely in it].
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    port = os.environ.get("SPARKGRID_GRPC_PORT") or "50051"
    target = f"127.0.0.1:{port}"
    cert = os.environ.get("SPARKGRID_TLS_CERT")
    if cert:
        with open(os.environ.get("SPARKGRID_HEALTH_CA") or cert, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        name = os.environ.get("SPARKGRID_HEALTH_SERVER_NAME")
        options = [("grpc.ssl_target_name_override", name)] if name else []
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target)
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=3)
    except grpc.RpcError as err:
        print(f"unhealthy: {target}: {err.code().name} {err.details()}", file=sys.stderr)
        return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {target} is "
              f"{health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
