"""Scoring delivered tokens under the target: what an audit needs of a job's output.

An audit replays a job on a trusted worker as one teacher-forced forward of the prompt plus the
delivered tokens, and looks at the target's distribution at each delivered position:
- `gap`: how far the delivered token's logit is below the largest one (0 for the argmax). At
  temperature 0 an honest worker delivers the argmax of its own arithmetic, which can differ
  from the auditor's only where two logits are nearly tied, so honest gaps are small;
- `logprob`, `mean`, `var`: the delivered token's log-probability under the job's temperature
  (no top-k / top-p: see below), and the mean and variance of that log-probability were the
  token drawn from the distribution. At temperature > 0 the sum of (logprob - mean) over a job
  is a sum of zero-mean terms for an honest worker, so (sum) / sqrt(sum of var) is close to a
  standard normal; a worker that delivers tokens the target finds less likely (another model,
  perturbed weights, output made for another prompt) drives it far below zero.

Truncation (top-k, top-p) is left out on purpose: it moves mass to likelier tokens, so honest
truncated sampling only raises the statistic, and a token an honest worker kept at a nucleus
boundary that the auditor's arithmetic puts just outside it is not an impossible token here.

Knows: the target's forward, temperature. Does not know: what is audited when, verdicts
(`scheduler/audit.py`), Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenScores:
    """One job's delivered tokens as the target sees them (one entry per token)."""

    gap: tuple[float, ...]
    """Largest logit minus the delivered token's logit (>= 0)."""
    logprob: tuple[float, ...]
    """log p(token) under softmax(logits / temperature); empty at temperature 0."""
    mean: tuple[float, ...]
    """E[log p] under that distribution (minus its entropy); empty at temperature 0."""
    var: tuple[float, ...]
    """Var[log p] under that distribution; empty at temperature 0."""

    def to_dict(self) -> dict:
        return {"gap": list(self.gap), "logprob": list(self.logprob), "mean": list(self.mean),
                "var": list(self.var)}


def score_tokens(target, prompt_ids: list[int], token_ids: list[int],
                 temperature: float) -> TokenScores:
    """The scores of `token_ids` delivered after `prompt_ids` (one forward of both, float32
    math on the logits). ValueError naming the field for an empty prompt, no tokens, or an id
    outside the vocabulary."""
    if not prompt_ids:
        raise ValueError("prompt_ids: must not be empty")
    if not token_ids:
        raise ValueError("token_ids: must not be empty")
    vocab = int(target.config.vocab_size)
    for name, ids in (("prompt_ids", prompt_ids), ("token_ids", token_ids)):
        bad = next((t for t in ids if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise ValueError(f"{name}: id {bad} is outside the vocabulary of {vocab}")
    if not (temperature >= 0):
        raise ValueError(f"temperature: must be >= 0; got {temperature}")
    device = next(target.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(token_ids)], device=device)
    with torch.inference_mode():
        logits = target(input_ids=ids).logits[0].float()
    first = len(prompt_ids) - 1
    logits = logits[first:first + len(token_ids)]  # the position before each delivered token
    chosen = torch.tensor(token_ids, device=device)
    rows = torch.arange(len(token_ids), device=device)
    gap = (logits.max(dim=-1).values - logits[rows, chosen]).clamp_min(0)
    if temperature == 0:
        return TokenScores(tuple(gap.tolist()), (), (), ())
    logp = torch.log_softmax(logits / temperature, dim=-1)
    p = logp.exp()
    mean = (p * logp).sum(dim=-1)
    var = (p * (logp - mean[:, None]) ** 2).sum(dim=-1)
    return TokenScores(tuple(gap.tolist()), tuple(logp[rows, chosen].tolist()),
                       tuple(mean.tolist()), tuple(var.tolist()))
