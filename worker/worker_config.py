"""What one worker is: its name, models, device, price and loop settings. Built by the
launcher from `sparkgrid worker` options, sent to the Ray actor, never changed after.

Knows: field checks. Does not know: Ray, how the engine runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
"""Worker names: what Ray's actor list and the metrics show, so kept printable and short."""


@dataclass(frozen=True)
class WorkerConfig:
    """One worker: one engine on one device of one node."""

    name: str
    """Unique in the cluster; the Ray actor's name in namespace `sparkgrid`."""
    target: str
    """Target model directory."""
    draft: str | None
    """DSpark draft checkpoint directory; None serves the target alone (`ar`)."""
    gpu_type: str
    """What the device is, as routing and cost reports name it (`H200`, `RTX 4090`, `cpu`)."""
    device: str = "cpu"
    """Torch device of the engine."""
    dtype: str | None = None
    """Weights dtype; None: the engine's default for the device."""
    price_per_hour: float = 0.0
    """What the operator charges for this device, USD per hour."""
    max_batch_tokens: int = 512
    """Most verify tokens per target forward (the engine's `max_batch_tokens`)."""
    draft_vocab_size: int = 0
    """Draft only the N tokens the target writes most often (the engine's `draft_vocab_size`;
    needs the draft's `draft_vocab.json`); 0 = the full vocabulary."""
    emulate_slowdown: float = 1.0
    """Benchmarks only: every step takes this many times as long (the extra time is slept),
    so that one machine can host workers of honestly different speeds."""
    sps_cache_dir: str | None = None
    """Where profiled SPS(B) tables are cached (None: the engine's default)."""
    rate_window_s: float = 30.0
    """Tokens/s is reported over this much recent time."""
    stuck_after_s: float = 120.0
    """The health check fails when one step (or an idle wait) lasts longer than this."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"name: expected 1-63 letters, digits, '.', '_' or '-' starting "
                             f"with a letter or digit, got {self.name!r}")
        if not isinstance(self.gpu_type, str) or not self.gpu_type.strip():
            raise ValueError(f"gpu_type: expected a non-empty string, got {self.gpu_type!r}")
        _positive_number("price_per_hour", self.price_per_hour, allow_zero=True)
        _positive_number("rate_window_s", self.rate_window_s)
        _positive_number("stuck_after_s", self.stuck_after_s)
        if not (isinstance(self.emulate_slowdown, (int, float))
                and 1 <= self.emulate_slowdown <= 1000):
            raise ValueError(f"emulate_slowdown: expected a number in [1, 1000], got "
                             f"{self.emulate_slowdown!r}")
        if not (isinstance(self.max_batch_tokens, int) and self.max_batch_tokens >= 1):
            raise ValueError(f"max_batch_tokens: expected an integer >= 1, "
                             f"got {self.max_batch_tokens!r}")
        if not (isinstance(self.draft_vocab_size, int) and self.draft_vocab_size >= 0):
            raise ValueError(f"draft_vocab_size: expected an integer >= 0 (0: the full "
                             f"vocabulary), got {self.draft_vocab_size!r}")

    @property
    def max_num_seqs(self) -> int:
        """Most requests the engine decodes at once (more wait): 64, or fewer when a verify
        forward holds fewer tokens."""
        return min(64, self.max_batch_tokens)

    @property
    def policy(self) -> str:
        """DSpark Algorithm 1 with a drafter; plain autoregressive decoding without."""
        return "prefix" if self.draft else "ar"


def _positive_number(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a number {'>=' if allow_zero else '>'} 0, "
                         f"got {value!r}")
