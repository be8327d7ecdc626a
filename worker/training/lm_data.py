"""Language-model data: documents -> one token stream -> fixed windows, in a seeded order.

Each document is tokenized on its own and followed by the end-of-text token; the stream is cut
into back-to-back windows of `seq_len` tokens (the tail shorter than a window is dropped).
Every epoch visits all windows in a permutation drawn from `seed + epoch`, so a run's data
position is one integer (windows consumed) and a resumed run sees exactly the same batches.

Knows: tokens and windows. Does not know: models or optimizers.
"""

from __future__ import annotations

import torch

from worker.training.corpus import Document


def token_windows(tokenizer, docs: list[Document], seq_len: int) -> torch.Tensor:
    """All full windows of the EOS-joined token stream of `docs`.  # [num_windows, seq_len] int64"""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one input and one target token), "
                         f"got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; expected one to separate documents")
    stream: list[int] = []
    for ids in tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]:
        stream += ids
        stream.append(eos)
    num_windows = len(stream) // seq_len
    return torch.tensor(stream[: num_windows * seq_len],
                        dtype=torch.long).view(num_windows, seq_len)


def batch_at(windows: torch.Tensor, position: int, batch_size: int, seed: int) -> torch.Tensor:
    """The `batch_size` windows starting at global `position` of the seeded epoch order.
    # [batch, seq_len]"""
    num_windows = windows.shape[0]
    rows, orders = [], {}
    for p in range(position, position + batch_size):
        epoch = p // num_windows
        if epoch not in orders:
            orders[epoch] = epoch_order(num_windows, seed, epoch)
        rows.append(orders[epoch][p % num_windows])
    return windows[torch.stack(rows)]


def epoch_order(num_windows: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of window indices used in `epoch`.  # [num_windows]"""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_windows, generator=generator)
