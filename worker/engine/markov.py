"""DSpark's sequential stage: the Markov heads and the confidence head (docs/DSPARK.md 1.3, 1.4).

Scope: one step ``k`` of the left-to-right loop for a batch of ``R`` rows: the transition bias
``B(x_{k-1})`` added to the base logits ``U_k``, and the raw confidence logit for position
``k``. Parameter names nest under ``markov_head.`` / ``confidence_head.`` to give exactly the
tensor names of the released checkpoints (docs/DSPARK.md 5).

Not in scope: the loop itself and sampling (``drafter.DSparkDraft.draft_block`` and the
engine's sampler), temperature scaling of confidence (STS feeds the verify-length policy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MarkovHead(nn.Module):
    """Vanilla low-rank transition: ``B(x) = W2 · W1[x]`` (docs/DSPARK.md 1.3)."""

    def __init__(self, vocab_size: int, hidden_size: int, rank: int):
        super().__init__()
        self.rank = rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)  # W1: V x r
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)  # W2: weight V x r

    def init_state(self, num_rows: int) -> torch.Tensor | None:
        """The recurrent state before step 1; the vanilla and gated heads keep none."""
        return None

    def step(self, h_k: torch.Tensor, prev_ids: torch.Tensor, state: torch.Tensor | None,
             w2: torch.Tensor | None = None, table: torch.Tensor | None = None):
        """One step: ``h_k`` [R, d], ``prev_ids`` [R] (``x_{k-1}``) ->
        (bias [R, V], prev_embed ``W1[x_{k-1}]`` [R, r], new state). ``w2`` [N, r]: rows of
        W2 to project onto instead of all V (a reduced draft vocabulary; bias [R, N]).
        ``table``: `transition_table(w2)`, whose rows are the biases, read instead of
        computed (the gated and recurrent heads have none: their bias depends on ``h_k``)."""
        prev_embed = self.markov_w1(prev_ids)  # [R, r]
        if table is not None:
            return table[prev_ids], prev_embed, state
        return self._bias(prev_embed, w2), prev_embed, state

    def transition_table(self, w2: torch.Tensor | None = None) -> torch.Tensor | None:
        """``B(x)`` for every ``x`` at once, [V, V] (or [V, N] onto `w2`'s rows): the vanilla
        head's bias depends on ``x_{k-1}`` alone, so a draft step can read its row instead
        of projecting (one row copy against a rank x N product per row and step). The same
        product, so the same values."""
        return self._bias(self.markov_w1.weight, w2)

    def _bias(self, x: torch.Tensor, w2: torch.Tensor | None) -> torch.Tensor:
        return self.markov_w2(x) if w2 is None else F.linear(x, w2)


class GatedMarkovHead(MarkovHead):
    """Gated variant: ``B = W2 · (sigmoid(gate_proj([h_k ; W1[x_{k-1}]])) * W1[x_{k-1}])``."""

    def __init__(self, vocab_size: int, hidden_size: int, rank: int):
        super().__init__(vocab_size, hidden_size, rank)
        self.gate_proj = nn.Linear(hidden_size + rank, rank)  # weight r x (d + r), bias r

    def step(self, h_k, prev_ids, state, w2=None, table=None):
        prev_embed = self.markov_w1(prev_ids)  # [R, r]
        gate = torch.sigmoid(self.gate_proj(torch.cat([h_k, prev_embed], dim=-1)))  # [R, r]
        return self._bias(gate * prev_embed, w2), prev_embed, state

    def transition_table(self, w2=None) -> None:
        return None  # the gate reads h_k


class RnnMarkovHead(MarkovHead):
    """GRU-like variant over ``[s_{k-1} ; W1[x_{k-1}] ; h_k]`` with one joint projection.

    ``z = joint_proj(...)`` splits into (gate, candidate, output);
    ``s_k = (1 - sigmoid(gate)) * s_{k-1} + sigmoid(gate) * tanh(candidate)``;
    ``B_k = W2 · tanh(output)``; ``s_0 = 0``.
    """

    def __init__(self, vocab_size: int, hidden_size: int, rank: int):
        super().__init__(vocab_size, hidden_size, rank)
        self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)  # 3r x (2r + d), bias 3r

    def init_state(self, num_rows: int) -> torch.Tensor:
        w = self.markov_w1.weight
        return torch.zeros(num_rows, self.rank, device=w.device, dtype=w.dtype)  # [R, r]

    def step(self, h_k, prev_ids, state, w2=None, table=None):
        prev_embed = self.markov_w1(prev_ids)  # [R, r]
        z = self.joint_proj(torch.cat([state, prev_embed, h_k], dim=-1))  # [R, 3r]
        gate, candidate, output = z.split(self.rank, dim=-1)
        gate = torch.sigmoid(gate)
        new_state = (1 - gate) * state + gate * torch.tanh(candidate)  # [R, r]
        return self._bias(torch.tanh(output), w2), prev_embed, new_state

    def transition_table(self, w2=None) -> None:
        return None  # the bias reads the state and h_k


MARKOV_HEADS = {"vanilla": MarkovHead, "gated": GatedMarkovHead, "rnn": RnnMarkovHead}


class ConfidenceHead(nn.Module):
    """``c_k = sigmoid(w · [h_k ; W1[x_{k-1}]] + b)`` (docs/DSPARK.md 1.4), or ``w · h_k + b``
    when the checkpoint's confidence head does not read the Markov embedding.

    Returns the raw logit: the engine applies sequential temperature scaling, then sigmoid.
    """

    def __init__(self, hidden_size: int, markov_rank: int):
        super().__init__()
        self.uses_markov = markov_rank > 0
        self.proj = nn.Linear(hidden_size + markov_rank, 1)  # weight 1 x (d + r), bias 1

    def forward(self, h_k: torch.Tensor, prev_embed: torch.Tensor | None) -> torch.Tensor:
        """``h_k`` [..., d], ``prev_embed`` [..., r] or None -> confidence logit [...] (one
        position's rows, or every position of a block at once)."""
        x = torch.cat([h_k, prev_embed], dim=-1) if self.uses_markov else h_k
        return self.proj(x).squeeze(-1)
