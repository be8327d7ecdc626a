"""The worker side: the DSpark engine, the Ray actor that serves it, the launcher, the shipped
model pair and its training."""

import os

# sparkgrid's processes fork only to exec (redis-server, Ray's daemons). gRPC's fork handlers,
# on by default, can crash or hang such a child when another thread is inside gRPC at that
# moment ("skipping fork() handlers"); gRPC's own advice for fork-then-exec is to turn them off.
# Read when gRPC is first imported, so it is set here, before any module of ours imports it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
