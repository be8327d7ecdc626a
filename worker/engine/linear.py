"""Linear layers whose weights are laid out once for oneDNN, the CPU's matmul library.

`F.linear` on a bfloat16 CPU tensor hands the weight to oneDNN in its plain `[out, in]`
layout, and oneDNN reorders it into its blocked layout on every call. At serving batch sizes
(a few to a few dozen rows) that reorder is a large share of the matmul: on a 2-core AVX512-BF16
machine a `[1, 256] x [256, 8192]` projection takes 173 us through `F.linear` and 85 us with the
weight packed beforehand; at 32 rows 745 against 631 us. `Linear` packs the weight once, with
torch's own binding of oneDNN (the ops its compiler uses for frozen CPU graphs), and falls back to
`F.linear` wherever that is not available or not exact: other devices, other dtypes, a CPU
without native bfloat16 matmuls, or a torch whose oneDNN ops differ.

The packed copy is held beside the model's own weight (the model's modules still run for audits
and tests), so a packed projection costs its weight's bytes a second time; `packed_bytes` says how
many.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_probe: dict = {}


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights of `dtype` on `device` can be packed for oneDNN here: a CPU with native
    bfloat16 matmuls, whose packed product matches `F.linear` bit for bit on a probe."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    if "ok" not in _probe:
        _probe["ok"] = _probe_packing()
    return _probe["ok"]


def _probe_packing() -> bool:
    try:
        if not (torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(48, 64, generator=gen).bfloat16()
        b = torch.randn(48, generator=gen).bfloat16()
        x = torch.randn(5, 64, generator=gen).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return bool(torch.equal(out, F.linear(x, w, b)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class Linear:
    """`y = x W^T + b` over a 2-D `x`, through a packed weight where `pack` and the machine
    allow it, else `F.linear`. The weight and bias are the model's own (not copied)."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 pack: bool = False):
        self.weight, self.bias = weight, bias
        self.packed = None
        if pack and packing_supported(weight.device, weight.dtype):
            with torch.inference_mode():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none",
                                                  [], "")

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed copy (0 where the weight is used as it is)."""
        return 0 if self.packed is None else self.weight.numel() * self.weight.element_size()


class PackedLinear(nn.Linear):
    """An `nn.Linear` (the same parameters, the same state dict) whose forward runs through a
    packed copy of its weight (`Linear`). Made by `pack_linears`, for inference only: the
    packed copy does not follow later changes to the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._packed(x)


def pack_linears(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Turn every `nn.Linear` under `module` (but those named in `skip`) into a `PackedLinear`,
    where the machine packs their dtype; returns the bytes packed."""
    total = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name in skip:
                continue
            packed = Linear(child.weight, child.bias, pack=True)
            if packed.packed is None:
                continue
            child.__class__ = PackedLinear  # in place: the same module, its parameters kept
            child._packed = packed
            total += packed.packed_bytes
    return total
