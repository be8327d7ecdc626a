"""How many draft tokens each request verifies: DSpark Algorithm 1 and the static baselines.

This is the verify-length policy; it admits nothing and schedules no request (admission and
the step's rows are the planner's, `planner`). DSpark Algorithm 1 (the paper's
"hardware-aware prefix scheduler", docs/DSPARK.md section 3) admits draft positions in order
of prefix survival probability a_{r,j} while the expected throughput
theta = tau* x SPS(B) keeps rising, where tau* counts expected committed tokens and B the tokens
the target forward will process. `sparkgrid.costs.SPSTable` is the profiled cost model SPS(B).

Scope: pure functions over survival / confidence tensors and a cost table (`SPSTable` by
tokens, `RowCostTable` by sequences and tokens), and the `Policy` names.
Not here: profiling the target (`profiler` measures and builds the tables), computing
confidence (the drafter, then `sts`), or deciding which requests run this step (`planner`).
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from sparkgrid.costs import json_object, piecewise_linear

if TYPE_CHECKING:
    from sparkgrid.costs import SPSTable


class Policy(enum.StrEnum):
    """Which rule picks a request's verification length."""

    AR = "ar"  # no speculation: plain autoregressive decoding
    FIXED = "fixed"  # verify all gamma draft tokens
    THRESHOLD = "threshold"  # verify while confidence c_k >= a threshold
    PREFIX = "prefix"  # DSpark Algorithm 1


def parse_policy(value: "str | Policy", field: str = "policy") -> Policy:
    """`value` as a Policy; a ValueError names `field` and the allowed values otherwise."""
    try:
        return Policy(value)
    except ValueError:
        allowed = ", ".join(repr(p.value) for p in Policy)
        raise ValueError(f"{field} must be one of {allowed}; got {value!r}") from None


