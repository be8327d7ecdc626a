"""The DSpark training forward and loss (docs/DSPARK.md 4), run on the drafter's own modules.

Teacher forcing of many anchor blocks per sequence in one pass. A block is
``[anchor, mask x (gamma-1)]`` at positions ``anchor .. anchor+gamma-1``; slot ``j`` predicts
token ``anchor+j+1``. Every block of a sequence shares that sequence's context keys/values,
computed once per draft layer by ``DSparkDraft.context_kv``; a block mask lets each block see
the context before its anchor and itself (bidirectionally), as ``DSparkDraft.backbone`` does
for one block. The sequential stage runs the drafter's own Markov and confidence heads with
``x_{k-1}`` the ground truth (the anchor for ``k = 1``): a recurrent head through
``DSparkDraft.draft_block`` itself, with a "sampler" that returns the ground-truth token and
passes the logits through; a stateless head (vanilla, gated, none) at all positions at once.

Loss = 0.1 CE(draft, ground truth) + 0.9 L1(p_draft, p_target) + 1.0 BCE(c_k, c*_k),
``c*_k = 1 - ||p_draft_k - p_target_k||_1 / 2`` (detached), each term a mean over the valid
slots weighted by ``exp(-(k-1)/4)``. A slot is valid when its label lies inside the sequence and
the loss mask, and so are the labels of all earlier slots of its block.

Not here: data (``draft_data``), the optimiser and loop (``draft_train``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.engine.drafter import DSparkDraft
from worker.training.draft_data import DraftBatch


@dataclass(frozen=True)
class LossWeights:
    """Coefficients of the three loss terms and the per-position decay (docs/DSPARK.md 4)."""

    ce: float = 0.1
    """Cross-entropy against the ground-truth token."""
    l1: float = 0.9
    """L1 distance between the draft's and the target's full distributions."""
    bce: float = 1.0
    """Confidence head against the analytic acceptance rate (dropped without a confidence head)."""
    decay: float = 4.0
    """Position k (from 1) is weighted exp(-(k-1)/decay)."""


@dataclass
class Blocks:
    """Teacher-forced outputs of R = B x A anchor blocks of G = gamma slots each."""

    logits: torch.Tensor  # [R, G, V] U_k + B(x_{k-1}), x_{k-1} the ground truth
    conf_logits: torch.Tensor | None  # [R, G] raw confidence logits
    target_logits: torch.Tensor  # [R, G, V] the target's logits for the same tokens (no grad)
    labels: torch.Tensor  # [R, G] ground-truth token ids, 0 where invalid
    valid: torch.Tensor  # [R, G] bool


def sample_anchors(batch: DraftBatch, num_anchors: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `num_anchors` distinct anchors per sequence, uniformly among positions whose next
    token is a label. Returns anchors [B, A] long (0 where unused) and anchor_valid [B, A]."""
    num_seqs, width = batch.input_ids.shape
    next_is_label = torch.zeros_like(batch.loss_mask)
    next_is_label[:, :-1] = batch.loss_mask[:, 1:]
    next_is_label &= torch.arange(width)[None, :] + 1 < batch.lengths[:, None]
    scores = torch.rand(num_seqs, width, generator=generator)  # [B, S]
    scores = torch.where(next_is_label, scores, -1.0)
    num_anchors = min(num_anchors, width)
    top, anchors = scores.topk(num_anchors, dim=1)
    valid = top >= 0
    return torch.where(valid, anchors, 0), valid


