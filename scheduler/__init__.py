"""The scheduler: the gRPC door clients knock on, routing, failover, auth, the Redis ledger and
cost reports. It never touches tensors and never runs a model."""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # why: see worker/__init__.py