@dataclass(frozen=True)
class RowCostTable:
    """Seconds of one decode forward by its sequences R and its tokens B (R <= B <= R(1+gamma)).

    SPS(B) alone misses what every sequence adds whatever its tokens: reading its cached
    context and attending over it. On a CPU that dominates a wide step (measured on the shipped
    pair in bfloat16: 64 sequences of one token take 3x the time of 64 tokens in 8 sequences),
    so a table by tokens alone overprices the extra draft tokens of a step with many
    sequences, and underprices its fixed cost. Profiled at each R of `rows`: `plain_seconds`,
    one new token per sequence; `full_seconds`, 1 + gamma per sequence. Between two row counts
    both are interpolated linearly (past the last, extrapolated with a slope of at least 0);
    between 1 and 1 + gamma tokens per sequence, linearly in B.
    """

    rows: list[int]  # strictly increasing sequence counts, the first one 1
    plain_seconds: list[float]  # one token per sequence
    full_seconds: list[float]  # 1 + gamma tokens per sequence
    gamma: int

    def __post_init__(self) -> None:
        rows, plain, full = self.rows, self.plain_seconds, self.full_seconds
        if not rows or not len(rows) == len(plain) == len(full):
            raise ValueError("RowCostTable needs rows, plain_seconds and full_seconds of equal, "
                             f"non-zero length; got {len(rows)}, {len(plain)} and {len(full)}")
        if (any(isinstance(r, bool) or not isinstance(r, int) for r in rows) or rows[0] != 1
                or any(b <= a for a, b in zip(rows, rows[1:]))):
            raise ValueError(f"RowCostTable rows must be integers starting at 1 and strictly "
                             f"increasing; got {rows}")
        if any(not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0
               for t in plain + full):
            raise ValueError(f"RowCostTable seconds must be finite and positive; got {plain}, "
                             f"{full}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, int) or self.gamma < 1:
            raise ValueError(f"RowCostTable gamma must be an integer >= 1; got {self.gamma!r}")

    def at_rows(self, rows: int) -> "_RowsCost":
        """The cost of a forward of `rows` sequences, as a function of its tokens."""
        if rows < 1:
            raise ValueError(f"RowCostTable covers forwards of >= 1 sequence; got {rows}")
        return _RowsCost(rows, piecewise_linear(self.rows, self.plain_seconds, rows),
                         piecewise_linear(self.rows, self.full_seconds, rows), self.gamma)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RowCostTable":
        data = json_object(text, "RowCostTable", ("rows", "plain_seconds", "full_seconds",
                                                   "gamma"))
        return cls(**data)


@dataclass(frozen=True)
class _RowsCost:
    """`RowCostTable` at one sequence count: seconds by tokens, in `SPSTable`'s interface."""

    rows: int
    plain: float
    full: float
    gamma: int

    def step_time(self, num_tokens):  # [N] -> [N] float64, a tensor or a numpy array
        """A forward of `num_tokens` tokens over the `rows` sequences (more tokens never cost
        less: a noisy profile's negative slope counts as 0)."""
        per_token = max(self.full - self.plain, 0.0) / (self.rows * self.gamma)
        tokens = num_tokens.double().cpu() if hasattr(num_tokens, "double") else num_tokens
        return self.plain + per_token * (tokens - self.rows).clip(min=0)

    def at_rows(self, rows: int) -> "_RowsCost":
        """This cost itself, for a forward of the same `rows` (what a planner that resolved
        the table once for its step hands on)."""
        if rows != self.rows:
            raise ValueError(f"a cost at {self.rows} rows asked for {rows}")
        return self

    def __call__(self, num_tokens: float) -> float:
        """Forwards per second at `num_tokens`, like `SPSTable.__call__` (`step_time`'s
        arithmetic on one number: asked once a step)."""
        per_token = max(self.full - self.plain, 0.0) / (self.rows * self.gamma)
        return 1.0 / (self.plain + per_token * max(float(num_tokens) - self.rows, 0.0))


def prefix_lengths(
    survival: torch.Tensor | np.ndarray,  # [R, G] a_{r,j}, non-increasing in j, in [0, 1]
    sps: "SPSTable | _RowsCost",  # seconds by tokens (a `RowCostTable` at the step's rows)
    *,
    extra_tokens: int = 0,
    extra_tau: float = 0.0,
    fixed_seconds: float = 0.0,
    early_stop: bool = True,
) -> torch.Tensor:  # [R] long on survival's device
    """DSpark Algorithm 1: draft tokens to verify per request, l_r in [0, G].

    `extra_tokens` / `extra_tau` add the tokens and expected committed tokens of requests in the
    same forward that follow another policy. `fixed_seconds` is time the step spends whatever
    is verified (its draft pass, profiled before the step): theta = tau / (fixed_seconds +
    verify time) is the step's real throughput. Alg. 1 as published leaves it out (0), which
    on a GPU, where a draft pass is cheap, changes little; on a CPU, where a draft pass costs
    about half a verify forward, leaving it out sets the bar for one more token (a_{r,j} >
    theta x its marginal cost) too high and verifies too little. It is known before drafting,
    so it no more depends on the draft tokens than the cost table does. Candidates (r, j) are
    scanned by a_{r,j} descending, ties by request index then position, so the result is
    deterministic and each request's admitted positions form a prefix. `early_stop=False` is
    an ablation only: it keeps scanning and commits the best-theta point, which biases the
    output distribution.
    """
    a = _survival_array(survival)  # [R, G]
    device = survival.device if isinstance(survival, torch.Tensor) else "cpu"
    if fixed_seconds < 0 or not math.isfinite(fixed_seconds):
        raise ValueError(f"fixed_seconds must be finite and >= 0; got {fixed_seconds}")
    lengths = prefix_lengths_checked(a, sps, extra_tokens=extra_tokens, extra_tau=extra_tau,
                                     fixed_seconds=fixed_seconds, early_stop=early_stop)
    return torch.from_numpy(lengths).long().to(device)


def prefix_lengths_checked(a: np.ndarray, sps, *, extra_tokens: int = 0,
                           extra_tau: float = 0.0, fixed_seconds: float = 0.0,
                           early_stop: bool = True) -> np.ndarray:  # [R] int64
    """`prefix_lengths` on a float64 [R, G] array already known to hold survival
    probabilities (the engine's own, a cumulative product of confidences in (0, 1)), with a
    finite `fixed_seconds` >= 0: no checks and no torch, for a step's host time (at one
    request on a 2-core CPU the checks and conversions were half of Alg. 1's 0.1 ms)."""
    num_requests, gamma = a.shape
    if num_requests == 0 or gamma == 0:
        return np.zeros(num_requests, dtype=np.int64)
    a = a.reshape(-1)  # [R*G], index r*G + (j-1)
    # Stable descending sort on the row-major flattening breaks ties by request then position.
    order = np.argsort(-a, kind="stable")  # [R*G]
    tau = np.empty(len(a) + 1)  # [R*G+1]: 0 = nothing admitted
    tau[0] = 0.0
    np.cumsum(a[order], out=tau[1:])
    tau += num_requests + extra_tau
    theta = tau / (fixed_seconds + sps.step_time(
        np.arange(num_requests + extra_tokens, num_requests + extra_tokens + len(a) + 1,
                  dtype=np.float64)))  # [R*G+1]
    if early_stop:
        # DSpark Alg. 1 / Appendix A: stop at the first candidate that does not raise theta.
        # Then verifying x_{r,j} depends only on candidates sorted before it (a_{r,<=j}, known
        # before x_{r,j} is drawn, and other requests), never on x_{r,j} itself through
        # c_{r,j+1}; that keeps verification lossless.
        num_admitted = _leading_rises(theta)
    else:
        num_admitted = int(np.argmax(theta))  # first best point, as "theta > best"
    return np.bincount(order[:num_admitted] // gamma, minlength=num_requests)  # [R]


def _leading_rises(theta: np.ndarray) -> int:
    """How many of theta's steps rise before the first one that does not."""
    falls = np.flatnonzero(~(theta[1:] > theta[:-1]))
    return int(falls[0]) if len(falls) else len(theta) - 1


def threshold_lengths(
    confidence: torch.Tensor,  # [R, G] c_k
    threshold: float,
) -> torch.Tensor:  # [R] long
    """Leading draft positions with c_k >= threshold (stop at the first one below)."""
    return torch.cumprod((confidence >= threshold).long(), dim=1).sum(dim=1)


def fixed_lengths(num_requests: int, gamma: int, device: "torch.device | str" = "cpu"
                  ) -> torch.Tensor:  # [R] long
    """Every request verifies all gamma draft tokens."""
    return torch.full((num_requests,), gamma, dtype=torch.long, device=device)


def _survival_array(survival: torch.Tensor | np.ndarray) -> np.ndarray:
    """`survival` checked, as a float64 numpy array (the planning arithmetic runs in numpy:
    on a few dozen numbers a torch op costs ~10x as much, per step, on the host)."""
    if survival.ndim != 2:
        raise ValueError(f"survival must be [R, G]; got shape {tuple(survival.shape)}")
    a = (survival.detach().to("cpu", torch.float64).numpy()
         if isinstance(survival, torch.Tensor) else np.asarray(survival, dtype=np.float64))
    if a.size == 0:
        return a
    if not ((a >= 0) & (a <= 1)).all():  # NaN fails both comparisons, an infinity one
        raise ValueError("survival probabilities must be finite and in [0, 1]")
    if not (a[:, 1:] <= a[:, :-1]).all():
        raise ValueError("survival must be non-increasing along each row (a cumulative product)")
    return a


def drafting_pays(
    estimates: torch.Tensor,  # [D, G] expected survival a_{r,j} of the rows that would draft
    sps: "SPSTable | _RowsCost",  # seconds by tokens (a `RowCostTable` at the step's rows)
    *,
    draft_seconds: float,
    other_rows: int = 0,
    plain_seconds: float = 0.0,
) -> bool:
    """Whether drafting this step is expected to beat plain decoding, draft time included
    (`expected_throughput` of the drafting rows against that of none, whose step spends
    `plain_seconds` besides its forward)."""
    if estimates.numel() == 0:
        _survival_array(estimates)
        return False
    rows = estimates.shape[0] + other_rows
    plain = expected_throughput(estimates[:0], sps, draft_seconds=plain_seconds, other_rows=rows)
    return expected_throughput(estimates, sps, draft_seconds=draft_seconds,
                               other_rows=other_rows) > plain


def expected_throughput(
    estimates: torch.Tensor,  # [D, G] expected survival a_{r,j} of the rows that draft
    sps: "SPSTable | _RowsCost",  # seconds by tokens (a `RowCostTable` at the step's rows)
    *,
    draft_seconds: float,
    other_rows: int = 0,
) -> float:
    """Expected committed tokens per second of a step in which D rows draft and `other_rows`
    decode plainly, draft time included.

    Alg. 1 weighs verify cost only: once a block is drafted its cost is spent. Before drafting,
    the engine asks this with survival estimates from earlier blocks (never this step's tokens,
    so the choice stays lossless, like the production variant's capacity from old confidence):
    drafting commits tau*(n) = rows + the n best a's in step_time(rows + n) + `draft_seconds`,
    at the best n among those Alg. 1's early-stopping scan (`prefix_lengths`, with the draft
    time as its fixed seconds) would reach (n >= 1). With D = 0 it is plain decoding: rows in
    step_time(rows) + `draft_seconds` (then only the step's other work: no draft pass runs).
    """
    a = _survival_array(estimates)
    if draft_seconds < 0 or not math.isfinite(draft_seconds):
        raise ValueError(f"draft_seconds must be finite and >= 0; got {draft_seconds}")
    rows = a.shape[0] + other_rows
    if rows < 1:
        raise ValueError("expected_throughput needs at least one row")
    return expected_throughputs([a], sps, [draft_seconds], rows)[0]


def expected_throughputs(subsets: list[np.ndarray], sps: "SPSTable | _RowsCost",
                         draft_seconds: list[float], rows: int) -> list[float]:
    """`expected_throughput` of several candidate steps of `rows` sequences at once (subset
    i: the [D_i, G] checked survival estimates of its drafting rows, `draft_seconds[i]` its
    time besides the forward), in one array pass: the draft gate weighs up to 8 a step."""
    width = max(a.size for a in subsets)
    a = np.zeros((len(subsets), width))
    for i, sub in enumerate(subsets):
        a[i, :sub.size] = sub.reshape(-1)
    a = -np.sort(-a, axis=1)  # descending
    tau = rows + np.concatenate((np.zeros((len(subsets), 1)), np.cumsum(a, axis=1)), axis=1)
    seconds = sps.step_time(rows + np.arange(0, width + 1, dtype=np.float64))  # [N+1]
    theta = tau / (seconds[None, :] + np.asarray(draft_seconds, dtype=np.float64)[:, None])
    out = []
    for i, sub in enumerate(subsets):
        if sub.size == 0:  # plain decoding: rows in step_time(rows) + its seconds
            out.append(float(theta[i, 0]))
            continue
        reach = 1 + _leading_rises(theta[i, :sub.size + 1])  # Alg. 1's stop
        out.append(float(theta[i, 1:max(reach, 2)].max()))
    return out
