"""A reduced draft vocabulary: the drafter proposes only the target's most frequent tokens.

The drafter's two vocabulary-wide projections (`lm_head` for the base logits U_k, and the
Markov head's W2 for the transition bias) are most of a draft pass on a CPU: at V = 8192 and
width 256 they cost as much as the target's own `lm_head` over twice the tokens. Restricting
the drafter to the N tokens the target writes most often (a ranking shipped beside the draft
as `draft_vocab.json`, counted over the target's answers in the drafter's training data) cuts
both by V / N. Verification is untouched, so output stays lossless: the draft distribution q
is the softmax over the N kept tokens (zero elsewhere), and a target token outside them is
simply never proposed. The cost is the acceptance lost at positions where the target wants a
token outside the N (the ranking file records the share of answer tokens the top N cover).

Scope: the ranking file, and the restricted weights a draft pass uses. Not here: the draft
pass itself (`drafter.DSparkDraft.draft_block` takes a `DraftVocab`), counting tokens
(`worker.training`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from worker.engine.linear import Linear

RANKING_NAME = "draft_vocab.json"


def rank_tokens(counts: torch.Tensor) -> list[int]:
    """Token ids by count, most frequent first (ties: lower id first), all of the vocabulary."""
    return torch.sort(counts, descending=True, stable=True).indices.tolist()


def save_ranking(counts: torch.Tensor, out_dir: str | Path) -> Path:
    """Write `draft_vocab.json`: the ranking and, for a few sizes N, the share of counted
    tokens the top N cover."""
    ranked = rank_tokens(counts)
    total = max(1, int(counts.sum()))
    cumulative = torch.cumsum(counts[torch.tensor(ranked)], 0)
    sizes = [n for n in (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
             if n < len(ranked)] + [len(ranked)]
    record = {"ranked_token_ids": ranked, "counted_tokens": int(counts.sum()),
              "coverage": {str(n): round(int(cumulative[n - 1]) / total, 4) for n in sizes}}
    path = Path(out_dir) / RANKING_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    tmp.replace(path)
    return path


def load_ranking(draft_dir: str | Path, vocab_size: int) -> list[int] | None:
    """The ranking in `draft_dir`, checked to be a permutation of the vocabulary; None when the
    draft ships none (the released checkpoints do not)."""
    path = Path(draft_dir) / RANKING_NAME
    if not path.is_file():
        return None
    try:
        ranked = json.loads(path.read_text())["ranked_token_ids"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected a JSON object with 'ranked_token_ids' "
                         f"({err})") from None
    if (not isinstance(ranked, list) or len(ranked) != vocab_size
            or sorted(ranked) != list(range(vocab_size))):
        raise ValueError(f"{path}: ranked_token_ids must list every token id of the "
                         f"{vocab_size}-token vocabulary exactly once")
    return ranked


MARKOV_TABLE_MAX_BYTES = 64 << 20
"""The most memory a reduced vocabulary's Markov bias table may take (the shipped pair's,
8,192 x 2,048 in bfloat16: 32 MiB; a 151,936-token vocabulary's would not fit, and there a
draft step's projection costs little beside the target's forward)."""


@dataclass(frozen=True)
class DraftVocab:
    """The N kept token ids and the rows of the vocabulary-wide draft weights for them."""

    token_ids: torch.Tensor  # [N] long, the kept ids (most frequent first)
    lm_head: Linear  # [N, d] rows of the drafter's lm_head: h [..., d] -> logits [..., N]
    markov_w2: torch.Tensor | None  # [N, r] rows of the Markov head's W2; None without one
    markov_table: torch.Tensor | None = None
    """[V, N] the Markov bias of every previous token onto the kept ones
    (`MarkovHead.transition_table`), where the head has one and it takes at most
    `MARKOV_TABLE_MAX_BYTES`; None: computed each draft step."""

    def packed(self) -> "DraftVocab":
        """This vocabulary with its `lm_head` rows packed for oneDNN where the machine can."""
        return replace(self, lm_head=Linear(self.lm_head.weight, None, pack=True))

    @classmethod
    def build(cls, draft, ranking: list[int], size: int) -> "DraftVocab":
        """The top `size` tokens of `ranking` for `draft` (copies of its weight rows)."""
        vocab = draft.lm_head.weight.shape[0]
        if not 1 <= size <= vocab:
            raise ValueError(f"draft_vocab_size: expected 0 (the full vocabulary) or an integer "
                             f"in [1, {vocab}], got {size}")
        ids = torch.tensor(ranking[:size], dtype=torch.long, device=draft.lm_head.weight.device)
        head = draft.markov_head
        w2 = head.markov_w2.weight[ids].contiguous() if head is not None else None
        table = None
        if head is not None and vocab * size * w2.element_size() <= MARKOV_TABLE_MAX_BYTES:
            with torch.inference_mode():
                table = head.transition_table(w2)
        return cls(ids, Linear(draft.lm_head.weight[ids].contiguous()), w2, table)
