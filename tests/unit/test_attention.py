"""Paged attention read in place: the native CPU kernel and the torch reference against plain
per-sequence SDPA over each sequence's keys, on ragged rows, GQA, partial blocks and dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.engine import attention as A

BACKENDS = ["native", "torch"]


@pytest.fixture(scope="module", autouse=True)
def _native_built():
    if not A.load_native():
        pytest.fail(f"the native kernel did not build: {A._native_state.get('error')}")


def make_case(seed: int, *, dtype, block_size: int, q_rows: list[int], ctx: list[int],
              heads: int = 4, kv_heads: int = 2, dim: int = 64):
    """A paged cache whose sequences own shuffled blocks; sequence r has ctx[r] cached
    positions and q_rows[r] query rows at its last q_rows[r] positions (verify-shaped)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in ctx]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, taken = [], 0
    for n in blocks_per_seq:
        tables.append(order[taken:taken + n])
        taken += n
    width = max(1, max(blocks_per_seq))
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    slots = num_blocks * block_size
    k_cache = torch.randn(slots, kv_heads, dim, generator=gen, dtype=torch.float64).to(dtype)
    v_cache = torch.randn(slots, kv_heads, dim, generator=gen, dtype=torch.float64).to(dtype)
    q = torch.randn(sum(q_rows), heads, dim, generator=gen, dtype=torch.float64).to(dtype)
    kv_len = [c - n + i + 1 for c, n in zip(ctx, q_rows) for i in range(n)]
    cu = torch.tensor([0] + torch.tensor(q_rows).cumsum(0).tolist(), dtype=torch.int32)
    meta = A.AttentionMeta(table_t, cu, torch.tensor(kv_len, dtype=torch.int32), block_size,
                           max(kv_len), "native")
    return q, k_cache, v_cache, meta, tables


