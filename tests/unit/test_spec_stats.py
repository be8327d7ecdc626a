"""Per-request speculation statistics: accepted length and per-position acceptance."""

from worker.engine.request import SpecStats


def test_conditional_acceptance_counts_only_positions_reached_by_verification():
    stats = SpecStats()
    stats.record(num_verified=3, num_accepted=3, gamma=3)  # all accepted
    stats.record(num_verified=3, num_accepted=1, gamma=3)  # rejected at position 2
    stats.record(num_verified=3, num_accepted=0, gamma=3)  # rejected at position 1
    assert stats.position_verified == [3, 2, 1]  # position 3 is never reached after a rejection
    assert stats.position_accepted == [2, 1, 1]
    assert stats.conditional_acceptance == [2 / 3, 1 / 2, 1.0]
    assert stats.accept_lengths == [4, 2, 1] and stats.tokens_verified == 9


def test_positions_beyond_a_short_verification_are_not_counted():
    stats = SpecStats()
    stats.record(num_verified=1, num_accepted=1, gamma=3)
    assert stats.position_verified == [1, 0, 0]
    assert stats.conditional_acceptance == [1.0, None, None]
