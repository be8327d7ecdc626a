"""How many draft tokens each request of a step verifies, under its policy.

The step-level side of the verify-length policy (its pure rules are `verify_policy`'s):
`choose_lengths` applies each request's policy under caps (`verify_caps`). Which requests
draft at all is `draft_gate`'s. The planner (`planner`) calls both.

Knows: the policies (`ar`, `fixed`, `threshold`, `prefix`), STS calibration, and the caps
every request obeys. Does not know: models, caches or sampling.

Losslessness rule for caps: a cap may depend on anything known *before* drafting (the
request's remaining budget, the number of requests) but never on a policy's result, which
depends on draft tokens. Trimming a chosen length after the fact would let the decision to
verify x_j depend on x_j itself (DSpark Appendix A), so caps are applied as upper bounds
that no draft token can move.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparkgrid.costs import SPSTable
from worker.engine.sts import apply_sts, survival
from worker.engine.verify_policy import (
    Policy,
    RowCostTable,
    prefix_lengths_checked,
    threshold_lengths,
)


@dataclass
class DraftProposal:
    """What the drafter proposed for the drafting requests of one step."""

    ids: torch.Tensor                  # [S, G] draft tokens
    probs: torch.Tensor | None         # [S, G, V] distributions they were drawn from;
                                       # None when all are greedy (ids suffice)
    conf_logits: torch.Tensor | None   # [S, G] raw confidence logits, None without a head
    conf: torch.Tensor | None = None   # [S, G] the c_k this step decides with (STS, then the
                                       # engine's online calibration); None: from conf_logits
    survival: torch.Tensor | None = None  # [S, G] a_{r,j} of `conf`, once asked for
                                          # (`proposal_survival`)
    stated: torch.Tensor | None = None  # [S, G] the draft's own c_k (STS, before the online
                                        # calibration), once asked for (`stated_confidence`)


def proposal_confidence(proposal: DraftProposal, sts: list[float] | None) -> torch.Tensor:
    """[S, G] c_k of a proposal's rows, on the CPU."""
    if proposal.conf is not None:
        return proposal.conf.cpu()
    return confidence(proposal.conf_logits, sts).cpu()


def stated_confidence(proposal: DraftProposal, sts: list[float] | None) -> torch.Tensor:
    """[S, G] the draft's own c_k of a proposal's rows (STS, not the engine's online
    calibration), on the CPU: what `threshold` bars and the online calibration learns from."""
    if proposal.stated is None:
        proposal.stated = confidence(proposal.conf_logits, sts).cpu()
    return proposal.stated


def proposal_survival(proposal: DraftProposal, sts: list[float] | None) -> torch.Tensor:
    """[S, G] a_{r,j}, the cumulative product of a proposal's c_k, on the CPU; computed once a
    proposal (Alg. 1 and the draft gate both read it)."""
    if proposal.survival is None:
        proposal.survival = survival(proposal_confidence(proposal, sts))
    return proposal.survival


def confidence(conf_logits: torch.Tensor, sts: list[float] | None) -> torch.Tensor:
    """c_k, calibrated by Sequential Temperature Scaling when the draft ships temperatures."""
    return apply_sts(conf_logits, sts) if sts is not None else torch.sigmoid(conf_logits.float())


