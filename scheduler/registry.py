"""Which workers the scheduler may route to: a worker is adopted only when its model's tokenizer
is the model's, and (with a registry) when it carries a registration its operator signed.

- Tokenizer: the pinned one (`tokenizer_pins`, by SHA-256 of tokenizer.json) when pins are
  given, and always the one of the workers of that model adopted before it. The first worker of
  a model lends the tokenizer that the scheduler then counts and bills prompt tokens with.
- Registration (`sparkgrid/registration.py`): signed with the token of a live operator, for
  this very worker name, model and tokenizer. The scheduler writes it to Redis under that
  operator (a name registered by one operator is refused to every other). From then on the
  worker's name, GPU type and price are the registration's, whatever its figures say; an actor
  that merely appears in the Ray namespace gets nothing. A revoked operator's workers are
  dropped at the next discovery round and not adopted again.

Knows: the registration format, the store's operator methods, tokenizer checks. Does not know:
Ray (the pool makes the calls), gRPC.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

from scheduler.errors import SchedulerError
from scheduler.model_info import ModelInfo, PromptTokenizer, clean_up_spaces, lent_tokenizer
from sparkgrid.contract import WorkerStats
from sparkgrid.registration import Registration

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registered:
    """A worker's checked registration, as the pool keeps it."""

    operator: str
    kind: str
    gpu_type: str
    price_per_hour: float

    def pin(self, stats: WorkerStats, name: str) -> WorkerStats:
        """The worker's figures with what its registration fixes put back."""
        if (stats.name, stats.gpu_type, stats.price_per_hour) == (
                name, self.gpu_type, self.price_per_hour):
            return stats
        return replace(stats, name=name, gpu_type=self.gpu_type,
                       price_per_hour=self.price_per_hour)


class Registry:
    """Checks registrations against the store's operators; `None` in the pool means none is
    required (a pool without a store: tests of the pool alone)."""

    def __init__(self, store, kind: str = "in-cluster"):
        self.store = store
        self.kind = kind

    async def check(self, name: str, raw, stats: WorkerStats, tokenizer_sha256: str
                    ) -> Registered:
        """The worker's registration, checked and written; ValueError saying why not."""
        if raw is None:
            raise ValueError("it has no registration (start it with `sparkgrid worker "
                             "--operator-token`, or through a worker link)")
        token_id = Registration.token_id_in(raw)
        try:
            found = await self.store.operator_of_token(token_id)
        except SchedulerError as err:  # Redis down: the next round tries again
            raise ValueError(f"its registration cannot be checked now: {err}") from None
        if found is None:
            raise ValueError(f"registration: operator token {token_id} is unknown or revoked")
        operator, digest = found
        record = Registration.from_signed(raw, digest)
        for field, signed, actual in (("worker", record.worker, name),
                                      ("model_id", record.model_id, stats.model_id),
                                      ("tokenizer_sha256", record.tokenizer_sha256,
                                       tokenizer_sha256),
                                      ("kind", record.kind, self.kind)):
            if signed != actual:
                raise ValueError(f"registration.{field}: signed for {signed!r:.80}, but this "
                                 f"worker's is {actual!r:.80}")
        try:
            await self.store.register_worker(operator, record)
        except SchedulerError as err:  # taken by another operator, revoked, Redis down
            raise ValueError(f"registration: {err}") from None
        return Registered(operator, record.kind, record.gpu_type, record.price_per_hour)

    async def revoked(self) -> set[str]:
        """Operators revoked now (empty while Redis cannot say)."""
        try:
            return await self.store.revoked_operators()
        except SchedulerError as err:
            log.warning("revoked operators cannot be read: %s", err)
            return set()


async def lent_tokenizer_of(handle, stats: WorkerStats, models: dict[str, ModelInfo],
                            pins: dict[str, str] | None, timeout_s: float = 30.0
                            ) -> tuple[tuple[bytes, bool], str]:
    """((tokenizer.json, whether its decode cleans up spaces), the file's SHA-256) the worker
    lends, when it is its model's (see the module's doc); ValueError saying why not. Nothing is
    kept: see `remember_model`."""
    files = await asyncio.wait_for(handle.tokenizer_files.remote(), timeout_s)
    data, digest = lent_tokenizer(stats.model_id, files, models.get(stats.model_id), pins)
    return (data, clean_up_spaces(files)), digest


async def remember_model(models: dict[str, ModelInfo], stats: WorkerStats,
                         data: tuple[bytes, bool], digest: str) -> None:
    """The first adopted worker of a model sets the tokenizer the scheduler counts it with."""
    if stats.model_id not in models:
        tokenizer = await asyncio.to_thread(PromptTokenizer, *data)
        models[stats.model_id] = ModelInfo(stats.model_id, tokenizer,
                                           stats.max_context or 1 << 30, len(tokenizer), digest)
