"""Token-budget KV cache: a paged block allocator with reservations and rollback.

Knows: which fixed-size blocks of a cache pool each sequence owns, how many tokens it holds,
and how many blocks it has reserved at admission. Admission reserves a sequence's worst case
(prompt + max_tokens), so a running sequence can always grow and never needs preemption;
blocks are still taken lazily, as tokens are written, and given back on rollback.

Does not know: tensors, models or layers. `PagedKV` (below) holds the tensors one allocator
indexes; the model runner and the engine write them, and `attention.paged_attention` reads
them in place through the block tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class CacheBudgetError(ValueError):
    """A sequence can never fit the cache budget (or is not known to the cache)."""


@dataclass
class _Seq:
    reserved_blocks: int
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


class BlockAllocator:
    """Paged allocator over `num_blocks` blocks of `block_size` token slots each."""

    def __init__(self, num_blocks: int, block_size: int, name: str = "kv cache"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"{name}: num_blocks and block_size must be >= 1")
        self.name = name
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._seqs: dict[str, _Seq] = {}
        self._reserved = 0

    # -- admission -------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_reserve(self, max_tokens: int) -> bool:
        return self._reserved + self.blocks_for(max_tokens) <= self.num_blocks

    def check_fits_ever(self, max_tokens: int) -> None:
        """Refuse a sequence whose worst case exceeds the whole budget."""
        if self.blocks_for(max_tokens) > self.num_blocks:
            raise CacheBudgetError(
                f"{self.name}: a request needing up to {max_tokens} tokens can never fit the "
                f"budget of {self.num_blocks * self.block_size} tokens; shorten the prompt or "
                f"max_tokens, or raise the cache budget"
            )

    def reserve(self, seq_id: str, max_tokens: int) -> None:
        self.check_fits_ever(max_tokens)
        if seq_id in self._seqs:
            raise CacheBudgetError(f"{self.name}: sequence {seq_id!r} is already admitted")
        if not self.can_reserve(max_tokens):
            raise CacheBudgetError(f"{self.name}: budget exhausted, admit {seq_id!r} later")
        blocks = self.blocks_for(max_tokens)
        self._seqs[seq_id] = _Seq(reserved_blocks=blocks)
        self._reserved += blocks

    # -- growth and rollback ---------------------------------------------------------------
    def grow(self, seq_id: str, num_tokens: int) -> None:
        """Make room for `num_tokens` tokens in total (existing + new)."""
        seq = self._seq(seq_id)
        need = self.blocks_for(num_tokens)
        if need > seq.reserved_blocks:
            raise CacheBudgetError(
                f"{self.name}: sequence {seq_id!r} asked for {num_tokens} tokens, beyond its "
                f"reservation of {seq.reserved_blocks * self.block_size}"
            )
        while len(seq.blocks) < need:
            seq.blocks.append(self._free.pop())
        seq.num_tokens = max(seq.num_tokens, num_tokens)

    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """Roll back to `num_tokens` tokens; blocks past them return to the pool."""
        seq = self._seq(seq_id)
        if num_tokens > seq.num_tokens:
            raise CacheBudgetError(f"{self.name}: cannot truncate {seq_id!r} forward")
        keep = self.blocks_for(num_tokens)
        while len(seq.blocks) > keep:
            self._free.append(seq.blocks.pop())
        seq.num_tokens = num_tokens

    def free(self, seq_id: str) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        self._free.extend(reversed(seq.blocks))
        self._reserved -= seq.reserved_blocks

    # -- lookups ---------------------------------------------------------------------------
    def num_tokens(self, seq_id: str) -> int:
        return self._seq(seq_id).num_tokens

    def block_table(self, seq_id: str) -> list[int]:
        return self._seq(seq_id).blocks

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_reserved_blocks(self) -> int:
        return self._reserved

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    def _seq(self, seq_id: str) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise CacheBudgetError(f"{self.name}: unknown sequence {seq_id!r}") from None


class PagedKV:
    """The key/value tensors one allocator indexes:
    `[num_layers, num_slots, kv_heads, head_dim]`."""

    def __init__(self, allocator: BlockAllocator, num_layers: int, num_kv_heads: int,
                 head_dim: int, *, device: torch.device, dtype: torch.dtype):
        self.allocator = allocator
        num_slots = allocator.num_blocks * allocator.block_size
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.device = device

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # slots: [N]; k, v: [N, kv_heads, head_dim]
        self.k[layer, slots] = k
        self.v[layer, slots] = v

    def block_tables(self, seq_ids: list[str]) -> torch.Tensor:
        """Padded block tables `[R, max_blocks]` (padding points at block 0, masked by users)."""
        tables = [self.allocator.block_table(s) for s in seq_ids]
        width = max(1, max(len(t) for t in tables))
        rows = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def packed_slots(self, seq_ids: list[str], seq_of: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
        """Slot of each packed token: seq_of, positions `[N]` -> `[N]`."""
        bs = self.allocator.block_size
        return self.block_tables(seq_ids)[seq_of, positions // bs] * bs + positions % bs
