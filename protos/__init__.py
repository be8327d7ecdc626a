"""The public gRPC API (`inference.proto`, package `sparkgrid.v1`) and its generated stubs.

The stubs are committed; `bash scripts/gen_protos.sh` regenerates them after the .proto changes,
and `tests/unit/test_protos.py` fails while they are stale.
"""