def teacher_forced_blocks(draft: DSparkDraft, batch: DraftBatch, anchors: torch.Tensor,
                          anchor_valid: torch.Tensor) -> Blocks:
    """The draft's outputs for every anchor block of the batch; anchors [B, A],
    anchor_valid [B, A]."""
    gamma = draft.gamma
    label_pos = anchors[..., None] + torch.arange(gamma, device=anchors.device) + 1  # [B, A, G]
    labels, valid = _labels(batch, label_pos, anchor_valid)  # [B, A, G] each
    h = _block_hidden(draft, batch, anchors)  # [R, G, d]
    labels, valid = labels.flatten(0, 1), valid.flatten(0, 1)  # [R, G]
    anchor_ids = batch.input_ids.gather(1, anchors).flatten()  # [R]
    logits, conf_logits = _sequential_stage(draft, h, anchor_ids, labels)
    with torch.no_grad():  # the target's own head on its final hidden states (draft_data)
        source = torch.where(valid, label_pos.flatten(0, 1) - 1, 0)  # [R, G]
        rows = torch.arange(anchors.shape[0], device=anchors.device)
        rows = rows.repeat_interleave(anchors.shape[1])  # [R]
        target_logits = draft.lm_head(batch.target_hidden[rows[:, None], source].to(h.dtype))
    return Blocks(logits, conf_logits, target_logits, labels, valid)


def _sequential_stage(draft: DSparkDraft, h: torch.Tensor, anchor_ids: torch.Tensor,
                      labels: torch.Tensor):
    """Teacher-forced Markov and confidence heads: h [R, G, d], anchor_ids [R], labels [R, G]
    -> logits [R, G, V], confidence logits [R, G] or None."""
    head = draft.markov_head
    if head is not None and head.init_state(1) is not None:  # a recurrent head: as served
        def teacher(k: int, logits_k: torch.Tensor):  # x_k := the ground truth; keep the logits
            return labels[:, k - 1], logits_k

        _, logits, conf_logits = draft.draft_block(h, anchor_ids, teacher)
        return logits, conf_logits
    # A stateless head's step k reads only (h_k, x_{k-1}): all positions in one call of the
    # same modules, which spares the backward pass gamma full-vocabulary slices.
    num_rows, gamma = labels.shape
    prev_ids = torch.cat([anchor_ids[:, None], labels[:, :-1]], dim=1).flatten()  # [R*G]
    h_flat = h.flatten(0, 1)  # [R*G, d]
    logits, prev_embed = draft.lm_head(h), None  # [R, G, V]
    if head is not None:
        bias, prev_embed, _ = head.step(h_flat, prev_ids, None)  # [R*G, V], [R*G, r]
        logits = logits + bias.view_as(logits)
    conf_logits = (draft.confidence_head(h_flat, prev_embed).view(num_rows, gamma)
                   if draft.confidence_head is not None else None)
    return logits, conf_logits


def _labels(batch: DraftBatch, label_pos: torch.Tensor, anchor_valid: torch.Tensor):
    """Ground-truth ids at label_pos [B, A, G] and their validity; invalid ids read as 0."""
    num_seqs = label_pos.shape[0]
    inside = label_pos < batch.lengths[:, None, None]
    flat = torch.where(inside, label_pos, 0).view(num_seqs, -1)  # [B, A*G]
    ok = inside & batch.loss_mask.gather(1, flat).view_as(label_pos) & anchor_valid[..., None]
    valid = ok.cumprod(dim=-1).bool()  # a slot counts only if every earlier slot does
    safe = torch.where(valid, label_pos, 0).view(num_seqs, -1)
    labels = torch.where(valid, batch.input_ids.gather(1, safe).view_as(label_pos), 0)
    return labels, valid


def _block_hidden(draft: DSparkDraft, batch: DraftBatch, anchors: torch.Tensor) -> torch.Tensor:
    """The parallel stage for all blocks: ``DSparkDraft.backbone`` with each sequence's blocks
    side by side as one query set over shared context keys. Returns h [B*A, G, d]."""
    num_seqs, width = batch.input_ids.shape
    num_anchors, gamma = anchors.shape[1], draft.gamma
    dev = anchors.device
    block_ids = torch.full((num_seqs, num_anchors, gamma), draft.config.mask_token_id, device=dev)
    block_ids[..., 0] = batch.input_ids.gather(1, anchors)  # [B, A, G]
    x = draft.embed_tokens(block_ids.flatten(1))  # [B, A*G, d]
    positions = (anchors[..., None] + torch.arange(gamma, device=dev)).flatten(1)  # [B, A*G]
    cos, sin = draft.rotary_emb(x, positions)  # [B, A*G, hd]
    mask = _block_mask(anchors, width, gamma)  # [B, 1, A*G, S + A*G]
    ctx = draft.project_context(batch.features.to(x.dtype)).flatten(0, 1)  # [B*S, d]
    ctx_pos = torch.arange(width, device=dev).repeat(num_seqs)  # [B*S]
    for i, layer in enumerate(draft.layers):
        k, v = draft.context_kv(i, ctx, ctx_pos)  # [B*S, kv_heads, hd]
        x = layer(x, cos, sin, k.unflatten(0, (num_seqs, width)), v.unflatten(0, (num_seqs, width)),
                  mask)
    return draft.norm(x).view(num_seqs * num_anchors, gamma, -1)


