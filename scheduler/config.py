"""The scheduler's settings: one frozen dataclass, validated on creation, passed in explicitly.

Knows: every limit and interval the scheduler runs with. Does not know: gRPC, Ray, Redis, the
environment (`sparkgrid.options.redis_url` picks the Redis).
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.router import POLICIES
from sparkgrid.checks import require
from sparkgrid.options import DEFAULT_REDIS_URL

KEEP_TEXT_S = 24 * 3600.0
"""Default time a finished job's text and token ids are kept (`keep_text_s`)."""
KEEP_JOBS_S = 30 * 86400.0
"""Default time a finished job's record, events and request id are kept (`keep_jobs_s`)."""


@dataclass(frozen=True)
class SchedulerConfig:
    """One scheduler on a platform's head node."""

    ray_address: str = "auto"
    """The Ray cluster whose worker actors (namespace `sparkgrid`) serve the jobs."""
    redis_url: str = DEFAULT_REDIS_URL
    """The job store, API keys and usage ledger."""
    redis_prefix: str = "sparkgrid"
    """Prefix of every Redis key (several networks can share one Redis)."""
    host: str = "127.0.0.1"
    """Interface the gRPC server listens on (`0.0.0.0` for all)."""
    grpc_port: int = 50051
    """Port of the gRPC server; 0 picks a free one."""
    metrics_port: int | None = None
    """Port of the Prometheus metrics endpoint (`/metrics`); None: not served."""
    tls_cert: str | None = None
    """PEM certificate chain; with `tls_key`, the server speaks TLS only."""
    tls_key: str | None = None
    """PEM private key of `tls_cert`."""
    prices: str | None = None
    """The price book (TOML, see `prices.py`); None: the one shipped with sparkgrid."""
    tokenizer_pins: str | None = None
    """A TOML file of `[tokenizers]` model = "SHA-256 of its tokenizer.json": only those models
    are served, by workers lending exactly that tokenizer. None: a model's first worker sets
    its tokenizer (every later worker of the model must lend the same one)."""
    policy: str = "fastest"
    """Routing policy: `fastest` (smallest predicted completion time), `round_robin`, `jsq`,
    `p2c`."""
    default_model: str | None = None
    """Model of requests that name none; None: the only model served (an error if several)."""
    default_max_tokens: int = 256
    """`max_tokens` of a request that gives 0."""
    max_tokens_cap: int = 2048
    """Largest `max_tokens` a request may ask for (the model's context limits it further)."""
    max_prompt_chars: int = 65536
    """Longest prompt in characters, checked before tokenizing."""
    max_stop_strings: int = 8
    max_stop_chars: int = 64
    max_request_id_chars: int = 128
    max_queue_per_worker: int = 256
    """Requests queued on one worker (waiting + running + just sent) before it counts as full;
    when every worker of a model is full, new jobs wait (`scheduler/fair_queue.py`)."""
    max_waiting_per_tenant: int = 1000
    """Jobs of one tenant waiting for a full model's workers; more get RESOURCE_EXHAUSTED."""
    max_waiting_per_model: int = 10_000
    """Jobs of all tenants waiting for a full model's workers; more get RESOURCE_EXHAUSTED."""
    max_queue_wait_s: float = 30.0
    """Longest wait for a full model's workers; then the job fails with RESOURCE_EXHAUSTED."""
    max_attempts: int = 3
    """Workers a job may try (the first and its failovers) before it fails."""
    stall_timeout_s: float = 60.0
    """A stream with no new chunk for this long counts as broken (a hung worker)."""
    stats_interval_s: float = 0.5
    """How often each worker's figures are read."""
    discovery_interval_s: float = 2.0
    """How often the Ray namespace is listed for new and lost workers."""
    ledger_retry_s: float = 1.0
    """Pause between retries of a ledger write while Redis is down."""
    lease_s: float = 15.0
    """Time to live of this scheduler's lease in Redis, renewed every `lease_s / 3`; the jobs of
    a scheduler whose lease lapsed are settled as failed by any live one (checked as often)."""
    keep_text_s: float = KEEP_TEXT_S
    """How long a final job's text and token ids are kept (0: forever). 24 h: the privacy-
    sensitive part, kept long enough for a client to fetch or repeat it after a day's outage."""
    worker_link_port: int | None = None
    """Port of the worker link (`scheduler/link_server.py`), the door of workers outside the
    Ray cluster; None: no link (0 picks a free port). Listens on `host`."""
    worker_link_cert: str | None = None
    """PEM certificate chain of the link; with `worker_link_key`. Required unless
    `worker_link_plaintext`."""
    worker_link_key: str | None = None
    worker_link_plaintext: bool = False
    """Serve the link without TLS (operator tokens cross the network in the clear: tests and
    private networks only)."""
    require_registration: bool = False
    """Route only to workers whose operator signed their registration (`scheduler/registry.py`).
    `sparkgrid head` and `sparkgrid up` require it unless told otherwise; False here serves any
    worker actor of the namespace (tests of one part at a time)."""
    trusted_workers: tuple[str, ...] = ()
    """Workers the platform runs itself: never audited, and the ones that audit the others
    (`scheduler/auditor.py`). None named: no audits."""
    audit_rate: float = 0.02
    """Share of an untrusted worker's jobs audited once its first `audit_first_jobs` were."""
    audit_first_jobs: int = 20
    """A new worker's jobs audited in full."""
    figure_boards: int = 1
    """Figures boards (shards) the workers push their figures to (`sparkgrid/board.py`); the
    first scheduler to start sets it for the cluster. One takes about 600 pushes/s (300 workers
    at two a second); use more above a few hundred workers."""
    bill_journal_dir: str | None = None
    """Where settlements waiting for Redis are kept on disk (`bill_journal.py`); None: in memory
    only (a crash during a Redis outage then loses them). `sparkgrid head` and `sparkgrid up`
    use `$SPARKGRID_HOME/bills`."""
    drain_delay_s: float = 0.0
    """On stop: how long the scheduler keeps taking calls after its health turns NOT_SERVING,
    so that a load balancer in front of several schedulers stops sending it any first."""
    keep_jobs_s: float = KEEP_JOBS_S
    """How long a final job's record, events and request id are kept (0: forever). 30 days:
    support and billing disputes reach back a month; the ledger's totals are never expired."""

    def __post_init__(self):
        require(self.policy in POLICIES, "policy", f"one of {POLICIES}", self.policy)
        require(isinstance(self.audit_rate, (int, float)) and 0 <= self.audit_rate <= 1,
                "audit_rate", "a share in [0, 1]", self.audit_rate)
        require(isinstance(self.audit_first_jobs, int) and self.audit_first_jobs >= 0,
                "audit_first_jobs", "an integer >= 0", self.audit_first_jobs)
        require(isinstance(self.figure_boards, int) and 1 <= self.figure_boards <= 64,
                "figure_boards", "an integer in [1, 64]", self.figure_boards)
        require(0 <= self.grpc_port <= 65535, "grpc_port", "a port in [0, 65535]", self.grpc_port)
        require(self.metrics_port is None or 0 <= self.metrics_port <= 65535, "metrics_port",
                 "a port in [0, 65535] or None", self.metrics_port)
        require((self.tls_cert is None) == (self.tls_key is None), "tls_cert",
                 "given together with tls_key", self.tls_cert)
        require(self.worker_link_port is None or 0 <= self.worker_link_port <= 65535,
                "worker_link_port", "a port in [0, 65535] or None", self.worker_link_port)
        require(self.worker_link_port is None or self.worker_link_plaintext or (
            self.worker_link_cert is not None and self.worker_link_key is not None),
            "worker_link_cert", "given with worker_link_key (TLS), unless worker_link_plaintext",
            self.worker_link_cert)
        require(self.redis_url.startswith(("redis://", "rediss://", "unix://")), "redis_url",
                 "a redis://, rediss:// or unix:// URL", shown_url(self.redis_url))
        for name in ("default_max_tokens", "max_tokens_cap", "max_prompt_chars", "max_stop_strings",
                     "max_stop_chars", "max_request_id_chars", "max_queue_per_worker",
                     "max_attempts"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, "an integer >= 1", value)
        require(self.default_max_tokens <= self.max_tokens_cap, "default_max_tokens",
                 f"at most max_tokens_cap ({self.max_tokens_cap})", self.default_max_tokens)
        for name in ("stall_timeout_s", "stats_interval_s", "discovery_interval_s",
                     "ledger_retry_s", "lease_s"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and value > 0, name, "a number > 0", value)
        check_retention(self.keep_text_s, self.keep_jobs_s)


