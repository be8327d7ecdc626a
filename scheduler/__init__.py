"""The scheduler: the gRPC door clients knock on, routing, failover, auth, the Redis ledger and
cost reports. It never touches tensors and never runs a model."""
