"""Engine settings: a dataclass validated on creation, never mutated after. The per-request
settings (`SamplingParams`, `Resume`) are the worker contract's (`sparkgrid.contract`), so the
scheduler builds exactly what the engine runs; they are re-exported here.

Every error names the field that is wrong and what was expected, so that a caller (the
worker actor, the gRPC scheduler) can hand it to a user unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparkgrid.checks import require
from sparkgrid.contract import Resume, SamplingParams
from worker.engine.verify_policy import parse_policy

__all__ = ["EngineConfig", "Resume", "SamplingParams"]


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
    """Where profiled cost tables are cached; default `~/.cache/sparkgrid/sps` (each is spot-
    checked on reading: `profile_cache`)."""
    sps_context_len: int = 256
    """Context length per request used while profiling SPS."""
    record_confidence: bool = False
    """Keep (raw confidence logits, acceptance) of every drafted block, to fit STS from."""
    extra_eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """End-of-sequence ids besides the model's own."""
    online_calibration: bool = True
    """Correct the draft's confidence per position from this engine's own verifications
    (`online_calibration`), separately for greedy and sampled requests."""
    online_costs: bool = True
    """Let the draft gate correct its profiled step costs by how this engine's drafting and
    plain steps really run (`online_costs`)."""
    online_regimes: bool = True
    """Run greedy `prefix` steps, at each load, in the regime that has given the more tokens
    per second there: the draft gate's choice, or nobody drafting (`regimes`)."""
    keep_freed_memory: bool = True
    """On a CPU, set the process's allocator to keep freed memory for later forwards instead of
    returning it to the system (`host_memory`; a prefill's temporaries otherwise come back as
    fresh pages, each a page fault)."""
    draft_vocab_size: int = 0
    """Draft only the N tokens the target writes most often (`draft_vocab`; needs the draft's
    `draft_vocab.json` ranking); 0 = the full vocabulary."""

    def __post_init__(self):
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda', "
                             f"got {self.device!r}") from None
        require(self.dtype is None or self.dtype in _DTYPES, "dtype",
                 f"one of {sorted(_DTYPES)}", self.dtype)
        parse_policy(self.policy, field="policy")
        require(0 <= self.threshold <= 1, "threshold", "a number in [0, 1]", self.threshold)
        for name in ("max_num_seqs", "max_batch_tokens", "max_prefill_tokens",
                     "kv_budget_tokens", "draft_kv_budget_tokens", "kv_block_size",
                     "sps_context_len"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, "an integer >= 1", value)
        require(isinstance(self.draft_vocab_size, int) and self.draft_vocab_size >= 0,
                 "draft_vocab_size", "an integer >= 0 (0: the full vocabulary)",
                 self.draft_vocab_size)
        require(self.max_batch_tokens >= self.max_num_seqs, "max_batch_tokens",
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
