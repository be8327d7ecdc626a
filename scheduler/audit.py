"""Audit verdicts: is a job's delivered output what the target would have produced?

A trusted worker scores the delivered tokens under the target (one teacher-forced forward;
`worker/engine/audit_score.py` says what each figure is). The verdict here:

- Greedy jobs (temperature below `sparkgrid.contract.GREEDY_BELOW`): every delivered token must
  be the target's argmax, up to `gap_limit` logits below it. Speculative decoding is lossless,
  but an honest worker's kernels, dtype and batch size move logits a little, so two nearly tied
  tokens may swap; the limit is set from measured honest runs (`bench/audit.py`: the largest
  gap seen across bfloat16 and float32, batch sizes 1 to 32 and the `ar`, `fixed` and `prefix`
  policies, times a margin), not zero.
- Sampled jobs: z = sum(logprob - mean) / sqrt(sum(var)) over the delivered tokens, whose
  terms have mean zero when the tokens were drawn from the target's distribution at the job's
  temperature; a job fails when z < -`z_limit`. For a standard normal statistic
  z_limit = 3.719 flags an honest job with probability 1e-4; the statistic's real lower tail
  over short outputs is measured by `bench/audit.py`, which also sets `min_tokens` below which
  a sampled job is not judged (too little evidence either way).
- A worker's sampled jobs, pooled (`Pool`): one short job carries little evidence, so the same
  statistic over every sampled token the worker delivered in audited jobs is kept too, and the
  worker fails when it falls below -`POOLED_Z_LIMIT`. It is looked at after every audited job;
  at 4.753 (one-sided normal tail 1e-6 per look) a worker audited 1,000 times is falsely
  flagged with probability at most 1e-3 (union bound over the looks).

Knows: the scores' meaning and the thresholds. Does not know: Ray, Redis, which jobs are
audited (see the auditor), models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sparkgrid.contract import GREEDY_BELOW

GAP_LIMIT = 1.0
"""Largest logit gap to the argmax an honest greedy token may have (see above)."""
Z_LIMIT = 3.719
"""A sampled job fails when its z is below minus this: one-sided normal tail 1e-4."""
MIN_TOKENS = 8
"""A sampled job with fewer delivered tokens is not judged."""
POOLED_Z_LIMIT = 4.753
"""A worker fails when its pooled z is below minus this: one-sided normal tail 1e-6."""


@dataclass(frozen=True)
class Verdict:
    passed: bool | None
    """True, False, or None when there was too little to judge."""
    reason: str
    statistic: float
    """The largest gap (greedy) or z (sampled)."""


def judge(scores: dict, temperature: float, gap_limit: float = GAP_LIMIT,
          z_limit: float = Z_LIMIT, min_tokens: int = MIN_TOKENS) -> Verdict:
    """The verdict on one job from its scores (`TokenScores.to_dict()`): ValueError naming the
    field when they are malformed (they come from another machine)."""
    gaps = _numbers(scores, "gap")
    if not gaps:
        return Verdict(None, "no tokens delivered", 0.0)
    if temperature < GREEDY_BELOW:
        worst = max(gaps)
        at = gaps.index(worst)
        if worst > gap_limit:
            return Verdict(False, f"token {at} is {worst:.3g} logits below the target's argmax "
                                  f"(honest limit {gap_limit:g})", worst)
        return Verdict(True, f"every token within {gap_limit:g} logits of the argmax", worst)
    logprob, mean, var = (_numbers(scores, name) for name in ("logprob", "mean", "var"))
    if not len(logprob) == len(mean) == len(var) == len(gaps):
        raise ValueError("scores: gap, logprob, mean and var must have one entry per token")
    if len(logprob) < min_tokens:
        return Verdict(None, f"{len(logprob)} tokens: fewer than {min_tokens} to judge", 0.0)
    spread = math.sqrt(sum(var))
    if spread <= 1e-9:  # the target was certain of every token: only the argmax is honest
        worst = max(gaps)
        ok = worst <= gap_limit
        return Verdict(ok, "a certain distribution: " + ("argmax delivered" if ok else
                                                          "another token delivered"), worst)
    z = sum(lp - m for lp, m in zip(logprob, mean)) / spread
    if z < -z_limit:
        return Verdict(False, f"the tokens are less likely under the target than chance allows "
                              f"(z = {z:.2f} < -{z_limit:g})", z)
    return Verdict(True, f"z = {z:.2f}", z)


def _numbers(scores: dict, name: str) -> list[float]:
    values = scores.get(name) if isinstance(scores, dict) else None
    if not isinstance(values, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in values):
        raise ValueError(f"scores.{name}: expected a list of finite numbers")
    if name in ("gap", "var") and any(v < 0 for v in values):
        raise ValueError(f"scores.{name}: must not be negative")
    return [float(v) for v in values]


class Pool:
    """A worker's sampled audit evidence, summed over its audited jobs (see above)."""

    def __init__(self, z_limit: float = POOLED_Z_LIMIT):
        self.z_limit = z_limit
        self.excess = 0.0  # sum of (logprob - mean)
        self.var = 0.0
        self.tokens = 0

    @property
    def z(self) -> float:
        return self.excess / math.sqrt(self.var) if self.var > 0 else 0.0

    def add(self, scores: dict) -> bool | None:
        """Add one sampled job's scores; False when the pooled evidence now fails, None while
        there are fewer than `MIN_TOKENS` tokens."""
        logprob, mean, var = (_numbers(scores, name) for name in ("logprob", "mean", "var"))
        if not len(logprob) == len(mean) == len(var):
            raise ValueError("scores: logprob, mean and var must have one entry per token")
        self.excess += sum(lp - m for lp, m in zip(logprob, mean))
        self.var += sum(var)
        self.tokens += len(logprob)
        if self.tokens < MIN_TOKENS or self.var <= 0:
            return None
        return self.z >= -self.z_limit
