"""Linear layers packed for oneDNN (`worker/engine/linear.py`): the same numbers as
`F.linear`, the same parameters and state dict, and plain `F.linear` wherever packing is not
available."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.linear import Linear, PackedLinear, pack_linears, packing_supported

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
def test_a_row_comes_out_the_same_whatever_batch_it_is_in():
    """Greedy equality between a verify forward (many rows) and a plain decode (one) needs a
    row's product not to depend on its neighbours."""
    w, _ = _weights(out_f=512, in_f=256, bias=False)
    lin = Linear(w, None, pack=True)
    x = torch.randn(64, 256).bfloat16()
    full = lin(x)
    for rows in (1, 5, 32):
        assert torch.equal(lin(x[:rows]), full[:rows])


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
