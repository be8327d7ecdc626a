"""A job's allowed state transitions."""

import pytest

from scheduler.jobs import FINAL, JobState, TransitionError, check_transition


@pytest.mark.parametrize("current, new", [("queued", "running"), ("queued", "cancelled"),
                                          ("running", "finished"), ("running", "failed"),
                                          ("running", "cancelled"), ("queued", "failed")])
def test_allowed(current, new):
    check_transition("j", JobState(current), JobState(new))


@pytest.mark.parametrize("final", sorted(FINAL))
@pytest.mark.parametrize("new", list(JobState))
def test_nothing_leaves_a_final_state(final, new):
    with pytest.raises(TransitionError, match="cannot go from"):
        check_transition("j", final, new)


def test_running_cannot_go_back_to_queued():
    with pytest.raises(TransitionError, match="running to queued"):
        check_transition("j", JobState.RUNNING, JobState.QUEUED)
