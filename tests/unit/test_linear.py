"""Linear layers packed for oneDNN (`worker/engine/linear.py`): the same numbers as
`F.linear`, the same parameters and state dict, and plain `F.linear` wherever packing is not
available."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.linear import (
    EXACT_ROWS,
    Linear,
    PackedLinear,
    pack_linears,
    packing_supported,
    row_bucket,
)

CPU = torch.device("cpu")
needs_packing = pytest.mark.skipif(not packing_supported(CPU, torch.bfloat16),
                                   reason="this CPU has no native bfloat16 matmuls in oneDNN")


def _weights(out_f=96, in_f=80, bias=True, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen).to(dtype)
    b = torch.randn(out_f, generator=gen).to(dtype) if bias else None
    return w, b


@needs_packing
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_f_linear_bit_for_bit(rows, bias):
    w, b = _weights(bias=bias)
    lin = Linear(w, b, pack=True)
    assert lin.packed is not None and lin.packed_bytes == w.numel() * 2
    x = torch.randn(rows, 80).bfloat16()
    assert torch.equal(lin(x), F.linear(x, w, b))
    # a non-contiguous input and a 3-D one give the same numbers too
    xt = torch.randn(80, rows).bfloat16().t()
    assert torch.equal(lin(xt), F.linear(xt, w, b))
    x3 = torch.randn(2, rows, 80).bfloat16()
    assert torch.equal(lin(x3), F.linear(x3, w, b))


@needs_packing
@pytest.mark.parametrize("in_f", [256, 768])
def test_a_row_comes_out_the_same_whatever_batch_it_is_in(in_f):
    """Greedy equality between a verify forward (many rows) and a plain decode (one) needs a
    row's product not to depend on its neighbours. oneDNN picks kernels by the number of
    rows, and on some CPUs (AMX) they sum in other orders from 33 rows on, for 768 inputs:
    such a product is padded or cut in pieces (`Linear.rows`)."""
    w, _ = _weights(out_f=256, in_f=in_f, bias=False, seed=1)
    lin = Linear(w, None, pack=True)
    x = torch.randn(300, in_f, generator=torch.Generator().manual_seed(2)).bfloat16()
    single = torch.cat([lin(x[i:i + 1]) for i in range(300)])
    for rows in (1, 5, 32, 33, 37, 40, 45, 64, 99, 130, 251, 300):
        assert torch.equal(lin(x[:rows]), single[:rows]), rows
    assert torch.equal(lin(x.reshape(3, 100, in_f)), single.reshape(3, 100, -1))


def test_what_cannot_be_packed_runs_as_f_linear():
    w, b = _weights(dtype=torch.float32)
    lin = Linear(w, b, pack=True)
    assert lin.packed is None and lin.packed_bytes == 0
    x = torch.randn(4, 80)
    assert torch.equal(lin(x), F.linear(x, w, b))
    assert not packing_supported(CPU, torch.float32)
    assert not packing_supported(torch.device("meta"), torch.bfloat16)


@needs_packing
def test_an_input_of_another_dtype_takes_the_plain_path():
    w, b = _weights()
    lin = Linear(w, b, pack=True)
    x = torch.randn(3, 80)  # float32 against a bfloat16 weight: F.linear's own error
    with pytest.raises(RuntimeError):
        lin(x)


@needs_packing
def test_pack_linears_keeps_parameters_state_dict_and_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.SiLU(),
                          nn.ModuleDict({"inner": nn.Linear(64, 48, bias=False),
                                         "lm_head": nn.Linear(48, 100, bias=False)})).bfloat16()
    x = torch.randn(5, 32).bfloat16()

    def run(m):
        h = m[1](m[0](x))
        return m[2]["lm_head"](m[2]["inner"](h))
    with torch.inference_mode():
        before = run(model)
    keys = list(model.state_dict())
    first_weight = model[0].weight
    packed = pack_linears(model, skip=("lm_head",))
    assert packed == (64 * 32 + 48 * 64) * 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2]["inner"], PackedLinear)
    assert type(model[2]["lm_head"]) is nn.Linear  # skipped by name
    assert model[0].weight is first_weight and list(model.state_dict()) == keys
    with torch.inference_mode():
        assert torch.equal(run(model), before)
    assert pack_linears(model) == 100 * 48 * 2  # only what was left plain is packed now


def test_pack_linears_leaves_a_float32_module_alone():
    model = nn.Sequential(nn.Linear(8, 8))
    assert pack_linears(model) == 0 and type(model[0]) is nn.Linear


@pytest.fixture
def no_native_half(monkeypatch):
    """This CPU as one without native half-precision matmuls (AVX2 only): nothing packs, and
    bfloat16/float16 weights are widened to float32."""
    from worker.engine import linear
    monkeypatch.setitem(linear._probe, "ok", False)
    for dtype in (torch.bfloat16, torch.float16):
        monkeypatch.setitem(linear._probe, f"native {dtype}", False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_without_native_half_matmuls_a_projection_runs_in_float32(no_native_half, dtype, bias):
    w, b = _weights(bias=bias, dtype=dtype)
    lin = Linear(w, b, pack=True)
    assert lin.packed is None and lin.wide is not None
    assert lin.packed_bytes == 4 * (w.numel() + (b.numel() if bias else 0))
    x = torch.randn(7, 80).to(dtype)
    got = lin(x)
    assert got.dtype == dtype and got.shape == (7, 96)
    want = F.linear(x.double(), w.double(), b.double() if bias else None)
    # float32 sums rounded once to the dtype: within one unit in the last place of the exact
    # product, as the half-precision F.linear is (it accumulates in float32 too)
    ulp = torch.finfo(dtype).eps * want.abs().clamp(min=1.0)
    assert ((got.double() - want).abs() <= ulp).all()
    assert ((F.linear(x, w, b).double() - want).abs() <= ulp).all()
    # the model's own weight is untouched, and a float32 input takes F.linear's own error
    assert lin.weight is w
    with pytest.raises(RuntimeError):
        lin(torch.randn(3, 80))


def test_without_native_half_matmuls_pack_linears_widens_and_keeps_the_state_dict(no_native_half):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 48, bias=False)).bfloat16()
    x = torch.randn(5, 32).bfloat16()
    with torch.inference_mode():
        before = model(x)
    keys = list(model.state_dict())
    assert pack_linears(model) == (64 * 32 + 64 + 48 * 64) * 4
    assert isinstance(model[0], PackedLinear) and model[0]._packed.wide is not None
    assert list(model.state_dict()) == keys
    with torch.inference_mode():
        after = model(x)
    assert after.dtype == torch.bfloat16
    assert torch.allclose(after.float(), before.float(), rtol=2e-2, atol=2e-2)
    assert pack_linears(nn.Sequential(nn.Linear(8, 8))) == 0  # float32 stays as it is


def test_a_widened_row_comes_out_the_same_whatever_batch_it_is_in(no_native_half):
    """As for packed bfloat16: greedy equality of verify forwards to plain decoding on a CPU
    without native half-precision matmuls rests on this."""
    from worker.engine.linear import float32_packing_invariant
    if not float32_packing_invariant():
        pytest.skip("oneDNN's float32 products here depend on the rows beside them")
    w, _ = _weights(out_f=512, in_f=256, bias=False)
    lin = Linear(w, None, pack=True)
    assert lin.wide is not None and lin.wide[2]  # packed for oneDNN
    x = torch.randn(64, 256).bfloat16()
    full = lin(x)
    for rows in (1, 5, 32):
        assert torch.equal(lin(x[:rows]), full[:rows])


@needs_packing
@pytest.mark.parametrize("plan", [(1, 7), (5, 7), (5, 16)])
def test_padded_and_cut_inputs_give_the_whole_products_numbers(plan):
    """However a plan pads and cuts an input (padding every short piece, the last one
    included), each row comes out as in one product where the machine's kernels agree
    (80 inputs: one-row bits at every count on the CPUs measured)."""
    w, b = _weights(bias=True)
    lin = Linear(w, b, pack=True)
    if lin.rows is not None:
        pytest.skip("this CPU's kernels disagree on a [96, 80] product")
    x = torch.randn(23, 80, generator=torch.Generator().manual_seed(3)).bfloat16()
    whole = lin(x)
    lin.rows = plan
    for rows in (1, 4, 5, 7, 8, 15, 23):
        assert torch.equal(lin(x[:rows]), whole[:rows]), rows
    assert torch.equal(lin(x[:22].reshape(2, 11, 80)), whole[:22].reshape(2, 11, -1))


def test_row_counts_go_to_few_buckets_at_most_an_eighth_longer():
    """oneDNN builds a kernel for each row count it meets (0.6-6 ms each on an AMX CPU), and
    a prefill's count is its prompts' total: products run at a bucket's count instead."""
    buckets = {row_bucket(n) for n in range(1, 8193)}
    for n in range(1, 8193):
        b = row_bucket(n)
        assert n <= b <= n + n // 8, n
        assert row_bucket(b) == b, n  # a bucket is its own
    assert all(row_bucket(n) == n for n in range(1, EXACT_ROWS + 1))
    assert len(buckets) <= EXACT_ROWS + 8 * 8  # eight a doubling from 32 to 8,192


@needs_packing
def test_a_bucketed_product_is_cut_back_to_its_rows():
    """A product padded to its bucket comes back with the input's rows, each with the bits of
    the unpadded product's rows (80 inputs: one-row bits at every count on the CPUs
    measured)."""
    w, b = _weights(bias=True)
    lin = Linear(w, b, pack=True)
    if lin.rows is not None:
        pytest.skip("this CPU's kernels disagree on a [96, 80] product")
    x = torch.randn(700, 80, generator=torch.Generator().manual_seed(4)).bfloat16()
    reference = torch.ops.mkldnn._linear_pointwise(x, lin.packed, b, "none", [], "")
    for rows in (33, 35, 67, 129, 517, 700):
        assert row_bucket(rows) > rows
        out = lin(x[:rows])
        assert out.shape == (rows, 96)
        assert torch.equal(out, reference[:rows]), rows
