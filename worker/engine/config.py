"""Engine and per-request settings: dataclasses validated on creation, never mutated after.

Every error names the field that is wrong and what was expected, so that a caller (the
worker actor, the gRPC scheduler) can hand it to a user unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from worker.engine.prefix_scheduler import parse_policy


def _require(ok: bool, field_name: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"{field_name}: expected {expected}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
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
        _require(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                 and 0 <= self.temperature <= 100, "temperature", "a number in [0, 100]",
                 self.temperature)
        _require(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p",
                 "a number in (0, 1]", self.top_p)
        _require(isinstance(self.top_k, int) and self.top_k >= 0, "top_k",
                 "an integer >= 0", self.top_k)
        _require(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
                 "seed", "None or an integer in [0, 2**63)", self.seed)
        _require(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
                 "an integer >= 1", self.max_tokens)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        _require(all(isinstance(s, str) and s for s in stop), "stop",
                 "non-empty strings", self.stop)
        object.__setattr__(self, "stop", stop)


@dataclass(frozen=True)
class Resume:
    """Where a request continues when another engine began it (the scheduler's failover)."""

    token_ids: tuple[int, ...] = ()
    """Tokens already generated (and delivered); they extend the prompt here."""
    num_chars: int = 0
    """Characters of their text the client already has; only later text is streamed, so a
    character split over tokens or text held back for a stop string is neither lost nor
    repeated."""

    def __post_init__(self):
        object.__setattr__(self, "token_ids", tuple(self.token_ids))
        _require(all(isinstance(t, int) and not isinstance(t, bool) for t in self.token_ids),
                 "resume.token_ids", "a list of token ids", self.token_ids)
        _require(isinstance(self.num_chars, int) and self.num_chars >= 0, "resume.num_chars",
                 "an integer >= 0", self.num_chars)


@dataclass(frozen=True)
class EngineConfig:
    """One engine on one device."""

    device: str = "cpu"
    """Torch device: `cpu`, `cuda`, `cuda:1`, ..."""
    dtype: str | None = None
    """Weights and cache dtype (`float32`, `bfloat16`, `float16`, `float64`); default
    bfloat16 on CUDA, float32 elsewhere."""
    policy: str = "prefix"
    """Default verification policy: `ar`, `fixed`, `threshold` or `prefix` (DSpark Alg. 1)."""
    threshold: float = 0.5
    """Confidence threshold of the `threshold` policy."""
    max_num_seqs: int = 64
    """Most requests decoding at once."""
    max_batch_tokens: int = 512
    """Most verify tokens in one target forward (sum over requests of 1 + draft tokens)."""
    max_prefill_tokens: int = 4096
    """Most prompt tokens prefilled in one forward (a longer prompt runs alone)."""
    kv_budget_tokens: int = 65536
    """Target KV cache budget in tokens (all requests together)."""
    draft_kv_budget_tokens: int = 65536
    """Draft context KV cache budget in tokens."""
    kv_block_size: int = 16
    """Tokens per cache block."""
    profile_sps: bool = True
    """Profile SPS(B) at start (needed by `prefix`; cached on disk)."""
    sps_cache_dir: str | None = None
    """Where profiled SPS tables are cached; default `~/.cache/sparkgrid/sps`."""
    sps_context_len: int = 256
    """Context length per request used while profiling SPS."""
    record_confidence: bool = False
    """Keep (raw confidence logits, acceptance) of every drafted block, to fit STS from."""
    extra_eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """End-of-sequence ids besides the model's own."""
    online_calibration: bool = True
    """Correct the draft's confidence per position from this engine's own verifications
    (`online_calibration`), separately for greedy and sampled requests."""
    draft_vocab_size: int = 0
    """Draft only the N tokens the target writes most often (`draft_vocab`; needs the draft's
    `draft_vocab.json` ranking); 0 = the full vocabulary."""

    def __post_init__(self):
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda', "
                             f"got {self.device!r}") from None
        _require(self.dtype is None or self.dtype in _DTYPES, "dtype",
                 f"one of {sorted(_DTYPES)}", self.dtype)
        parse_policy(self.policy, field="policy")
        _require(0 <= self.threshold <= 1, "threshold", "a number in [0, 1]", self.threshold)
        for name in ("max_num_seqs", "max_batch_tokens", "max_prefill_tokens",
                     "kv_budget_tokens", "draft_kv_budget_tokens", "kv_block_size",
                     "sps_context_len"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name, "an integer >= 1", value)
        _require(isinstance(self.draft_vocab_size, int) and self.draft_vocab_size >= 0,
                 "draft_vocab_size", "an integer >= 0 (0: the full vocabulary)",
                 self.draft_vocab_size)
        _require(self.max_batch_tokens >= self.max_num_seqs, "max_batch_tokens",
                 f">= max_num_seqs ({self.max_num_seqs})", self.max_batch_tokens)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return _DTYPES[self.dtype]
        return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}
