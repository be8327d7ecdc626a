"""The typed contract between a worker and the scheduler: every message either side sends.

- scheduler -> worker: `SamplingParams` (a job's parameters) and `Resume` (where a job
  continues when another worker began it);
- worker -> scheduler: `Chunk`s of a job's output (with `Usage` and `SpecCounts`) and
  `WorkerStats`, the worker's identity and figures.

On the wire (a Ray call today) a message is a plain dict of exactly its fields (`to_dict`),
read back with `from_dict`, which is strict: an unknown field, a missing one, a value of the
wrong type or out of range raises `ContractError` naming the field. A field renamed on one side
therefore fails loudly on the other, and what a worker sends (a stranger's machine) is checked
before the scheduler uses it. The dataclasses check themselves on creation too, so neither
side can build a message the other would refuse.

Knows: the fields, their types and ranges. Does not know: Ray, gRPC, the engine, routing.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from sparkgrid.checks import require
from sparkgrid.costs import SPSTable

NAMESPACE = "sparkgrid"
"""The Ray namespace of every sparkgrid worker actor."""
FINISH_REASONS = ("stop", "length", "abort")
WORKER_STATES = ("loading", "ready", "draining", "failed", "stopped")
VERIFY_POLICIES = ("ar", "fixed", "threshold", "prefix")
GREEDY_BELOW = 1e-5
"""A temperature above 0 but below this is greedy decoding (as 0): dividing logits by such a
number overflows to infinity and the probabilities to NaN, and the distribution it stands for
is the argmax anyway."""
MAX_TOKENS_PER_S = 1_000_000.0
MAX_STEPS_PER_S = 1_000_000.0
"""Plausibility bounds on a worker's claimed tokens/s and SPS table (forwards per second): far
above what one worker does, so they refuse only absurd figures; whether a plausible claim is
true is for the scheduler to observe (`scheduler.observed`)."""


class ContractError(ValueError):
    """A message does not match the contract; the text names the message and the field."""


# -- checking fields by their annotations ----------------------------------------------------
def _check_value(where: str, hint, value):
    """`value` checked (and normalized: lists to tuples, dicts to dataclasses) against the
    annotation `hint`; numbers must be finite and >= 0 (every count and figure here is)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(where, inner, value)
    if hint is str:
        if not isinstance(value, str):
            raise ContractError(f"{where}: expected a string, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ContractError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        ok = (not isinstance(value, bool) and isinstance(value, (int, float) if hint is float
                                                         else int))
        if not ok or not math.isfinite(value) or value < 0:
            kind = "an integer" if hint is int else "a number"
            raise ContractError(f"{where}: expected {kind} >= 0, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ContractError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_check_value(f"{where}[{i}]", args[0], v) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ContractError(f"{where}: expected an object, got {type(value).__name__}")
        return {_check_value(f"{where} key", args[0], k): _check_value(f"{where}.{k}", args[1], v)
                for k, v in value.items()}
    if hint is SPSTable:
        if isinstance(value, SPSTable):
            return value
        if not isinstance(value, dict):
            raise ContractError(f"{where}: expected an SPS table, got {type(value).__name__}")
        try:
            return SPSTable(**value)
        except (TypeError, ValueError) as err:
            raise ContractError(f"{where}: {err}") from None
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ContractError(f"{where}: expected an object, got {type(value).__name__}")
        return hint.from_dict(value, where)
    raise TypeError(f"{where}: no check for the annotation {hint!r}")  # a bug of this module


class _Message:
    """A contract message: fields checked by their annotations on creation; `to_dict` /
    `from_dict` are its wire form."""

    def _check_fields(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _check_value(f"{self._name()}.{f.name}", hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)

    @classmethod
    def _name(cls) -> str:
        return cls.__name__

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _Message):
                value = value.to_dict()
            elif isinstance(value, SPSTable):
                value = {"batch_tokens": list(value.batch_tokens),
                         "steps_per_second": list(value.steps_per_second)}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data, where: str | None = None):
        """The message read from its wire form; ContractError naming the field otherwise."""
        where = where or cls._name()
        if isinstance(data, cls):
            data = data.to_dict()
        if not isinstance(data, dict):
            raise ContractError(f"{where}: expected an object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ContractError(f"{where}: unknown fields {unknown}")
        missing = sorted(name for name, f in fields.items() if name not in data
                         and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if missing:
            raise ContractError(f"{where}: missing fields {missing}")
        hints = typing.get_type_hints(cls)
        values = {k: _check_value(f"{where}.{k}", hints[k], v) for k, v in data.items()}
        try:
            return cls(**values)
        except ContractError:
            raise
        except ValueError as err:
            raise ContractError(f"{where}: {err}") from None


# -- scheduler -> worker ------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams(_Message):
    """How one request samples and when it stops (a job's parameters)."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax), and so does anything below GREEDY_BELOW."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 disables it."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables it."""
    seed: int | None = None
    """Seed of this request's own random stream; None draws one."""
    max_tokens: int = 64
    """Most tokens to generate (the finish reason is `length` when reached)."""
    stop: tuple[str, ...] = ()
    """Strings that end generation when they appear in the output (not included in it)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks)."""

    def __post_init__(self):
        require(isinstance(self.temperature, (int, float))
                and not isinstance(self.temperature, bool)
                and math.isfinite(self.temperature) and 0 <= self.temperature <= 100,
                "temperature", "a number in [0, 100]", self.temperature)
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)
        require(isinstance(self.top_p, (int, float)) and not isinstance(self.top_p, bool)
                and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        require(isinstance(self.top_k, int) and not isinstance(self.top_k, bool)
                and self.top_k >= 0, "top_k", "an integer >= 0", self.top_k)
        require(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                      and 0 <= self.seed < 2**63),
                "seed", "None or an integer in [0, 2**63)", self.seed)
        require(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool)
                and self.max_tokens >= 1, "max_tokens", "an integer >= 1", self.max_tokens)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        require(isinstance(stop, (list, tuple)) and all(isinstance(s, str) and s for s in stop),
                "stop", "non-empty strings", self.stop)
        object.__setattr__(self, "stop", tuple(stop))
        require(isinstance(self.ignore_eos, bool), "ignore_eos", "true or false",
                self.ignore_eos)