def _block_mask(anchors: torch.Tensor, width: int, gamma: int) -> torch.Tensor:
    """[B, 1, A*G, S + A*G] bool: a block's slots see context positions before its anchor and
    all slots of their own block, nothing else (docs/DSPARK.md 2)."""
    num_seqs, num_anchors = anchors.shape
    # [B, A, S]
    ctx = torch.arange(width, device=anchors.device)[None, None, :] < anchors[..., None]
    ctx = ctx.repeat_interleave(gamma, dim=1)  # [B, A*G, S]
    own = torch.eye(num_anchors, dtype=torch.bool, device=anchors.device)
    own = own.repeat_interleave(gamma, 0).repeat_interleave(gamma, 1)  # [A*G, A*G]
    return torch.cat([ctx, own.expand(num_seqs, -1, -1)], dim=-1)[:, None]


def position_weights(gamma: int, decay: float) -> torch.Tensor:
    """[G]: exp(-(k-1)/decay) for k = 1..gamma."""
    return torch.exp(-torch.arange(gamma, dtype=torch.float64) / decay)


def slot_terms(blocks: Blocks) -> dict[str, torch.Tensor]:
    """Unweighted per-slot loss terms, each [R, G]: ce, l1 and (with confidence) bce."""
    logp = F.log_softmax(_at_least_fp32(blocks.logits), dim=-1)  # [R, G, V]
    target_p = torch.softmax(_at_least_fp32(blocks.target_logits), dim=-1)  # [R, G, V]
    terms = {"ce": -logp.gather(-1, blocks.labels[..., None]).squeeze(-1),
             "l1": (logp.exp() - target_p).abs().sum(-1)}
    if blocks.conf_logits is not None:
        accept = (1 - 0.5 * terms["l1"]).detach().clamp(0, 1)  # analytic acceptance rate c*_k
        terms["bce"] = F.binary_cross_entropy_with_logits(_at_least_fp32(blocks.conf_logits),
                                                          accept, reduction="none")
    return terms


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def weighted_mean(term: torch.Tensor, valid: torch.Tensor, decay: float) -> torch.Tensor:
    """Mean of term [R, G] over valid slots, position k weighted exp(-(k-1)/decay)."""
    w = position_weights(term.shape[1], decay).to(term.dtype) * valid  # [R, G]
    return torch.where(valid, term, 0).mul(w).sum() / w.sum().clamp(min=1e-12)


def dspark_loss(blocks: Blocks, weights: LossWeights = LossWeights()) -> tuple[torch.Tensor, dict]:
    """The training loss and float metrics: each term, the draft's greedy agreement with the
    target and the mean analytic acceptance per position (over valid slots)."""
    terms = slot_terms(blocks)
    parts = {name: weighted_mean(t, blocks.valid, weights.decay) for name, t in terms.items()}
    loss = sum(getattr(weights, name) * value for name, value in parts.items())
    with torch.no_grad():
        counts = blocks.valid.sum(0).clamp(min=1)  # [G]
        agree = (blocks.logits.argmax(-1) == blocks.target_logits.argmax(-1)) & blocks.valid
        accept = torch.where(blocks.valid, 1 - 0.5 * terms["l1"], 0)
        metrics = {name: float(v) for name, v in parts.items()} | {
            "loss": float(loss), "num_slots": int(blocks.valid.sum()),
            "greedy_agree": [round(float(x), 4) for x in agree.sum(0) / counts],
            "accept_t1": [round(float(x), 4) for x in accept.sum(0) / counts]}
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"the draft loss is not finite: {metrics}")
    return loss, metrics
