"""From a step's target logits to its tokens: each request's sampling parameters per row, the
next token of a plain row, and the accepted drafts and next token of every decoding row.

A decoding row verifies its draft tokens with the speculative-sampling rule (`rejection`)
against the target's warped distributions (`sampling.warp_probs`), or, when every row is
greedy, by matching ids (`verify_greedy`); a step in which nobody drafted samples each row's
next token directly. The draws are the plan's (`StepPlan.uniforms`), so every request's
randomness is its own.

Knows: requests' sampling parameters, the plan's rows and draws, tensors. Does not know:
models, caches, policies, or how tokens are committed.
"""

from __future__ import annotations

import torch

from worker.engine.model_runner import packed_index
from worker.engine.planner import StepPlan
from worker.engine.rejection import verify, verify_greedy
from worker.engine.sampling import argmax_rows, sample, warp_probs
from worker.engine.spec_step import DraftProposal, pad_rows


def sampling_columns(reqs, repeats: list[int], device: torch.device):
    """(temperature, top_k, top_p), one entry per row: request i's repeated `repeats[i]`
    times."""
    rep = torch.tensor(repeats, device=device)

    def col(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device).repeat_interleave(rep)

    return (col([r.params.temperature for r in reqs], torch.float32),
            col([r.params.top_k for r in reqs], torch.long),
            col([r.params.top_p for r in reqs], torch.float32))


def next_tokens(reqs, logits: torch.Tensor, repeats: list[int], uniforms: torch.Tensor,
                device: torch.device) -> torch.Tensor:
    """One token per logits row, drawn from its request's warped distribution."""
    if all(r.params.temperature == 0 for r in reqs):
        return argmax_rows(logits)  # what warp_probs' one-hot rows would give
    return sample(warp_probs(logits, *sampling_columns(reqs, repeats, device)), uniforms)


def verify_step(plan: StepPlan, logits: torch.Tensor, draft_ids: torch.Tensor,
                proposal: DraftProposal | None, *, gamma: int, vocab_size: int,
                device: torch.device) -> tuple[list[int], list[int]]:
    """(accepted draft tokens, next token) per decoding row of `plan`, from the verify
    forward's `logits` (one row per packed token) and the rows' padded `draft_ids` [R, G]."""
    reqs, num_new, u = plan.decode, plan.num_new, plan.uniforms
    if not plan.drafting:  # plain decoding: sample the next token directly
        nxt = next_tokens(reqs, logits, num_new, u[:, 2 * gamma], device)
        return [0] * len(reqs), nxt.tolist()
    num_verify = torch.tensor(plan.lengths, device=device)
    if all(r.params.temperature == 0 for r in reqs):  # ids decide (`verify_greedy`)
        target_ids = _padded(argmax_rows(logits), num_new, gamma, -1, device)
        n_acc, nxt = verify_greedy(target_ids, draft_ids, num_verify)
    else:
        target_probs = _padded(warp_probs(logits, *sampling_columns(reqs, num_new, device)),
                               num_new, gamma, 0, device)
        q = proposal.probs  # None when the drafting requests are all greedy: one-hot
        if q is None:
            q = torch.nn.functional.one_hot(proposal.ids, vocab_size).float()
        draft_probs = pad_rows(q, plan.drafting, len(reqs), gamma, device, vocab_size)
        n_acc, nxt = verify(target_probs, draft_probs, draft_ids.clamp(min=0), num_verify,
                            u[:, gamma:2 * gamma], u[:, 2 * gamma])
    return n_acc.tolist(), nxt.tolist()


def _padded(packed: torch.Tensor, num_new: list[int], gamma: int, fill,
            device: torch.device) -> torch.Tensor:
    """Packed per-token rows `[N, ...]` -> `[R, gamma + 1, ...]`, padded with `fill`."""
    out = packed.new_full((len(num_new), gamma + 1, *packed.shape[1:]), fill)
    seq_of, offset = packed_index(torch.tensor(num_new, device=device))
    out[seq_of, offset] = packed
    return out