@dataclass(frozen=True)
class Resume(_Message):
    """Where a request continues when another engine began it (the scheduler's failover)."""

    token_ids: tuple[int, ...] = ()
    """Tokens already generated (and delivered); they extend the prompt here."""
    num_chars: int = 0
    """Characters of their text the client already has; only later text is streamed, so a
    character split over tokens or text held back for a stop string is neither lost nor
    repeated."""

    def __post_init__(self):
        require(isinstance(self.token_ids, (list, tuple)), "resume.token_ids",
                "a list of token ids", self.token_ids)
        object.__setattr__(self, "token_ids", tuple(self.token_ids))
        require(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                    for t in self.token_ids), "resume.token_ids", "a list of token ids",
                self.token_ids)
        require(isinstance(self.num_chars, int) and not isinstance(self.num_chars, bool)
                and self.num_chars >= 0, "resume.num_chars", "an integer >= 0", self.num_chars)


# -- worker -> scheduler ------------------------------------------------------------------------
@dataclass(frozen=True)
class Usage(_Message):
    """A job's billed tokens on the worker that ran it."""

    prompt_tokens: int
    completion_tokens: int

    def __post_init__(self):
        self._check_fields()


@dataclass(frozen=True)
class SpecCounts(_Message):
    """A job's speculation so far (every chunk carries it, so that a caller whose worker dies
    mid-job still has them)."""

    draft_tokens: int = 0
    verified_tokens: int = 0
    accepted_tokens: int = 0
    spec_steps: int = 0

    def __post_init__(self):
        self._check_fields()


@dataclass(frozen=True)
class Chunk(_Message):
    """One increment of a job's output, in the order produced."""

    job_id: str
    token_ids: tuple[int, ...]
    """The new tokens of this increment."""
    text: str
    """The new text (may lag the tokens while a multi-byte character is incomplete)."""
    finish_reason: str | None = None
    """Set on the last chunk only: `stop`, `length` or `abort`."""
    usage: Usage | None = None
    """Last chunk only (and always there): the job's prompt and completion tokens."""
    spec: SpecCounts = field(default_factory=SpecCounts)

    def __post_init__(self):
        self._check_fields()
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise ContractError(f"Chunk.finish_reason: expected one of {FINISH_REASONS}, got "
                                f"{self.finish_reason!r}")
        if (self.finish_reason is None) != (self.usage is None):
            raise ContractError("Chunk.usage: expected on the last chunk (the one with a "
                                "finish_reason) and only there")


