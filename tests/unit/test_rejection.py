"""Speculative sampling: lossless output distribution, greedy matching, padding, residual guard."""

import pytest
import torch
from scipy.stats import chisquare

from worker.engine.rejection import verify, verify_greedy
from worker.engine.sampling import sample, warp_probs

ALPHA = 1e-4  # false-failure rate of each chi-square check


def _assert_distributed_as(tokens: torch.Tensor, p: torch.Tensor) -> None:
    """Chi-square goodness of fit of `tokens` to `p`; zero-probability tokens never appear."""
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    assert counts[p == 0].sum() == 0, "a zero-probability token was emitted"
    support = p > 0
    expected = p[support].double() / p[support].double().sum() * counts.sum()
    assert chisquare(counts[support].numpy(), expected.numpy()).pvalue > ALPHA


def _random_problem(num_rows: int, gamma: int, vocab: int, seed: int):
    """Fixed p_0..p_G and q_1..q_G shared by all rows, with disjoint zeros so the residual and
    the u*q < p rule are both exercised; draft tokens drawn from q, random num_verify."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(gamma + 1, vocab, generator=gen) ** 2  # [G+1, V]
    q = torch.rand(gamma, vocab, generator=gen) ** 2  # [G, V]
    p[:, 0] = 0.0  # a token the target never emits but the draft proposes
    q[:, 1] = 0.0  # a token the draft never proposes but the target wants
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    target_probs = p.expand(num_rows, -1, -1)  # [R, G+1, V]
    draft_probs = q.expand(num_rows, -1, -1)  # [R, G, V]
    draft_ids = torch.stack(
        [sample(draft_probs[:, k], torch.rand(num_rows, generator=gen)) for k in range(gamma)],
        dim=1,
    )  # [R, G]
    num_verify = torch.randint(0, gamma + 1, (num_rows,), generator=gen)
    accept_u = torch.rand(num_rows, gamma, generator=gen)
    resample_u = torch.rand(num_rows, generator=gen)
    return p, (target_probs, draft_probs, draft_ids, num_verify, accept_u, resample_u)


def test_first_output_token_is_distributed_as_target():
    """200k rows, V=6, G=3: the first emitted token (draft token 1 if accepted, else the
    replacement or, with num_verify = 0, the plain sample) follows p_0. alpha = 1e-4."""
    p, args = _random_problem(200_000, gamma=3, vocab=6, seed=0)
    num_accepted, next_ids = verify(*args)
    draft_ids = args[2]
    first = torch.where(num_accepted >= 1, draft_ids[:, 0], next_ids)
    _assert_distributed_as(first, p[0])


def test_token_after_an_accepted_prefix_is_distributed_as_target_at_that_position():
    """Given draft tokens 1..k accepted, the next emitted token (draft token k+1 if accepted,
    else the replacement or the bonus) follows p_k, because that event depends only on
    positions <= k. Checked for k = 1, 2, 3 on 200k rows; alpha = 1e-4 per check."""
    p, args = _random_problem(200_000, gamma=3, vocab=6, seed=1)
    num_accepted, next_ids = verify(*args)
    draft_ids = args[2]
    for k in range(1, 4):
        rows = num_accepted >= k
        following = draft_ids[:, k] if k < 3 else next_ids  # k = G: only the bonus follows
        if k < 3:
            following = torch.where(num_accepted >= k + 1, following, next_ids)
        _assert_distributed_as(following[rows], p[k])


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    m = logits.shape[0]
    return warp_probs(logits, torch.zeros(m), torch.zeros(m, dtype=torch.long), torch.ones(m))


def test_greedy_accepts_while_argmax_matches_then_emits_target_argmax():
    gen = torch.Generator().manual_seed(2)
    num_rows, gamma, vocab = 500, 4, 5
    target_logits = torch.randn(num_rows * (gamma + 1), vocab, generator=gen)
    draft_logits = torch.randn(num_rows * gamma, vocab, generator=gen)
    target_probs = _greedy(target_logits).reshape(num_rows, gamma + 1, vocab)
    draft_probs = _greedy(draft_logits).reshape(num_rows, gamma, vocab)
    target_argmax = target_probs.argmax(-1)  # [R, G+1]
    draft_ids = draft_probs.argmax(-1)  # [R, G]
    # make long matching runs common
    copy = torch.rand(num_rows, gamma, generator=gen) < 0.7
    draft_ids = torch.where(copy, target_argmax[:, :gamma], draft_ids)
    draft_probs = torch.nn.functional.one_hot(draft_ids, vocab).float()
    num_verify = torch.randint(0, gamma + 1, (num_rows,), generator=gen)

    num_accepted, next_ids = verify(target_probs, draft_probs, draft_ids, num_verify,
                                    torch.rand(num_rows, gamma, generator=gen),
                                    torch.rand(num_rows, generator=gen))
    for r in range(num_rows):
        n = 0
        while n < num_verify[r] and draft_ids[r, n] == target_argmax[r, n]:
            n += 1
        assert num_accepted[r] == n
        assert next_ids[r] == target_argmax[r, n]


def test_padding_beyond_num_verify_is_ignored():
    _, args = _random_problem(2_000, gamma=3, vocab=6, seed=3)
    target_probs, draft_probs, draft_ids, num_verify, accept_u, resample_u = (
        a.clone() for a in args)
    clean = verify(target_probs, draft_probs, draft_ids, num_verify, accept_u, resample_u)

    pos = torch.arange(3)[None, :]
    pad = pos >= num_verify[:, None]  # [R, G] draft positions beyond num_verify
    draft_probs[pad] = float("nan")
    draft_ids[pad] = 10_000  # out of the vocabulary
    accept_u[pad] = float("nan")
    target_pad = torch.arange(4)[None, :] > num_verify[:, None]  # [R, G+1]
    target_probs[target_pad] = float("nan")
    poisoned = verify(target_probs, draft_probs, draft_ids, num_verify, accept_u, resample_u)
    assert torch.equal(clean[0], poisoned[0])
    assert torch.equal(clean[1], poisoned[1])


def test_zero_num_verify_is_plain_sampling_from_the_anchor_distribution():
    target = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])  # [1, 2, 3]
    draft = torch.tensor([[[0.0, 1.0, 0.0]]])
    num_accepted, next_ids = verify(target, draft, torch.tensor([[1]]), torch.tensor([0]),
                                    torch.tensor([[0.0]]), torch.tensor([0.5]))
    assert num_accepted.tolist() == [0] and next_ids.tolist() == [2]


def test_rejection_resamples_from_the_residual():
    # p = (0, 0.5, 0.5), q = (0.5, 0.5, 0): drafting token 0 is always rejected and the residual
    # max(0, p - q) = (0, 0, 0.5) forces token 2.
    target = torch.tensor([[[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]])
    draft = torch.tensor([[[0.5, 0.5, 0.0]]])
    num_accepted, next_ids = verify(target, draft, torch.tensor([[0]]), torch.tensor([1]),
                                    torch.tensor([[0.0]]), torch.tensor([0.1]))
    assert num_accepted.tolist() == [0] and next_ids.tolist() == [2]


def test_near_zero_residual_falls_back_to_target():
    # p(x) is a hair below q(x): u close to 1 rejects, and the residual is pure float noise.
    p = torch.tensor([0.25, 0.25, 0.25, 0.25])
    q = p.clone()
    q[0] += 1e-7
    q[1] -= 1e-7  # without the guard the residual (0, 1e-7, 0, 0) would force token 1
    target = torch.stack([p, p])[None]  # [1, 2, 4]
    num_accepted, next_ids = verify(target, q[None, None], torch.tensor([[0]]), torch.tensor([1]),
                                    torch.tensor([[1.0 - 1e-7]]), torch.tensor([0.6]))
    assert num_accepted.tolist() == [0]
    assert next_ids.tolist() == [2]  # inverse CDF of p at u = 0.6


def test_mismatched_shapes_are_rejected_naming_the_tensor():
    with pytest.raises(ValueError, match="target_probs"):
        verify(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long),
               torch.zeros(2, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2))


def test_greedy_verification_from_ids_equals_the_rule_on_one_hot_distributions():
    """`verify_greedy` against `verify` on one-hot p and q: random argmaxes over a small
    vocabulary (so matches are common), random lengths, junk ids in the padding."""
    gen = torch.Generator().manual_seed(7)
    rows, gamma, vocab = 64, 5, 4
    target_ids = torch.randint(0, vocab, (rows, gamma + 1), generator=gen)
    draft_ids = torch.randint(0, vocab, (rows, gamma), generator=gen)
    num_verify = torch.randint(0, gamma + 1, (rows,), generator=gen)
    padding = torch.arange(gamma)[None, :] >= num_verify[:, None]
    junk = draft_ids.masked_fill(padding, 10**6)
    one_hot = torch.nn.functional.one_hot
    want = verify(one_hot(target_ids, vocab).float(), one_hot(draft_ids, vocab).float(),
                  draft_ids, num_verify, torch.zeros(rows, gamma), torch.zeros(rows))
    got = verify_greedy(target_ids, junk, num_verify)
    assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()
    assert 0 < int((got[0] > 0).sum()) < rows  # both acceptances and rejections happened

