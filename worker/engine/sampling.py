"""Sampling distributions and inverse-CDF sampling.

`warp_probs` is the single definition of the distribution a request samples from: the target's
output distribution *and* the draft's proposal distribution are both `warp_probs` of their
logits with the request's own sampling parameters. Speculative sampling is lossless only with
respect to the distribution both sides agree on, so nothing else in the engine may apply
temperature, top-k or top-p on its own.

`sample` draws one token per row from caller-supplied uniforms. The engine draws those from
per-request seeded generators, which keeps each request's randomness reproducible and
independent of which other requests share the batch.

Scope: pure tensor functions, vectorised over rows, CPU or CUDA, any float dtype in, float32
math inside (`argmax_rows` takes the native op where it is built). Not here: where uniforms
come from, penalties, logit processors, request state.
"""

import torch

from worker.engine.attention import native_ops_ready


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` of [M, V] rows (ties to the lowest index, a NaN largest): the
    native op (`csrc/fused_ops.cpp`) for float32 on a CPU where it is built, torch's
    elsewhere. Greedy decoding takes one per row and step: torch's CPU argmax of 64 x 8,192
    logits takes ~0.5 ms, about 3% of a step at 64 requests."""
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.shape[1] > 0 and native_ops_ready()):
        return torch.ops.sparkgrid.argmax_rows(logits.contiguous())
    return logits.argmax(dim=-1)


def warp_probs(
    logits: torch.Tensor,  # [M, V]
    temperature: torch.Tensor,  # [M] float; 0 = greedy
    top_k: torch.Tensor,  # [M] long; 0 = off
    top_p: torch.Tensor,  # [M] float; 1.0 = off
) -> torch.Tensor:  # [M, V] float32, rows sum to 1
    """The distribution each row samples from: temperature, then top-k, then top-p.

    - temperature 0 makes the row one-hot on the argmax of the raw logits (ties go to the
      lowest index, as `torch.argmax`); top-k and top-p do not apply to such rows.
    - top-k keeps exactly k tokens; among equal logits the lower index wins (stable sort).
    - top-p (nucleus) keeps the smallest set of highest-probability tokens whose mass reaches
      top_p, measured after top-k and renormalisation; the top token is always kept.
    The kept probabilities are renormalised.
    """
    _check_params(logits, temperature, top_k, top_p)
    logits = logits.float()
    device = logits.device
    num_rows, vocab_size = logits.shape
    temperature = temperature.to(device).float()
    greedy = temperature <= 0  # [M]
    one_hot = torch.zeros_like(logits)
    one_hot[torch.arange(num_rows, device=device), argmax_rows(logits)] = 1.0
    if bool(greedy.all()):  # fast path: nothing to sort
        return one_hot
    safe_temp = torch.where(greedy, torch.ones_like(temperature), temperature)
    scaled = logits / safe_temp[:, None]  # [M, V]
    if not bool(((top_k > 0) | (top_p < 1.0)).any()):  # fast path: temperature only
        return torch.where(greedy[:, None], one_hot, torch.softmax(scaled, dim=-1))

    # Work in descending order; stable so that ties resolve to the lower token id.
    sorted_logits, sorted_ids = torch.sort(scaled, dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab_size, device=device)  # [V]
    k = top_k.to(device).long()
    outside_k = (k[:, None] > 0) & (ranks[None, :] >= k[:, None])  # [M, V]
    sorted_logits = sorted_logits.masked_fill(outside_k, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)  # [M, V]

    # Nucleus: keep token i while the mass strictly before it is still below top_p.
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [M, V]
    p = top_p.to(device).float()
    keep = (mass_before < p[:, None]) | (p[:, None] >= 1.0)
    keep[:, 0] = True  # the top token always survives, even with top_p = 0
    sorted_probs = sorted_probs * keep
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)

    probs = torch.zeros_like(sorted_probs).scatter_(1, sorted_ids, sorted_probs)
    return torch.where(greedy[:, None], one_hot, probs)


def sample(
    probs: torch.Tensor,  # [M, V], rows non-negative, need not be normalised
    uniforms: torch.Tensor,  # [M] in [0, 1)
) -> torch.Tensor:  # [M] long
    """Inverse-CDF sampling: the first token whose cumulative mass exceeds u * row total.

    The cumulative sum is taken in float64. With `right=True` the chosen token's cdf is strictly
    above the previous one, so a token with probability 0 is never chosen.
    """
    if probs.dim() != 2 or uniforms.shape != probs.shape[:1]:
        raise ValueError(
            f"sample expects probs [M, V] and uniforms [M]; got {tuple(probs.shape)} "
            f"and {tuple(uniforms.shape)}"
        )
    cdf = torch.cumsum(probs.double(), dim=-1)  # [M, V]
    targets = uniforms.to(cdf.device).double()[:, None] * cdf[:, -1:]  # [M, 1]
    ids = torch.searchsorted(cdf, targets, right=True).squeeze(-1)  # [M]
    # u * total can round up to total only for u within 2**-53 of 1; fall back to the last
    # token with positive probability rather than step past the vocabulary.
    vocab_size = probs.shape[-1]
    last_positive = vocab_size - 1 - torch.argmax(probs.flip(-1).gt(0).int(), dim=-1)  # [M]
    return torch.minimum(ids, last_positive)


def _check_params(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [M, V]; got shape {tuple(logits.shape)}")
    rows = logits.shape[:1]
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if value.shape != rows:
            raise ValueError(f"{name} must have shape [{rows[0]}]; got {tuple(value.shape)}")
