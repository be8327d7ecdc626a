"""Online recalibration of the confidence, and the measured step overhead."""

from __future__ import annotations

import pytest
import torch

from sparkgrid.costs import SPSTable
from worker.engine.draft_gate import StepOverhead
from worker.engine.online_calibration import OnlineCalibration
from worker.engine.verify_policy import expected_throughput, prefix_lengths


def simulate(calib: OnlineCalibration, true_c: torch.Tensor, stated_c: torch.Tensor,
             greedy: bool, steps: int, rows: int, seed: int) -> torch.Tensor:
    """Blocks whose position k is accepted with probability true_c[k] (given the earlier
    ones), while the drafter states stated_c; every position is verified (`fixed`)."""
    gen = torch.Generator().manual_seed(seed)
    gamma = true_c.numel()
    for _ in range(steps):
        stated = stated_c.expand(rows, gamma)
        used = calib.apply(stated, [greedy] * rows)
        draws = torch.rand(rows, gamma, generator=gen) < true_c
        accepted = torch.cumprod(draws.int(), 1).sum(1).tolist()
        calib.update(stated, used, [greedy] * rows, [gamma] * rows, accepted)
    return calib.apply(stated_c[None], [greedy])[0]


def test_learns_the_acceptance_the_drafter_understates():
    """Stated c_k = 0.5 while greedy blocks are accepted at 0.8: after enough verified blocks
    the corrected c_k sits near 0.8 (the map's noise after 6,400 labels a position, with a
    memory of 2,000: about 0.01; 0.08 is many standard deviations)."""
    calib = OnlineCalibration(4)
    true_c = torch.tensor([0.8, 0.8, 0.8, 0.8])
    got = simulate(calib, true_c, torch.full((4,), 0.5), True, steps=400, rows=16, seed=1)
    assert torch.all((got - true_c).abs() < 0.08), got
    # sampled requests learned nothing: their regime is apart
    assert calib.apply(torch.full((1, 4), 0.5), [False])[0].tolist() == pytest.approx([0.5] * 4)


def test_learns_an_overstated_confidence_too():
    calib = OnlineCalibration(3)
    true_c = torch.tensor([0.3, 0.2, 0.1])
    got = simulate(calib, true_c, torch.tensor([0.7, 0.6, 0.5]), False, steps=600, rows=16,
                   seed=2)
    assert torch.all((got - true_c).abs() < 0.08), got


def test_only_positions_with_a_label_move():
    """A row that verified 2 of 4 and accepted both gives labels to positions 1 and 2 only
    (position 3 was never verified); accepting 0 of 4 labels position 1 alone (rejected)."""
    calib = OnlineCalibration(4)
    used = torch.full((1, 4), 0.5, dtype=torch.float64)
    calib.update(used, used, [True], [2], [2])
    assert calib.offsets[0, :2].gt(0).all() and calib.offsets[0, 2:].eq(0).all()
    assert calib.scales[0, 2:].eq(1).all()
    calib = OnlineCalibration(4)
    calib.update(used, used, [True], [4], [0])
    assert calib.offsets[0, 0] < 0 and calib.offsets[0, 1:].eq(0).all()
    assert calib.labels[0].tolist() == [1, 0, 0, 0]


def test_a_wide_batch_takes_one_newton_step_not_one_a_label():
    """64 accepted labels at a stated 0.5 (logit 0: only the offset moves): the step is their
    gradient (64 x 0.5) over their curvature (64 x 0.25) plus the prior, 1.6, where one
    fixed-rate step a label would add up without bound as the batch widens."""
    calib = OnlineCalibration(1, prior=4.0)
    used = torch.full((64, 1), 0.5, dtype=torch.float64)
    calib.update(used, used, [True] * 64, [1] * 64, [1] * 64)
    assert calib.offsets[0, 0].item() == pytest.approx(32 / (16 + 4))
    assert calib.scales[0, 0].item() == pytest.approx(1.0)