@dataclass(frozen=True)
class WorkerStats(_Message):
    """What a worker reports of itself: who it is (fixed) and how it is doing (its latest
    figures; zeros until its engine has loaded)."""

    name: str
    node_id: str
    node_ip: str
    device: str
    """The torch device (`cpu`, `cuda:0`)."""
    device_name: str
    """What the device says it is."""
    gpu_type: str
    """What the operator says it is: routing and cost reports group by it."""
    price_per_hour: float
    """The operator's asked price, USD per hour."""
    model_id: str
    target: str
    draft: str | None
    verify_policy: str
    """How the engine chooses verify lengths (`prefix` with a draft, `ar` without)."""
    max_batch_tokens: int
    """Most tokens of one verify forward."""
    max_num_seqs: int
    """Most requests the engine decodes at once; more wait."""
    max_context: int | None
    emulate_slowdown: float
    version: dict[str, str]
    """Package versions (`sparkgrid`, `torch`, `ray`)."""
    started_at: float
    state: str
    """`loading`, `ready`, `draining`, `failed` or `stopped`."""
    uptime_s: float
    error: str | None = None
    num_waiting: int = 0
    num_running: int = 0
    remaining_tokens: int = 0
    """Tokens still to generate for the waiting and running requests."""
    tokens_per_s: float = 0.0
    """Generated tokens per second over the recent window, as measured."""
    mean_accept_length: float | None = None
    """Tokens committed per request per step over recent requests; None before any."""
    batch_size: int = 0
    cache_used_fraction: float = 0.0
    cache_reserved_fraction: float = 0.0
    sps: SPSTable | None = None
    """The profiled SPS(B) (None: not profiled, e.g. no draft)."""
    steps: int = 0
    requests: int = 0
    """Jobs accepted since the worker started."""
    generated_tokens: int = 0

    def __post_init__(self):
        self._check_fields()
        for name in ("name", "gpu_type", "model_id"):  # what the ledger books under
            if not getattr(self, name).strip():
                raise ContractError(f"WorkerStats.{name}: expected a non-empty string")
        if self.state not in WORKER_STATES:
            raise ContractError(f"WorkerStats.state: expected one of {WORKER_STATES}, got "
                                f"{self.state!r}")
        if self.verify_policy not in VERIFY_POLICIES:
            raise ContractError(f"WorkerStats.verify_policy: expected one of "
                                f"{VERIFY_POLICIES}, got {self.verify_policy!r}")
        if not self.max_num_seqs >= 1 or not self.max_batch_tokens >= 1:
            raise ContractError(f"WorkerStats.max_num_seqs / max_batch_tokens: expected >= 1, "
                                f"got {self.max_num_seqs} / {self.max_batch_tokens}")
        for name in ("cache_used_fraction", "cache_reserved_fraction"):
            if getattr(self, name) > 1:
                raise ContractError(f"WorkerStats.{name}: expected a fraction in [0, 1], got "
                                    f"{getattr(self, name)!r}")
        if self.tokens_per_s > MAX_TOKENS_PER_S:
            raise ContractError(f"WorkerStats.tokens_per_s: expected at most "
                                f"{MAX_TOKENS_PER_S:,.0f}, got {self.tokens_per_s!r}")
        if self.sps is not None and max(self.sps.steps_per_second) > MAX_STEPS_PER_S:
            raise ContractError(f"WorkerStats.sps.steps_per_second: expected at most "
                                f"{MAX_STEPS_PER_S:,.0f}, got {max(self.sps.steps_per_second)!r}")
        if self.mean_accept_length is not None and \
                self.mean_accept_length > self.max_batch_tokens:  # a step commits what it verified
            raise ContractError(f"WorkerStats.mean_accept_length: expected at most "
                                f"max_batch_tokens ({self.max_batch_tokens}), got "
                                f"{self.mean_accept_length!r}")
