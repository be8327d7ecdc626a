"""The scheduler's Prometheus metrics, served on the head (`--metrics-port`, default 9464).

- `sparkgrid_scheduler_requests_total{method, code}`: calls by gRPC method and status code;
- `sparkgrid_scheduler_request_seconds{method}`: call latency;
- `sparkgrid_scheduler_time_to_first_token_seconds{model}`: from a job's arrival to its first
  delivered token;
- `sparkgrid_scheduler_routing_decisions_total{worker, policy}`: jobs (and job parts after a
  failover) sent to each worker;
- `sparkgrid_scheduler_failovers_total{model}`: job parts resumed on another worker;
- `sparkgrid_scheduler_inflight{worker}`: job parts streaming from each worker now;
- `sparkgrid_scheduler_queued_jobs{model}`: jobs waiting for the model's full workers now
  (all tenants together: tenants are many, so no tenant label);
- `sparkgrid_scheduler_queue_wait_seconds{model}`: from a job's arrival to its admission to
  the workers (about 0 when they had room);
- `sparkgrid_scheduler_queue_refusals_total{model, limit}`: jobs refused or ended by a bound of
  the queue (`max_waiting_per_tenant`, `max_waiting_per_model`, `max_queue_wait_s`).

Each scheduler has a registry of its own (several can live in one process: tests, benches).

Knows: prometheus_client. Does not know: gRPC, Ray, Redis.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
QUEUE_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, policy: str):
        self.policy = policy
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sparkgrid_scheduler_requests",
                                "API calls by method and status code",
                                ("method", "code"), registry=r)
        self.latency = Histogram("sparkgrid_scheduler_request_seconds", "API call latency",
                                 ("method",), buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("sparkgrid_scheduler_time_to_first_token_seconds",
                              "From a job's arrival to its first delivered token", ("model",),
                              buckets=TTFT_BUCKETS, registry=r)
        self.routed = Counter("sparkgrid_scheduler_routing_decisions",
                              "Job parts sent to each worker", ("worker", "policy"), registry=r)
        self.failovers = Counter("sparkgrid_scheduler_failovers",
                                 "Job parts resumed on another worker", ("model",), registry=r)
        self.inflight = Gauge("sparkgrid_scheduler_inflight", "Job parts streaming from a worker",
                              ("worker",), registry=r)
        self.queued = Gauge("sparkgrid_scheduler_queued_jobs",
                            "Jobs waiting for the model's full workers", ("model",), registry=r)
        self.queue_wait = Histogram("sparkgrid_scheduler_queue_wait_seconds",
                                    "From a job's arrival to its admission to the workers",
                                    ("model",), buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.queue_refusals = Counter("sparkgrid_scheduler_queue_refusals",
                                      "Jobs refused or ended by a bound of the queue",
                                      ("model", "limit"), registry=r)

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Serve /metrics over HTTP on its own thread; returns the server (call .shutdown())."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server

    def call(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def routed_to(self, worker: str) -> None:
        self.routed.labels(worker, self.policy).inc()