def test_learns_a_slope_an_offset_cannot():
    """The drafter states c_k spread over (0.05, 0.95) while acceptance follows
    sigmoid(2 logit(c_k) + 0.5): confident blocks are accepted more often than stated,
    doubtful ones less, which no offset alone expresses. After 300 steps of 16 rows the map
    is within 0.05 of the truth at c = 0.2, 0.5 and 0.8 (its noise with 2,000 labels'
    memory is about 0.02 there)."""
    calib = OnlineCalibration(2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(300):
        stated = torch.rand(16, 2, generator=gen) * 0.9 + 0.05
        truth = torch.sigmoid(2 * torch.logit(stated) + 0.5)
        used = calib.apply(stated, [True] * 16)
        draws = torch.rand(16, 2, generator=gen) < truth
        accepted = torch.cumprod(draws.int(), 1).sum(1).tolist()
        calib.update(stated, used, [True] * 16, [2] * 16, accepted)
    probe = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)[:, None].expand(3, 2)
    want = torch.sigmoid(2 * torch.logit(probe) + 0.5)
    got = calib.apply(probe, [True] * 3)
    assert torch.all((got - want).abs() < 0.05), (got, want)


def test_correction_is_monotone_in_the_stated_confidence():
    """A fixed increasing map per position: Alg. 1's lossless early stop still applies."""
    calib = OnlineCalibration(2)
    calib.offsets[0] = torch.tensor([1.5, -0.7], dtype=torch.float64)
    calib.scales[0] = torch.tensor([calib.min_scale, 3.0], dtype=torch.float64)
    c = torch.linspace(0.01, 0.99, 50)[:, None].expand(50, 2)
    out = calib.apply(c, [True] * 50)
    assert torch.all(out[1:] > out[:-1])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="gamma"):
        OnlineCalibration(0)
    with pytest.raises(ValueError, match="memory"):
        OnlineCalibration(3, memory=0.0)
    with pytest.raises(ValueError, match="prior"):
        OnlineCalibration(3, prior=0.0)
    with pytest.raises(ValueError, match="min_scale"):
        OnlineCalibration(3, min_scale=0.0)


def test_step_overhead_reads_its_profiled_tables():
    """Plain steps by their rows, drafting steps by their drafting rows; the default where
    nothing was profiled."""
    assert StepOverhead().seconds(8, 8, default=0.3) == 0.3
    over = StepOverhead(plain=SPSTable([1, 64], [1000.0, 100.0]),
                        drafting=SPSTable([1, 64], [200.0, 20.0]))
    assert over.seconds(0, 1, default=9.0) == pytest.approx(0.001)
    assert over.seconds(0, 64, default=9.0) == pytest.approx(0.01)
    assert over.seconds(1, 64, default=9.0) == pytest.approx(0.005)  # one row drafts
    assert over.seconds(64, 64, default=9.0) == pytest.approx(0.05)


def test_fixed_seconds_make_alg1_verify_more():
    """The bar for one more token is theta x its marginal cost: with the step's fixed time
    in theta's denominator, theta is lower and tokens with smaller survival pass."""
    sps = SPSTable([1, 2, 3, 4, 5], [1.0, 1 / 1.5, 1 / 2.0, 1 / 2.5, 1 / 3.0])  # 0.5 s a token
    survival = torch.tensor([[0.9, 0.6, 0.4, 0.3]])
    assert prefix_lengths(survival, sps).tolist() == [1]
    assert prefix_lengths(survival, sps, fixed_seconds=4.0).tolist() == [4]
    with pytest.raises(ValueError, match="fixed_seconds"):
        prefix_lengths(survival, sps, fixed_seconds=-1.0)


def test_plain_throughput_counts_the_plain_steps_own_seconds():
    sps = SPSTable([1, 2], [1.0, 0.5])
    assert expected_throughput(torch.zeros(0, 3), sps, draft_seconds=0.0, other_rows=1) == 1.0
    assert expected_throughput(torch.zeros(0, 3), sps, draft_seconds=1.0,
                               other_rows=1) == pytest.approx(0.5)
