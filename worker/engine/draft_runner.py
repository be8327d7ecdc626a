"""The drafter on ragged batches: its context cache, and one draft pass for many requests.

The draft side of the engine, as `model_runner.TargetRunner` is the target side. A drafting
request's context is the target's features at its committed positions, projected into the
drafter's keys and values (`extend_context`) and kept in a `PagedKV` of its own. A draft pass
(`propose`) runs the drafter's backbone once for all drafting requests, each block attending
that cache where it lies (`attention.paged_attention`), then the sequential Markov stage.

Knows: a `DSparkDraft`, its `PagedKV`, paged attention, the reduced draft vocabulary.
Does not know: requests, sampling (the caller's `sample_fn` draws each block position),
confidence calibration, policies or verification.
"""

from __future__ import annotations

import torch

from worker.engine.attention import attention_meta, paged_attention
from worker.engine.draft_vocab import DraftVocab
from worker.engine.drafter import DSparkDraft
from worker.engine.kv_cache import PagedKV
from worker.engine.model_runner import packed_index


class DraftRunner:
    """One drafter and its context cache on one device.

    A request's context is written when it is about to draft, not as its tokens are committed
    (`defer_context`, `flush_context`): under load the draft gate may keep a request from
    drafting for its whole life, and then its context would cost a projection per token for
    nothing (at 64 requests on a 2-core CPU, 7% of a step). Deferred features are views of
    the target forwards' outputs; a request holding `max_deferred` tokens of them is written
    at once, which bounds their memory by `max_deferred` tokens a request."""

    def __init__(self, draft: DSparkDraft, kv: PagedKV, device: torch.device,
                 vocab: DraftVocab | None = None, max_deferred: int = 512):
        self.draft, self.kv, self.device, self.vocab = draft, kv, device, vocab
        self.max_deferred = max_deferred
        self._deferred: dict[str, _Deferred] = {}
        self._next: dict[str, int] = {}  # the next position a sequence's context takes

    def propose(self, seq_ids: list[str], anchors: list[int], ctx_lens: list[int], sample_fn,
                backend: str):
        """One draft block per sequence: the backbone over its cached context (`ctx_lens[i]`
        positions, all before its anchor `anchors[i]`), then the Markov stage, drawing each
        position with `sample_fn` (`DSparkDraft.draft_block`); `backend` is the paged
        attention implementation (the target runner's). Returns (ids [S, G], probs [S, G, V]
        or None, conf_logits [S, G] or None)."""
        gamma = self.draft.gamma
        anchor_ids = torch.tensor(anchors, device=self.device)
        anchor_pos = torch.tensor(ctx_lens, device=self.device)  # the context before the anchor
        meta = attention_meta(self.kv.block_tables(seq_ids),
                              [gamma] * len(seq_ids),  # every block row sees all the context
                              [n for n in ctx_lens for _ in range(gamma)],
                              self.kv.allocator.block_size, backend)
        scale = self.draft.config.head_dim ** -0.5

        def context_attention(layer: int, q: torch.Tensor):
            return paged_attention(q, self.kv.k[layer], self.kv.v[layer], meta, scale)

        h = self.draft.backbone_paged(anchor_ids, anchor_pos, context_attention)
        return self.draft.draft_block(h, anchor_ids, sample_fn, self.vocab)

    def extend_context(self, seq_ids: list[str], feats: torch.Tensor, rows: list[int],
                       counts: list[int], positions: list[int]) -> None:
        """Write context keys/values for `counts[i]` tokens of sequence i, at `positions[i]`
        onwards, from the packed target features `feats` starting at row `rows[i]`."""
        seq_of, offset = packed_index(torch.tensor(counts, device=self.device))
        src = torch.tensor(rows, device=self.device)[seq_of] + offset
        pos = torch.tensor(positions, device=self.device)[seq_of] + offset
        for sid, p, c in zip(seq_ids, positions, counts):
            self.kv.allocator.grow(sid, p + c)
        slots = self.kv.packed_slots(seq_ids, seq_of, pos)
        ctx = self.draft.project_context(feats[src])
        for layer in range(self.draft.config.num_hidden_layers):
            k, v = self.draft.context_kv(layer, ctx, pos)
            self.kv.write(layer, slots, k, v)

    def defer_context(self, seq_ids: list[str], feats: torch.Tensor, rows: list[int],
                      counts: list[int], positions: list[int], *, copy: bool = False) -> None:
        """`extend_context`, postponed until the sequence drafts (`flush_context`), or holds
        `max_deferred` tokens. A sequence's deferred positions must follow one another.
        `copy`: hold a copy of each sequence's rows, not a view of `feats` (for a prefill's
        features: measured at 16 requests on a 2-core CPU, holding views of the whole prefill
        output left the decode forwards that followed 3.5-7% slower than `ar`'s, holding
        copies within 1.5%; the copy is a few milliseconds a prefill)."""
        full = []
        following, deferred = self._next, self._deferred  # per request and step: host time
        for sid, row, count, pos in zip(seq_ids, rows, counts, positions):
            expected = following.get(sid, pos)
            if pos != expected:
                raise RuntimeError(f"draft context of {sid!r}: position {pos} deferred after "
                                   f"{expected}")
            following[sid] = pos + count
            held = deferred.get(sid)
            if held is None:
                held = deferred[sid] = _Deferred(pos)
            if copy:
                held.parts.append((feats[row:row + count].clone(), 0, count))
            else:  # sliced when written: a step's host time
                held.parts.append((feats, row, count))
            held.count += count
            if held.count >= self.max_deferred:
                full.append(sid)
        if full:
            self.flush_context(full)

    def flush_context(self, seq_ids: list[str]) -> None:
        """Write the deferred context of `seq_ids` (those holding any), in one batch."""
        held = [(sid, self._deferred.pop(sid)) for sid in seq_ids if sid in self._deferred]
        if not held:
            return
        rows, row = [], 0
        for _, d in held:
            rows.append(row)
            row += d.count
        feats = torch.cat([f[first:first + n] for _, d in held for f, first, n in d.parts])
        self.extend_context([sid for sid, _ in held], feats, rows, [d.count for _, d in held],
                            [d.start for _, d in held])

    def deferred_tokens(self, seq_id: str) -> int:
        """Tokens of `seq_id`'s context not yet written (0: none)."""
        held = self._deferred.get(seq_id)
        return held.count if held is not None else 0

    def forget(self, seq_id: str) -> None:
        """Drop a finished sequence's deferred context."""
        self._deferred.pop(seq_id, None)
        self._next.pop(seq_id, None)


class _Deferred:
    """Target features of consecutive positions from `start`, not yet in the context cache."""

    def __init__(self, start: int):
        self.start, self.count = start, 0
        self.parts: list[tuple[torch.Tensor, int, int]] = []  # (features, first row, rows)
