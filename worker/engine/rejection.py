"""Speculative sampling: accept draft tokens, resample at the first rejection, or add a bonus.

The rule (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding",
Algorithm 1; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling"; docs/DSPARK.md
section 1 step 6): with target distribution p_k and draft distribution q_k at draft position k,

- accept x_k with probability min(1, p_k(x_k) / q_k(x_k)), left to right;
- at the first rejection, emit a token from norm(max(0, p_k - q_k)) and stop;
- if every verified draft token is accepted, emit a bonus token from p_{l+1}.

Every emitted token is then distributed exactly as the target would have sampled it. Both p and
q must be the *warped* distributions (`sampling.warp_probs`) the tokens were really drawn from.
At temperature 0 both are one-hot, so the rule is exact argmax matching: a draft token is
accepted iff it equals the target argmax, and the emitted token is the target argmax.

Scope: one vectorised verification over a batch of requests, uniforms supplied by the caller.
Not here: the target forward, choosing how many tokens to verify, committing tokens or KV.
"""

import torch

from worker.engine.sampling import sample

# Below this residual mass a rejection can only be float noise (p and q agree to ~1e-7). Falling
# back to p then changes the output distribution by at most this much in total variation.
RESIDUAL_EPS = 1e-6


def verify(
    target_probs: torch.Tensor,  # [R, G+1, V] warped target at the anchor and after each draft
    draft_probs: torch.Tensor,  # [R, G, V] distributions the draft tokens were sampled from
    draft_ids: torch.Tensor,  # [R, G] long
    num_verify: torch.Tensor,  # [R] long in [0, G]
    accept_uniforms: torch.Tensor,  # [R, G] in [0, 1)
    resample_uniforms: torch.Tensor,  # [R] in [0, 1)
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [R] long, next_ids [R] long
    """Verify the first `num_verify[r]` draft tokens of each request.

    Entries beyond a request's `num_verify` (draft positions >= l, target positions > l) are
    padding: they are never read into the result and may hold anything, NaN included.
    Returns how many draft tokens were accepted and the replacement or bonus token that follows
    them. `num_verify = 0` is plain sampling from `target_probs[:, 0]`.
    """
    _check_shapes(target_probs, draft_probs, draft_ids, num_verify, accept_uniforms,
                  resample_uniforms)
    num_requests, num_draft, _ = draft_probs.shape
    device = target_probs.device
    rows = torch.arange(num_requests, device=device)  # [R]
    num_verify = num_verify.to(device).long()
    verified = torch.arange(num_draft, device=device)[None, :] < num_verify[:, None]  # [R, G]
    safe_ids = torch.where(verified, draft_ids.to(device).long(), 0)  # padding ids may be junk

    p_x = target_probs[:, :num_draft].float().gather(-1, safe_ids[..., None]).squeeze(-1)
    q_x = draft_probs.float().gather(-1, safe_ids[..., None]).squeeze(-1)  # [R, G]
    # Leviathan Alg. 1: accept iff u < p(x)/q(x), written u*q < p so q = 0 cannot divide.
    accepted = (accept_uniforms.to(device).float() * q_x < p_x) & verified  # [R, G]
    num_accepted = torch.cumprod(accepted.int(), dim=1).sum(dim=1)  # [R] leading accepts

    # The emitted token comes from position n = num_accepted.
    p_next = target_probs[rows, num_accepted].float()  # [R, V]
    rejected = num_accepted < num_verify  # [R]; otherwise a bonus from p
    q_pos = num_accepted.clamp(max=max(num_draft - 1, 0))
    q_next = draft_probs[rows, q_pos].float() if num_draft > 0 else torch.zeros_like(p_next)
    # Leviathan Alg. 1: on rejection resample from norm(max(0, p - q)).
    residual = (p_next - q_next).clamp(min=0)  # [R, V]; NaN only on rows that take p_next
    residual_mass = residual.sum(dim=-1, keepdim=True)  # [R, 1]
    use_residual = rejected[:, None] & (residual_mass > RESIDUAL_EPS)
    next_probs = torch.where(use_residual, residual / residual_mass, p_next)  # [R, V]
    next_ids = sample(next_probs, resample_uniforms.to(device))
    return num_accepted.long(), next_ids


def verify_greedy(
    target_ids: torch.Tensor,  # [R, G+1] target argmax at the anchor and after each draft
    draft_ids: torch.Tensor,  # [R, G] long
    num_verify: torch.Tensor,  # [R] long in [0, G]
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [R] long, next_ids [R] long
    """`verify` for rows that are all greedy, from token ids alone: with one-hot p and q the
    rule accepts x_k iff it is the target's argmax, and the token after the accepted ones is
    the target's argmax there (the residual max(0, p - q) is one-hot on it too). Needs no
    [R, G, V] distributions; entries beyond `num_verify` may hold anything."""
    num_draft = draft_ids.shape[1]
    device = target_ids.device
    num_verify = num_verify.to(device).long()
    verified = torch.arange(num_draft, device=device)[None, :] < num_verify[:, None]  # [R, G]
    accepted = (draft_ids.to(device) == target_ids[:, :num_draft]) & verified
    num_accepted = torch.cumprod(accepted.int(), dim=1).sum(dim=1)  # [R]
    rows = torch.arange(target_ids.shape[0], device=device)
    return num_accepted.long(), target_ids[rows, num_accepted].long()


def _check_shapes(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_ids: torch.Tensor,
    num_verify: torch.Tensor,
    accept_uniforms: torch.Tensor,
    resample_uniforms: torch.Tensor,
) -> None:
    if draft_probs.dim() != 3:
        raise ValueError(f"draft_probs must be [R, G, V]; got {tuple(draft_probs.shape)}")
    num_requests, num_draft, vocab_size = draft_probs.shape
    expected = {
        "target_probs": (target_probs, (num_requests, num_draft + 1, vocab_size)),
        "draft_ids": (draft_ids, (num_requests, num_draft)),
        "num_verify": (num_verify, (num_requests,)),
        "accept_uniforms": (accept_uniforms, (num_requests, num_draft)),
        "resample_uniforms": (resample_uniforms, (num_requests,)),
    }
    for name, (value, shape) in expected.items():
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{name} must have shape {list(shape)} (R, G, V from draft_probs); "
                f"got {list(value.shape)}"
            )