def oracle(q, k_cache, v_cache, meta, tables, scale):
    """Row by row: gather the row's visible keys by position, then SDPA in float64."""
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    bs = meta.block_size
    outs, lses = [], []
    row = 0
    for r, table in enumerate(tables):
        for _ in range(int(meta.cu_q[r + 1] - meta.cu_q[r])):
            n = int(meta.kv_len[row])
            slots = [table[p // bs] * bs + p % bs for p in range(n)]
            k = k_cache[slots].double().repeat_interleave(heads // kv_heads, 1)  # [n, H, D]
            v = v_cache[slots].double().repeat_interleave(heads // kv_heads, 1)
            qr = q[row].double()  # [H, D]
            scores = torch.einsum("hd,nhd->hn", qr, k) * scale
            lses.append(torch.logsumexp(scores, -1))
            outs.append(F.scaled_dot_product_attention(qr[:, None], k.transpose(0, 1),
                                                       v.transpose(0, 1), scale=scale)[:, 0])
            row += 1
    return torch.stack(outs), torch.stack(lses)


TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,dim", [(16, 64), (16, 128), (5, 32)])
@pytest.mark.parametrize("q_rows", [[1, 1, 1], [8, 3, 1], [9, 1, 17]])
def test_matches_per_sequence_sdpa(backend, dtype, block_size, dim, q_rows):
    """One-token rows (few query vectors a kv head), verify rows (a lane chunk), more rows
    than one chunk holds (9 x 2 and 17 x 2 vectors), generic and specialised block sizes."""
    ctx = [37, 18, 70][:len(q_rows)]
    q, kc, vc, meta, tables = make_case(len(q_rows) * dim + block_size, dtype=dtype,
                                        block_size=block_size, q_rows=q_rows, ctx=ctx, dim=dim)
    meta.backend = backend
    scale = dim ** -0.5
    out, lse = A.paged_attention(q, kc, vc, meta, scale)
    ref_out, ref_lse = oracle(q, kc, vc, meta, tables, scale)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:2]
    torch.testing.assert_close(out.double(), ref_out, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [64, 128, 32])
def test_a_verify_row_gives_the_bits_of_the_same_position_decoded_alone(dim, dtype):
    """The target's logits at a position do not depend on how many rows were verified beside
    it: a row's scores and softmax come out with the same bits whether its pass holds one
    query vector a kv head or many (the bfloat16 path of AVX512-BF16 CPUs, and the portable
    code everywhere else, whose few-vector and many-vector passes sum in one fixed order)."""
    block = 16 if dim in (64, 128) else 5
    q, kc, vc, meta, _ = make_case(21 + dim, dtype=dtype, block_size=block,
                                   q_rows=[7, 3, 1], ctx=[70, 33, 50], heads=8, kv_heads=2,
                                   dim=dim)
    together, lse = A.paged_attention(q, kc, vc, meta, dim ** -0.5)
    one = torch.tensor([0, 1], dtype=torch.int32)
    row = 0
    for r in range(3):
        for _ in range(int(meta.cu_q[r + 1] - meta.cu_q[r])):
            alone = A.AttentionMeta(meta.block_tables[r:r + 1], one, meta.kv_len[row:row + 1],
                                    block, int(meta.kv_len[row]), "native")
            out1, lse1 = A.paged_attention(q[row:row + 1], kc, vc, alone, dim ** -0.5)
            assert torch.equal(out1[0], together[row]) and torch.equal(lse1[0], lse[row]), row
            row += 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_see_only_their_own_prefix(backend):
    """Changing a key that a row may not see (a later position, or another sequence's block)
    leaves that row's output alone; changing one it sees moves it."""
    q, kc, vc, meta, tables = make_case(3, dtype=torch.float32, block_size=16, q_rows=[4, 2],
                                        ctx=[40, 21])
    meta.backend = backend
    base, _ = A.paged_attention(q, kc, vc, meta, 0.125)
    later = tables[0][39 // 16] * 16 + 39 % 16  # position 39: only row 3 of seq 0 sees it
    kc2 = kc.clone()
    kc2[later] += 5.0
    moved, _ = A.paged_attention(q, kc2, vc, meta, 0.125)
    assert torch.equal(moved[:3], base[:3]) and torch.equal(moved[4:], base[4:])
    assert not torch.allclose(moved[3], base[3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_without_keys_gives_zero_and_minus_infinity(backend):
    q, kc, vc, meta, _ = make_case(5, dtype=torch.float32, block_size=16, q_rows=[1, 1],
                                   ctx=[10, 10])
    meta.kv_len = torch.tensor([0, 10], dtype=torch.int32)
    meta.backend = backend
    out, lse = A.paged_attention(q, kc, vc, meta, 0.125)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isinf(lse[0]).all() and (lse[0] < 0).all()
    assert torch.isfinite(lse[1]).all()


def test_merge_equals_attention_over_the_union():
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(3, 4, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(3, 4, 20, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(3, 4, 20, 16, generator=gen, dtype=torch.float64)

    def part(lo, hi):
        s = torch.einsum("nhd,nhld->nhl", q, k[:, :, lo:hi]) * 0.25
        lse = torch.logsumexp(s, -1)
        return torch.einsum("nhl,nhld->nhd", torch.exp(s - lse[..., None]), v[:, :, lo:hi]), lse

    whole, _ = part(0, 20)
    merged = A.merge(*part(0, 7), *part(7, 20))
    torch.testing.assert_close(merged, whole, atol=1e-12, rtol=1e-12)
    empty_out, empty_lse = torch.zeros_like(whole), torch.full((3, 4), float("-inf"),
                                                                dtype=torch.float64)
    torch.testing.assert_close(A.merge(empty_out, empty_lse, *part(0, 20)), whole)


def test_native_kernel_refuses_mismatched_inputs_with_a_message():
    q, kc, vc, meta, _ = make_case(1, dtype=torch.float32, block_size=16, q_rows=[1],
                                   ctx=[5])
    with pytest.raises(RuntimeError, match="share a dtype"):
        A.paged_attention(q.double(), kc, vc, meta, 0.1)
    meta.kv_len = torch.tensor([5, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="one kv_len per query row"):
        A.paged_attention(q, kc, vc, meta, 0.1)
    meta.kv_len = torch.tensor([500], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="beyond the block table"):
        A.paged_attention(q, kc, vc, meta, 0.1)


def test_backend_setting_is_checked(monkeypatch):
    monkeypatch.setenv("SPARKGRID_ATTENTION", "fast")
    with pytest.raises(ValueError, match="SPARKGRID_ATTENTION"):
        A.backend_for(torch.device("cpu"))
    monkeypatch.setenv("SPARKGRID_ATTENTION", "torch")
    assert A.backend_for(torch.device("cpu")) == "torch"
    monkeypatch.setenv("SPARKGRID_ATTENTION", "auto")
    assert A.backend_for(torch.device("cpu")) == "native"


def test_cache_bytes_per_token():
    # 6 layers x (k + v) x 2 kv heads x 64 dims x 2 bytes
    assert A.cache_bytes_per_token(6, 2, 64, torch.bfloat16) == 3072
    assert A.cache_bytes_per_token(6, 2, 64, torch.float32) == 6144
