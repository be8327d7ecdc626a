"""warp_probs semantics on hand-made logits, and sample's support and distribution."""

import math

import pytest
import torch
from scipy.stats import chisquare

from worker.engine.sampling import sample, warp_probs


def _warp(logits, temperature=1.0, top_k=0, top_p=1.0):
    logits = torch.tensor(logits, dtype=torch.float32)
    m = logits.shape[0]
    return warp_probs(
        logits,
        torch.full((m,), float(temperature)),
        torch.full((m,), top_k, dtype=torch.long),
        torch.full((m,), float(top_p)),
    )


def test_plain_softmax_when_all_filters_are_off():
    logits = [[1.0, 2.0, 0.5, -1.0]]
    probs = _warp(logits)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(torch.tensor(logits), -1))


def test_temperature_divides_logits_before_softmax():
    logits = [[1.0, 2.0, 0.5, -1.0]]
    probs = _warp(logits, temperature=0.5)
    torch.testing.assert_close(probs, torch.softmax(torch.tensor(logits) / 0.5, -1))


def test_zero_temperature_is_one_hot_on_first_argmax_and_ignores_filters():
    probs = _warp([[1.0, 3.0, 3.0, 0.0], [5.0, 1.0, 1.0, 1.0]], temperature=0.0, top_k=2,
                  top_p=0.1)
    expected = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert torch.equal(probs, expected)


def test_top_k_keeps_exactly_k_tokens_ties_to_lower_index():
    probs = _warp([[1.0, 3.0, 2.0, 2.0, 0.0]], top_k=2)
    inf = float("inf")
    kept = torch.tensor([-inf, 3.0, 2.0, -inf, -inf])
    torch.testing.assert_close(probs[0], torch.softmax(kept, -1))


def test_top_p_keeps_smallest_set_reaching_mass():
    # probabilities 0.5, 0.3, 0.15, 0.05 (already normalised, in log space)
    logits = [[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]]
    torch.testing.assert_close(_warp(logits, top_p=0.8)[0], torch.tensor([0.625, 0.375, 0, 0]))
    # 0.81 needs the third token: 0.5 + 0.3 < 0.81
    torch.testing.assert_close(_warp(logits, top_p=0.81)[0],
                               torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    torch.testing.assert_close(_warp(logits, top_p=0.5)[0], torch.tensor([1.0, 0, 0, 0]))


def test_top_p_zero_still_keeps_the_top_token():
    probs = _warp([[0.0, 1.0, 0.5]], top_p=0.0)
    assert torch.equal(probs[0], torch.tensor([0.0, 1.0, 0.0]))


def test_top_p_applies_after_top_k_renormalisation():
    # top-k 2 leaves 0.5/0.8 = 0.625 and 0.375; top-p 0.6 then keeps only the first.
    logits = [[math.log(0.5), math.log(0.3), math.log(0.2)]]
    probs = _warp(logits, top_k=2, top_p=0.6)
    torch.testing.assert_close(probs[0], torch.tensor([1.0, 0.0, 0.0]))


def test_rows_use_their_own_parameters():
    logits = torch.tensor([[1.0, 2.0, 3.0]] * 3)
    probs = warp_probs(logits, torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 1, 0]),
                       torch.tensor([1.0, 1.0, 1.0]))
    assert torch.equal(probs[0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(probs[1], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(probs[2], torch.softmax(logits[2], -1))


def test_half_precision_logits_give_float32_probs():
    probs = _warp(torch.tensor([[1.0, 2.0]]).half().tolist())
    assert probs.dtype == torch.float32
    assert abs(float(probs.sum()) - 1.0) < 1e-6


def test_wrong_parameter_shape_is_rejected_with_its_name():
    with pytest.raises(ValueError, match="top_k"):
        warp_probs(torch.zeros(2, 3), torch.ones(2), torch.zeros(3, dtype=torch.long),
                   torch.ones(2))


def test_sample_never_picks_zero_probability_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).repeat(4, 1)
    uniforms = torch.tensor([0.0, 0.4999999, 0.5, 1.0 - 2**-24])
    assert sample(probs, uniforms).tolist() == [1, 1, 3, 3]
    # u within 2**-53 of 1 must still not step past the last positive token
    nearly_one = torch.tensor([1.0 - 2**-53], dtype=torch.float64)
    assert sample(torch.tensor([[0.3, 0.7, 0.0]]), nearly_one).tolist() == [1]


def test_sample_matches_distribution_chi_square():
    """Frequencies of 200k draws against p; false-failure rate alpha = 1e-4."""
    gen = torch.Generator().manual_seed(1234)
    p = torch.tensor([0.05, 0.0, 0.4, 0.25, 0.0, 0.3])
    n = 200_000
    ids = sample(p.repeat(n, 1) * 3.0, torch.rand(n, generator=gen))  # unnormalised rows
    counts = torch.bincount(ids, minlength=6).double()
    assert counts[p == 0].sum() == 0
    support = p > 0
    expected = p[support].double() / p[support].double().sum() * counts.sum()
    result = chisquare(counts[support].numpy(), expected.numpy())
    assert result.pvalue > 1e-4