def choose_lengths(reqs, spec_idx: list[int], proposal: DraftProposal | None, *, gamma: int,
                   sps: SPSTable | RowCostTable | None, threshold: float, sts: list[float] | None,
                   max_batch_tokens: int, draft_seconds: float = 0.0,
                   whole_blocks: bool = False) -> list[int]:
    """Verify lengths l_r in [0, gamma] for every request of the step (0 for `ar`);
    `draft_seconds`, the profiled time of the step's draft pass, is part of what `prefix`
    weighs each verified token against (`prefix_lengths`' fixed seconds). `whole_blocks`:
    `prefix` rows verify their whole block as `fixed` ones do (`regimes.FULL`)."""
    lengths = [0] * len(reqs)
    if not spec_idx:
        return lengths
    caps = spec_caps(reqs, spec_idx, gamma, max_batch_tokens)  # Python ints: a step's host time
    conf = proposal_confidence(proposal, sts) if proposal.conf_logits is not None else None
    policies = [reqs[i].policy for i in spec_idx]
    # `threshold` bars the draft's own confidence: the engine's online calibration serves
    # `prefix`, and would move a static bar
    stated = stated_confidence(proposal, sts) if Policy.THRESHOLD in policies else None
    prefix_rows = ([] if whole_blocks else
                   [k for k, p in enumerate(policies) if p == Policy.PREFIX])
    chosen = [0] * len(spec_idx)
    for k, pol in enumerate(policies):
        if pol == Policy.FIXED or (whole_blocks and pol == Policy.PREFIX):
            chosen[k] = min(gamma, caps[k])
        elif pol == Policy.THRESHOLD:
            chosen[k] = min(int(threshold_lengths(stated[k:k + 1], threshold)[0]), caps[k])
    if prefix_rows:
        others = ([] if len(prefix_rows) == len(spec_idx) else
                  sorted(set(range(len(spec_idx))) - set(prefix_rows)))
        extra_tokens = len(reqs) - len(spec_idx) + sum(1 + chosen[k] for k in others)
        extra_tau = len(reqs) - len(spec_idx) + sum(
            1 + float(survival(conf[k])[:chosen[k]].sum()) if conf is not None else 1.0
            for k in others)
        # [P, G] in float64 numpy (host arithmetic on a few dozen numbers a step); a cumulative
        # product of confidences in (0, 1), so Alg. 1 runs without checking it again
        a = proposal_survival(proposal, sts).numpy().astype(np.float64)
        if len(prefix_rows) < len(spec_idx):
            a = a[prefix_rows]
        prefix_caps = [caps[k] for k in prefix_rows]
        if min(prefix_caps) < gamma:  # never worth verifying past a cap: the walk stops there
            a[np.arange(gamma)[None, :] >= np.array(prefix_caps)[:, None]] = 0.0
        got = prefix_lengths_checked(a, sps.at_rows(len(reqs)), extra_tokens=extra_tokens,
                                     extra_tau=extra_tau,
                                     fixed_seconds=max(0.0, draft_seconds)).tolist()
        for k, n in zip(prefix_rows, got):
            chosen[k] = min(n, caps[k])
    for k, i in enumerate(spec_idx):
        lengths[i] = chosen[k]
    return lengths


def verify_caps(reqs, spec_idx: list[int], gamma: int, max_batch_tokens: int) -> np.ndarray:
    """[S] the most draft tokens each request of `spec_idx` may verify, known before drafting:
    gamma, the tokens it has left to generate, and a fair share of the batch."""
    return np.array(spec_caps(reqs, spec_idx, gamma, max_batch_tokens), dtype=np.int64)


def spec_caps(reqs, spec_idx: list[int], gamma: int, max_batch_tokens: int) -> list[int]:
    """`verify_caps` as a list of ints (for host arithmetic on a few numbers)."""
    share = max(0, max_batch_tokens // len(reqs) - 1)
    return [min(gamma, reqs[i].remaining - 1, share) for i in spec_idx]


def pad_rows(values: torch.Tensor | None, rows: list[int], num_rows: int, gamma: int,
             device: torch.device, vocab: int | None = None) -> torch.Tensor:
    """Scatter per-drafting-request rows into a full-batch tensor (ids pad with -1, probs 0)."""
    if vocab is None:
        out = torch.full((num_rows, gamma), -1, dtype=torch.long, device=device)
    else:
        dtype = values.dtype if values is not None else torch.float32
        out = torch.zeros(num_rows, gamma, vocab, dtype=dtype, device=device)
    if values is not None:
        out[torch.tensor(rows, device=device)] = values
    return out
