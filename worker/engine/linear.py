"""Linear layers whose weights are laid out once for oneDNN, the CPU's matmul library.

`F.linear` on a bfloat16 CPU tensor hands the weight to oneDNN in its plain `[out, in]`
layout, and oneDNN reorders it into its blocked layout on every call. At serving batch sizes
(a few to a few dozen rows) that reorder is a large share of the matmul: on a 2-core AVX512-BF16
machine a `[1, 256] x [256, 8192]` projection takes 173 us through `F.linear` and 85 us with the
weight packed beforehand; at 32 rows 745 against 631 us. `Linear` packs the weight once, with
torch's own binding of oneDNN (the ops its compiler uses for frozen CPU graphs), and falls back to
`F.linear` wherever that is not available or not exact: other devices, other dtypes, or a
torch whose oneDNN ops differ.

A CPU without native bfloat16 (or float16) matmuls (AVX2 only, no AVX512) gets a float32 copy of
the weight instead, and computes the product in float32, rounding it to the model's dtype: there
torch's half-precision matmul is emulated element by element and a serving batch is many times
slower than in float32 (on a 2-core AVX2 machine a `[64, 256] x [256, 1024]` projection took
3.97 ms in bfloat16 and 0.45 ms in float32; at one row 66 against 47 us). Accumulation is in
float32 either way; only the order of the sums differs from `F.linear`'s. The float32 copy is
packed for oneDNN too, where that keeps a row's product independent of the rows beside it
(`float32_packing_invariant`; float32 `F.linear` does not), and greedy speculation then
reproduces plain decoding. Measured there against float32 `F.linear`: up to 25 us slower a call
at one row, as fast or faster from 8 rows (the `[8, 256] x [256, 8192]` lm_head: 0.58 against
1.33 ms).

oneDNN picks its bfloat16 kernel by the product's shape, rows included, and on some CPUs
two kernels sum in different orders: on a 2-core Intel CPU with AMX, a `[M, 768] x [768, 256]`
product (the shipped target's down projection) gave rows the bits of a one-row product for
M <= 32 and other bits from 33 to 255 rows (projections over 256 inputs agreed at every M).
Greedy speculation reproduces plain decoding only where a row's numbers do not depend on how
many rows its forward carried: there `fixed` and `prefix` differed from `ar` in 3-6% of
128-token requests. So each packed weight's shape is probed once (`invariant_rows`) for a
range of row counts whose kernel gives each row the same bits, and inputs are padded into it
or cut into pieces of it: the range from one row (there 1-32: longer inputs in pieces of 32),
or the next one (there 33-224: shorter inputs padded with zero rows to 33, longer ones in
pieces of 224) where it is much the longer. Measured side by side on that CPU, the next range
served 64 requests (`ar`, 128 tokens each) 1.06-1.15x as fast as pieces of 32 (the prefill's
4,096-token forwards take 21 products of that projection, not 128), one request (`prefix`)
0.88-1.02x, 16 requests 0.96-1.01x.

The copy is held beside the model's own weight (the model's modules still run for audits and
tests), so a packed projection costs its weight's bytes a second time, a widened one twice more;
`packed_bytes` says how many.
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


def widening_pays(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights of `dtype` on `device` run faster as a float32 copy: a half-precision
    dtype on a CPU whose oneDNN has no native matmul for it (no AVX512 bfloat16/float16)."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    key = f"native {dtype}"
    if key not in _probe:
        try:
            mkldnn = torch.ops.mkldnn
            _probe[key] = bool(torch.backends.mkldnn.is_available() and (
                mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16
                else mkldnn._is_mkldnn_fp16_supported()))
        except (RuntimeError, AttributeError):
            _probe[key] = False
    return not _probe[key]


def float32_packing_invariant() -> bool:
    """Whether float32 weights packed for oneDNN give each row of a product the same bits
    whatever rows are beside it, on a probe (plain `F.linear` does not: its kernel depends on
    the number of rows). Greedy speculation reproduces plain decoding only where a row's
    numbers do not depend on how many rows its forward verified."""
    if "float32 invariant" not in _probe:
        _probe["float32 invariant"] = _probe_float32_packing()
    return _probe["float32 invariant"]


def _probe_float32_packing() -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(160, 96, generator=gen)
        x = torch.randn(40, 96, generator=gen)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)

        def product(rows: int) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x[:rows].contiguous(), packed, None,
                                                      "none", [], "")
        full = product(40)
        return (torch.allclose(full, F.linear(x, w), rtol=1e-4, atol=1e-4)
                and all(torch.equal(product(rows), full[:rows]) for rows in (1, 2, 3, 8, 17)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


PROBE_ROWS = tuple(range(1, 41)) + (48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320,
                                      384, 448, 512, 640, 768, 896, 1024)
"""Row counts `invariant_rows` tries (a kernel is chosen by ranges of rows)."""
SPREAD = 256
"""Rows at least that each count is tried on (`invariant_rows`)."""
EXACT_ROWS = 32
"""Products of up to this many rows run at their own row count (`row_bucket`); longer ones are
padded to one of a few counts. oneDNN builds a kernel for each row count it meets and keeps
it: the first product at a new count cost, on a 2-core AMX CPU, 0.6 ms more at 120 rows
(`[120, 256] x [256, 1536]`, 0.2 ms after) and 5.5-6.5 ms more at 2,000-3,800 (1-2 ms after),
and a prefill's row count is the sum of its prompts' lengths, new nearly every time."""
WIDER = 4
"""How many times as long as the range from one row a later range of row counts must be for
`invariant_rows` to pad short inputs into it instead."""


def invariant_rows(packed: torch.Tensor, out_features: int, in_features: int
                   ) -> tuple[int, int] | None:
    """How inputs of a product with the packed bfloat16 weight `packed` are cut so that every
    row gets the same bits whatever rows are beside it: (pad, piece), an input of fewer than
    `pad` rows padded with zero rows up to `pad`, a longer one multiplied in pieces of at
    most `piece` rows (each short piece padded too); None where every probed count gives
    every row the bits of a one-row product.

    oneDNN picks its kernel by ranges of rows (`PROBE_ROWS` are tried, each on at least
    `SPREAD` rows: two kernels' sums part only in their last bits, which show in a bfloat16
    result now and then). The first range, from one row, is used as it is, `(1, its last
    count)`; the next range, `(its first count, its last)`, instead, with padding, where it
    is at least `WIDER` times as long and a padded product gives its rows its bits: at 64
    rows of the `[768, 256]` down projection on an AMX CPU, the first range (1-32) took two
    products, 84 us, the next (33-224) one of 58 us, and a prefill of 4,096 tokens 128
    products against 21. Probed once per shape; the same CPU gives the same answer."""
    key = ("rows", out_features, in_features)
    if key not in _probe:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(PROBE_ROWS[-1], in_features, generator=gen).bfloat16()

        def product(rows: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(rows.contiguous(), packed, None,
                                                      "none", [], "")

        def in_pieces(counts, reference: torch.Tensor) -> int | None:
            """The last of `counts` up to which products of that many rows give the rows
            `reference`'s bits (None: not even the first)."""
            good = None
            for rows in counts:
                span = max(rows, SPREAD - SPREAD % rows)
                if not torch.equal(torch.cat([product(x[i:i + rows])
                                              for i in range(0, span, rows)]), reference[:span]):
                    break
                good = rows
            return good

        with torch.inference_mode():
            single = torch.cat([product(x[i:i + 1]) for i in range(PROBE_ROWS[-1])])
            first = max(1, in_pieces(PROBE_ROWS, single) or 1)
            plan = None if first == PROBE_ROWS[-1] else (1, first)
            later = [r for r in PROBE_ROWS if r > first]
            if plan is not None and later:
                pad = later[0]
                zeros = torch.zeros(pad, in_features, dtype=x.dtype)
                band = torch.cat([product(torch.cat([x[i:i + pad], zeros])[:pad])
                                  for i in range(0, PROBE_ROWS[-1], pad)])[:PROBE_ROWS[-1]]
                last = in_pieces(later, band)
                padded = all(torch.equal(product(torch.cat([x[i:i + n], zeros[n:]]))[:n],
                                         band[i:i + n])
                             for n in (1, 2, pad - 1) if n < pad for i in (0, pad * 3 + 5))
                if last is not None and last >= WIDER * first and padded:
                    plan = (pad, last)
        _probe[key] = plan
    return _probe[key]


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
    allow it, or a float32 copy where that is faster (`widening_pays`), else `F.linear`. The
    weight and bias are the model's own (not copied)."""

    __slots__ = ("weight", "bias", "packed", "wide", "rows")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 pack: bool = False):
        self.weight, self.bias = weight, bias
        self.packed = None
        self.rows: tuple[int, int] | None = None
        """(pad, piece): a packed product's input padded to at least `pad` rows and cut in
        pieces of at most `piece` (`invariant_rows`); None: taken as it is."""
        self.wide: tuple[torch.Tensor, torch.Tensor | None, bool] | None = None
        """The weight and bias in float32 (`widening_pays`), and whether that weight is
        packed for oneDNN (`float32_packing_invariant`); None: not widened."""
        if pack and packing_supported(weight.device, weight.dtype):
            with torch.inference_mode():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
                self.rows = invariant_rows(self.packed, *weight.shape)
        elif pack and widening_pays(weight.device, weight.dtype):
            with torch.inference_mode():
                wide = weight.detach().float()
                wide_bias = bias.detach().float() if bias is not None else None
                if float32_packing_invariant():
                    self.wide = (torch.ops.mkldnn._reorder_linear_weight(wide, None), wide_bias,
                                 True)
                else:
                    self.wide = (wide, wide_bias, False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype or (self.packed is None and self.wide is None):
            return F.linear(x, self.weight, self.bias)
        if self.wide is not None:
            weight, bias, packed = self.wide
            x = x.float().contiguous()
            out = (self._rows_of(x, weight, bias, 1, None) if packed
                   else F.linear(x, weight, bias))
            return out.to(self.weight.dtype)
        pad, piece = self.rows or (1, None)  # the same bits for a row whatever rows are beside it
        return self._rows_of(x.contiguous(), self.packed, self.bias, pad, piece)

    @staticmethod
    def _rows_of(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, pad: int,
                 piece: int | None) -> torch.Tensor:
        """The product of a packed weight with `x`'s rows: in pieces of at most `piece` rows,
        each padded with zero rows to its `row_bucket` (at least `pad`)."""
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        if piece is not None and n > piece:
            out = torch.cat([_product(rows[i:i + piece], packed, bias, pad, piece)
                             for i in range(0, n, piece)])
        else:
            out = _product(rows, packed, bias, pad, piece)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed or widened copy (0 where the weight is used as it is)."""
        if self.wide is not None:
            bias = self.wide[1]
            return 4 * (self.weight.numel() + (bias.numel() if bias is not None else 0))
        return 0 if self.packed is None else self.weight.numel() * self.weight.element_size()


def row_bucket(n: int) -> int:
    """The row count a product of `n` rows runs at: `n` up to `EXACT_ROWS`, else `n` rounded
    up to a multiple of an eighth of the power of two below it (at most 1/8 more rows), so
    that a server meets a few dozen row counts per weight, not one per prompt length."""
    if n <= EXACT_ROWS:
        return n
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def _product(rows: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, pad: int,
             piece: int | None) -> torch.Tensor:
    n = rows.shape[0]
    m = max(pad, row_bucket(n))
    if piece is not None:
        m = min(m, piece)
    if m > n:
        rows = torch.cat([rows, rows.new_zeros(m - n, rows.shape[1])])
    out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return out if m == n else out[:n]


class PackedLinear(nn.Linear):
    """An `nn.Linear` (the same parameters, the same state dict) whose forward runs through a
    packed copy of its weight (`Linear`). Made by `pack_linears`, for inference only: the
    packed copy does not follow later changes to the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._packed(x)


def pack_linears(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Turn every `nn.Linear` under `module` (but those named in `skip`) into a `PackedLinear`,
    where the machine packs or widens their dtype (`Linear`); returns the bytes of the copies."""
    total = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name in skip:
                continue
            packed = Linear(child.weight, child.bias, pack=True)
            if packed.packed is None and packed.wide is None:
                continue
            child.__class__ = PackedLinear  # in place: the same module, its parameters kept
            child._packed = packed
            total += packed.packed_bytes
    return total
