"""The native fused bfloat16 ops (`worker/engine/csrc/fused_ops.cpp`) against the unfused torch
ops they replace in the target's forward: rotary exactly; RMSNorm and SwiGLU, whose float32
statistics and exponential are computed in another order or approximation, within one
bfloat16 rounding step and equal for nearly every element."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.engine import attention as A

pytestmark = pytest.mark.skipif(not A.load_native(), reason="the native ops did not build")


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bfloat16 steps apart two bfloat16 tensors are (same-sign values)."""
    ia = a.view(torch.int16).to(torch.int32)
    ib = b.view(torch.int16).to(torch.int32)
    return (ia - ib).abs()


def _close_in_bf16(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    same_sign = (got.float().sign() == want.float().sign()) | (got == want)
    assert bool(same_sign.all())
    ulps = _ulps_apart(got, want)
    assert int(ulps.max()) <= 1
    assert float((ulps == 0).float().mean()) >= 0.99


@pytest.mark.parametrize("shape", [(7, 256), (5, 4, 64), (1, 128)])
def test_rms_norm_rounds_as_the_model_norm(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3).bfloat16()
    w = (torch.rand(shape[-1], generator=gen) + 0.5).bfloat16()
    want = w * F.rms_norm(x.float(), (shape[-1],), eps=1e-6).bfloat16()
    _close_in_bf16(torch.ops.sparkgrid.rms_norm_bf16(x, w, 1e-6), want)


def test_silu_mul_rounds_as_silu_then_product():
    gen = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(33, 2 * 768, generator=gen) * 4).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    _close_in_bf16(torch.ops.sparkgrid.silu_mul_bf16(gate_up), F.silu(gate) * up)


def test_rotary_equals_rotate_half_exactly():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 6, 64, generator=gen).bfloat16()
    angle = torch.rand(9, 1, 64, generator=gen) * 6
    cos, sin = angle.cos().bfloat16(), angle.sin().bfloat16()
    rotated = torch.cat((-x[..., 32:], x[..., :32]), dim=-1)
    want = x * cos + rotated * sin
    assert torch.equal(torch.ops.sparkgrid.rotary_bf16(x, cos, sin), want)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 64), (8, 8, 128), (2, 1, 32)])
def test_qk_norm_rotary_gives_the_bits_of_the_two_ops_in_turn(heads, kv_heads, dim):
    """The target's forward takes the one-pass op where it took the norms, a concatenation
    and RoPE: every query and key must keep its bits (the engine's lossless tests compare
    runs that both take it, but audits and resumes compare against stored numbers)."""
    gen = torch.Generator().manual_seed(heads * 100 + dim)
    n = 11
    qkv = (torch.randn(n, (heads + 2 * kv_heads) * dim, generator=gen) * 3).bfloat16()
    qw = (torch.rand(dim, generator=gen) + 0.5).bfloat16()
    kw = (torch.rand(dim, generator=gen) + 0.5).bfloat16()
    angle = torch.rand(n, dim, generator=gen) * 6
    cos, sin = angle.cos().bfloat16(), angle.sin().bfloat16()
    q, k, _ = qkv.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
    q = torch.ops.sparkgrid.rms_norm_bf16(q.reshape(n, heads, dim).contiguous(), qw, 1e-6)
    k = torch.ops.sparkgrid.rms_norm_bf16(k.reshape(n, kv_heads, dim).contiguous(), kw, 1e-6)
    want = torch.ops.sparkgrid.rotary_bf16(torch.cat((q, k), dim=1), cos, sin)
    got = torch.ops.sparkgrid.qk_norm_rotary_bf16(qkv, qw, kw, 1e-6, cos, sin, heads, kv_heads)
    assert got.shape == (n, heads + kv_heads, dim)
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="qkv must be"):
        torch.ops.sparkgrid.qk_norm_rotary_bf16(qkv[:, :-dim].contiguous(), qw, kw, 1e-6,
                                                cos, sin, heads, kv_heads)


def test_bad_inputs_are_refused_with_the_field_named():
    x = torch.randn(4, 64).bfloat16()
    with pytest.raises(RuntimeError, match="weight's size"):
        torch.ops.sparkgrid.rms_norm_bf16(x, torch.ones(32, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="x must be a bfloat16 CPU tensor"):
        torch.ops.sparkgrid.rms_norm_bf16(x.float(), torch.ones(64, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match=r"gate_up must be \[N, 2I\]"):
        torch.ops.sparkgrid.silu_mul_bf16(torch.randn(4, 5).bfloat16())
    with pytest.raises(RuntimeError, match="cos and sin"):
        torch.ops.sparkgrid.rotary_bf16(x.view(4, 1, 64), x[:2], x[:2])


def test_argmax_rows_is_torch_argmax_with_ties_infinities_and_nans():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(12, 8195, generator=gen)  # a tail past the last 16 lanes
    x[1, 100] = x[1, 5000] = 99.0  # a tie: the lower index
    x[2] = float("-inf")  # nothing but -inf: index 0
    x[3, 7000], x[3, 8194] = float("nan"), 50.0  # a NaN counts as the largest
    x[4, 8194] = float("inf")  # in the tail
    x[5, 8193] = float("nan")  # a NaN in the tail
    got = torch.ops.sparkgrid.argmax_rows(x)
    assert got.dtype == torch.long and torch.equal(got, x.argmax(dim=-1))
    assert got[1:6].tolist() == [100, 0, 7000, 8194, 8193]
    with pytest.raises(RuntimeError, match="argmax_rows: x must be"):
        torch.ops.sparkgrid.argmax_rows(x.bfloat16())


def test_the_drafter_norm_and_rope_on_the_native_ops_match_its_torch_ones():
    """`DSparkDraft.use_native_ops`: the drafter's RMSNorm within one rounding step of its
    torch computation, its RoPE bit for bit, and autograd (training) still on the torch ops."""
    from worker.engine.drafter import DraftAttention, RMSNorm, apply_rope

    gen = torch.Generator().manual_seed(5)
    norm = RMSNorm(64, 1e-6).bfloat16()
    norm.weight.data = (torch.rand(64, generator=gen) + 0.5).bfloat16()
    x = (torch.randn(3, 7, 4, 64, generator=gen) * 3).bfloat16()
    with torch.inference_mode():
        want = norm(x)
        norm.native_ops = True
        got = norm(x)
    _close_in_bf16(got, want)
    with torch.enable_grad():  # training: the torch ops, whatever the flag
        assert torch.equal(norm(x), want)

    attn = DraftAttention.__new__(DraftAttention)  # `rope` needs no projections
    torch.nn.Module.__init__(attn)
    attn.native_ops = True
    cos = torch.randn(3, 7, 64, generator=gen).bfloat16()
    sin = torch.randn(3, 7, 64, generator=gen).bfloat16()
    q = torch.randn(3, 7, 4, 64, generator=gen).bfloat16()
    with torch.inference_mode():
        assert torch.equal(attn.rope(q, cos, sin), apply_rope(q, cos, sin))
        k = torch.randn(11, 2, 64, generator=gen).bfloat16()  # context rows: [N, heads, hd]
        assert torch.equal(attn.rope(k, cos.view(-1, 64)[:11], sin.view(-1, 64)[:11]),
                           apply_rope(k, cos.view(-1, 64)[:11], sin.view(-1, 64)[:11]))
