"""The engine's online comparison of its real steps with the tables the draft gate plans with."""

import math

import pytest

from worker.engine.online_costs import OnlineCosts


def _feed(costs, rows, drafting, ratio, n=40):
    for _ in range(n):
        costs.observe(rows, drafting, predicted=0.01, measured=0.01 * ratio)


def test_the_factor_is_one_until_both_kinds_of_step_were_seen_enough():
    costs = OnlineCosts(warmup=8)
    _feed(costs, 64, True, 1.5, n=20)
    _feed(costs, 64, False, 1.0, n=7)
    assert costs.drafting_factor(64) == 1.0  # plain steps: 7 < 8
    _feed(costs, 64, False, 1.0, n=1)
    assert costs.drafting_factor(64) == pytest.approx(1.5)


def test_only_the_ratio_of_the_two_kinds_counts_not_the_machines_speed():
    """A machine twice as slow as profiled for every step is no reason to draft less."""
    slow, fine = OnlineCosts(), OnlineCosts()
    _feed(slow, 32, True, 2.4)
    _feed(slow, 32, False, 2.0)
    _feed(fine, 32, True, 1.2)
    _feed(fine, 32, False, 1.0)
    assert slow.drafting_factor(32) == pytest.approx(1.2)
    assert fine.drafting_factor(32) == pytest.approx(1.2)


def test_each_load_learns_its_own_factor():
    costs = OnlineCosts()
    _feed(costs, 64, True, 1.3)
    _feed(costs, 64, False, 1.0)
    _feed(costs, 1, True, 0.9)
    _feed(costs, 1, False, 1.0)
    assert costs.drafting_factor(64) == pytest.approx(1.3)
    assert costs.drafting_factor(127) == pytest.approx(1.3)  # the same power of two
    assert costs.drafting_factor(1) == pytest.approx(0.9)
    assert costs.drafting_factor(8) == 1.0  # never seen


def test_the_mean_follows_a_change_and_one_odd_step_moves_it_a_bounded_way():
    costs = OnlineCosts(rate=0.05, clip=1.0)
    _feed(costs, 4, False, 1.0)
    _feed(costs, 4, True, 1.0)
    costs.observe(4, True, predicted=0.01, measured=100.0)  # a step stretched by a pause
    assert costs.drafting_factor(4) <= math.exp(0.05 * 1.0) + 1e-12
    _feed(costs, 4, True, 1.5, n=200)  # drafting really got dearer
    assert costs.drafting_factor(4) == pytest.approx(1.5, rel=1e-3)


def test_the_factor_stays_within_its_limit_and_odd_values_are_ignored():
    costs = OnlineCosts(limit=0.5)
    _feed(costs, 2, True, 2.7)
    _feed(costs, 2, False, 1.0)
    assert costs.drafting_factor(2) == pytest.approx(math.exp(0.5))
    before = (dict(costs.log_ratio), dict(costs.seen))
    for predicted, measured in ((0.0, 1.0), (1.0, -1.0), (float("nan"), 1.0),
                                (1.0, float("inf"))):
        costs.observe(2, True, predicted, measured)
    assert (costs.log_ratio, costs.seen) == before


@pytest.mark.parametrize("kwargs, field", [(dict(rate=0.0), "rate"), (dict(rate=2.0), "rate"),
                                           (dict(clip=0.0), "clip"), (dict(warmup=0), "warmup"),
                                           (dict(warmup=True), "warmup")])
def test_bad_settings_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OnlineCosts(**kwargs)