def check_retention(keep_text_s: float, keep_jobs_s: float) -> None:
    """ValueError naming the field unless both are seconds >= 0 (0: forever) and the text is
    kept no longer than its record (it would outlive what points at it)."""
    for name, value in (("keep_jobs_s", keep_jobs_s), ("keep_text_s", keep_text_s)):
        require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
                and value != float("inf"), name, "seconds >= 0 (0: forever)", value)
    if keep_jobs_s:
        require(0 < keep_text_s <= keep_jobs_s, "keep_text_s",
                f"at most keep_jobs_s ({keep_jobs_s:g} s), and not 0 (forever) while records "
                "expire", keep_text_s)


def shown_url(url: str) -> str:
    """The URL as it may be shown: `redis://:secret@host` becomes `redis://:***@host`."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url



def load_tokenizer_pins(path: str | None) -> dict[str, str] | None:
    """The pins file read and checked (ValueError naming the file and the entry), or None."""
    if path is None:
        return None
    import re
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"tokenizer_pins: cannot read {path}: {err}") from None
    pins = data.get("tokenizers")
    if not isinstance(pins, dict) or set(data) != {"tokenizers"}:
        raise ValueError(f"tokenizer_pins: {path} must hold one table, [tokenizers]")
    for model, digest in pins.items():
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise ValueError(f"tokenizer_pins: {path}: {model!r}: expected a SHA-256 in hex "
                             f"(64 characters 0-9a-f), got {digest!r}")
    return dict(pins)
