"""Which regime greedy `prefix` steps run in at each load, by the throughput each has given."""

import math

import pytest

from worker.engine.regimes import FULL, GATE, PLAIN, Regimes

TWO = (GATE, PLAIN)
"""Regimes without FULL (drafting whole blocks): the tests of two regimes' turns."""


def _run(regimes, rows, speed, windows=1):
    """Run `windows` whole windows at `rows`, each step's throughput `speed[regime]` tokens/s
    (one token a row); returns the regime of each window."""
    ran = []
    for _ in range(windows):
        regime = regimes.regime(rows)
        ran.append(regime)
        for _ in range(regimes.window):
            assert regimes.regime(rows) == regime  # a window runs one regime throughout
            regimes.observe(rows, regime, rows, rows / speed[regime])
    return ran


def test_each_regime_runs_a_window_then_the_faster_one_runs():
    regimes = Regimes(window=4, settle=0, regimes=TWO, explore_every=3)
    assert _run(regimes, 16, {GATE: 100.0, PLAIN: 150.0}, windows=2) == [GATE, PLAIN]
    assert _run(regimes, 16, {GATE: 100.0, PLAIN: 150.0}, windows=3) == [PLAIN] * 3
    assert regimes.means(16) == pytest.approx({GATE: 100.0, PLAIN: 150.0})
    assert regimes.plain_steps == 4 * 4


@pytest.mark.parametrize("gate, plain_windows", [
    (120.0, [1, 4, 9, 18, 27]),  # a lead under `FAR`: GATE for 2, 4, 8, 8, ... windows
    (300.0, [1, 10, 19, 28, 37])])  # drafting's far lead: for 8, 8, ... windows
def test_the_slower_regime_runs_again_ever_more_rarely_while_it_stays_slower(gate,
                                                                              plain_windows):
    regimes = Regimes(window=2, settle=0, regimes=TWO, explore_every=2, max_explore_every=8,
                      max_explore_far=8)
    speed = {GATE: gate, PLAIN: 100.0}  # few requests: drafting wins
    ran = _run(regimes, 1, speed, windows=40)
    assert [i for i, r in enumerate(ran) if r == PLAIN][:5] == plain_windows
    assert ran[0] == GATE


@pytest.mark.parametrize("gate, intervals", [
    (120.0, [2, 4, 8, 8, 8]),  # a lead under `FAR`: capped at max_explore_every
    (300.0, [8, 32, 32, 32, 32])])  # drafting's far lead: 4x from the first, up to the
    # far cap
def test_a_far_lead_lets_the_interval_grow_past_the_near_cap(gate, intervals):
    """Where drafting wins by far, each plain window costs most and is least likely to win:
    it comes more rarely than where the two are near."""
    regimes = Regimes(window=2, settle=0, regimes=TWO, explore_every=2, max_explore_every=8,
                      max_explore_far=32)
    ran = _run(regimes, 1, {GATE: gate, PLAIN: 100.0}, windows=200)
    plain = [i for i, r in enumerate(ran) if r == PLAIN]
    gaps = [b - a - 1 for a, b in zip(plain, plain[1:])]  # GATE windows between plain ones
    assert gaps[:5] == intervals


def test_a_regime_that_becomes_faster_takes_over_and_the_interval_starts_again():
    regimes = Regimes(window=2, settle=0, regimes=TWO, explore_every=2, max_explore_every=16,
                      smoothing=1.0)
    _run(regimes, 8, {GATE: 100.0, PLAIN: 200.0}, windows=12)  # plain settles
    assert regimes.loads[3].interval > 2
    ran = _run(regimes, 8, {GATE: 400.0, PLAIN: 200.0}, windows=20)
    first_gate = ran.index(GATE)  # its window now shows it faster: it takes over at once,
    assert ran[first_gate + 1:first_gate + 4] == [GATE, GATE, PLAIN]  # for 2 windows again


def test_the_first_steps_after_a_change_of_regime_are_not_measured():
    """Plain steps right after drafting ones run slow while caches refill: a window's first
    `settle` steps in a new regime (and at a new load) run, but are left out of its measure."""
    regimes = Regimes(window=3, settle=2, regimes=TWO, explore_every=2, smoothing=1.0)
    ran, last, since = [], None, 0
    for _ in range(10):
        regime = regimes.regime(16)
        since = since + 1 if regime == last else 0
        last = regime
        slow = 5.0 if since < 2 else 1.0  # the first two steps of a regime: 5x slower
        regimes.observe(16, regime, 16, 0.16 * slow)  # else 100 tokens/s
        ran.append(regime)
    assert ran == [GATE] * 5 + [PLAIN] * 5  # 2 steps to settle and a window of 3, each
    assert regimes.means(16) == pytest.approx({GATE: 100.0, PLAIN: 100.0})
    assert regimes.plain_steps == 5  # the settling steps are run and counted as run


def test_drafting_must_have_given_more_than_the_margin_to_be_chosen():
    """Drafting's costs outlast its windows (requests drift apart), so a near tie goes to
    plain decoding."""
    close = {GATE: 105.0, PLAIN: 100.0}
    assert _run(Regimes(window=2, settle=0, regimes=TWO, margin=1.1), 16, close,
                windows=4)[2:] == [PLAIN, PLAIN]
    assert _run(Regimes(window=2, settle=0, regimes=TWO, margin=1.0), 16, close,
                windows=4)[2:] == [GATE, GATE]
    assert _run(Regimes(window=2, settle=0, regimes=TWO, margin=1.1), 16,
                {GATE: 120.0, PLAIN: 100.0},
                windows=4)[2:] == [GATE, GATE]


def test_plain_is_settled_once_a_window_of_the_gate_has_confirmed_it():
    """Requests at a load settled on plain decoding may stop keeping a draft context: only
    after drafting's window has lost, and lost again when tried, and only there."""
    regimes = Regimes(window=2, settle=0, regimes=TWO, explore_every=2, max_explore_every=8,
                      smoothing=1.0)
    slow_gate = {GATE: 100.0, PLAIN: 300.0}
    assert not regimes.settled_plain(64)  # never seen
    _run(regimes, 64, slow_gate, windows=2)  # one window each: plain leads, untried since
    assert regimes.regime(64) == PLAIN and not regimes.settled_plain(64)
    ran = _run(regimes, 64, slow_gate, windows=4)
    assert GATE in ran and regimes.regime(64) == PLAIN
    assert regimes.settled_plain(64) and regimes.settled_plain(127)
    assert not regimes.settled_plain(32)  # another load
    _run(regimes, 2, {GATE: 300.0, PLAIN: 100.0}, windows=8)  # drafting wins there
    assert not regimes.settled_plain(2)
    _run(regimes, 64, {GATE: 900.0, PLAIN: 300.0}, windows=12)  # drafting now wins at 64
    assert not regimes.settled_plain(64)


def test_each_load_keeps_its_own_windows():
    regimes = Regimes(window=2, settle=0, regimes=TWO)
    _run(regimes, 64, {GATE: 100.0, PLAIN: 300.0}, windows=4)
    _run(regimes, 2, {GATE: 300.0, PLAIN: 100.0}, windows=4)
    assert regimes.regime(64) == PLAIN and regimes.regime(127) == PLAIN  # one power of two
    assert regimes.regime(2) == GATE and regimes.regime(3) == GATE
    assert regimes.regime(16) == GATE  # never seen: the gate first


@pytest.mark.parametrize("tokens, seconds", [
    (4, 0.0), (4, -1.0), (4, math.nan), (4, math.inf), (-1, 0.01), (True, 0.01),
    (2.5, 0.01)])
def test_steps_that_cannot_be_measured_teach_nothing(tokens, seconds):
    regimes = Regimes(window=1, settle=0, regimes=TWO)
    regimes.regime(4)
    regimes.observe(4, GATE, tokens, seconds)
    assert regimes.regime(4) == GATE and regimes.loads[2].mean == {}


def test_a_step_of_another_regime_or_an_unseen_load_teaches_nothing():
    regimes = Regimes(window=1, settle=0, regimes=TWO)
    regimes.observe(4, GATE, 4, 0.01)  # no step of this load was planned
    assert regimes.loads == {}
    regimes.regime(4)
    regimes.observe(4, PLAIN, 4, 0.01)  # the load runs GATE now
    assert regimes.loads[2].mean == {} and regimes.plain_steps == 0


@pytest.mark.parametrize("kwargs, field", [
    ({"window": 0}, "window"), ({"window": 2.0}, "window"), ({"explore_every": True},
                                                                "explore_every"),
    ({"explore_every": 8, "max_explore_every": 4}, "max_explore_every"),
    ({"max_explore_every": 16, "max_explore_far": 8}, "max_explore_far"),
    ({"max_explore_far": 0}, "max_explore_far"),
    ({"settle": -1}, "settle"), ({"settle": 1.5}, "settle"),
    ({"regimes": (GATE,)}, "regimes"), ({"regimes": (GATE, PLAIN, "greedy")}, "regimes"),
    ({"regimes": (GATE, PLAIN, PLAIN)}, "regimes"), ({"regimes": "gate,plain"}, "regimes"),
    ({"smoothing": 0}, "smoothing"), ({"smoothing": 1.5}, "smoothing"),
    ({"margin": 0.9}, "margin"), ({"margin": math.inf}, "margin"),
    ({"gate_margin": 0.99}, "gate_margin"), ({"gate_margin": True}, "gate_margin")])
def test_settings_are_checked_by_name(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Regimes(**kwargs)


def test_with_whole_blocks_each_of_three_regimes_runs_a_window_then_the_best_runs():
    """FULL (every request drafts its whole block) competes too: a new load tries GATE,
    PLAIN and FULL a window each; the best runs, and the other two get windows in turn."""
    regimes = Regimes(window=2, settle=0, explore_every=2, max_explore_every=2)
    speed = {GATE: 110.0, PLAIN: 100.0, FULL: 120.0}  # none far ahead (`FAR`)
    ran = _run(regimes, 4, speed, windows=12)
    assert ran[:3] == [GATE, PLAIN, FULL]
    assert ran[3:5] == [FULL, FULL] and ran[5] in (GATE, PLAIN)
    tried = [r for r in ran[5:] if r != FULL]
    assert tried[:2] in ([GATE, PLAIN], [PLAIN, GATE])  # each in turn
    assert regimes.means(4) == pytest.approx(speed)


@pytest.mark.parametrize("full, best", [(108.0, PLAIN), (115.0, FULL)])
def test_whole_blocks_must_beat_plain_decoding_by_the_margin_too(full, best):
    regimes = Regimes(window=2, settle=0, margin=1.1)
    ran = _run(regimes, 8, {GATE: 90.0, PLAIN: 100.0, FULL: full}, windows=5)
    assert ran[3:5] == [best, best]


def test_plain_is_settled_only_once_whole_blocks_have_been_tried_too():
    regimes = Regimes(window=2, settle=0, explore_every=2, max_explore_every=8,
                      smoothing=1.0)
    slow = {GATE: 100.0, PLAIN: 300.0, FULL: 120.0}
    _run(regimes, 64, slow, windows=2)  # GATE's and PLAIN's windows: FULL untried
    assert not regimes.settled_plain(64)
    _run(regimes, 64, slow, windows=10)
    assert regimes.regime(64) == PLAIN and regimes.settled_plain(64)


def test_a_gate_window_without_a_draft_pass_shows_drafting_no_better_than_plain():
    """Where the gate drafted nobody, its window was plain decoding: however fast it ran
    (plain windows taken early may have run cold), it cannot make drafting the better."""
    regimes = Regimes(window=2, settle=0, regimes=TWO, explore_every=2, smoothing=1.0)
    for regime, tps, drafted in [(GATE, 150.0, False), (PLAIN, 100.0, False)]:
        assert regimes.regime(64) == regime
        for _ in range(2):
            regimes.observe(64, regime, 64, 64 / tps, drafted=drafted)
    assert regimes.regime(64) == PLAIN  # the gate's window counts as no better than PLAIN
    drafting = Regimes(window=2, settle=0, regimes=TWO, explore_every=2, smoothing=1.0)
    for regime, tps in [(GATE, 150.0), (PLAIN, 100.0)]:
        assert drafting.regime(64) == regime
        for _ in range(2):
            drafting.observe(64, regime, 64, 64 / tps)  # a draft pass ran
    assert drafting.regime(64) == GATE


def _settle_plain(regimes, rows):
    """Run windows at `rows` where plain decoding wins by far until it is settled there."""
    for _ in range(40):
        if regimes.settled_plain(rows):
            return
        _run(regimes, rows, {GATE: 100.0, PLAIN: 300.0, FULL: 120.0})
    raise AssertionError(f"plain never settled at {rows}")


def test_a_load_above_one_settled_on_plain_starts_there_without_trying_the_others():
    """Drafting pays less the more requests share a step: where it lost twice at 32
    requests, 64 run plain from their first step, settled (no draft context kept), even
    where drafting's windows would have been faster."""
    regimes = Regimes(window=2, settle=0, explore_every=2, max_explore_every=8)
    assert not regimes.settled_plain(64)
    _settle_plain(regimes, 32)
    assert regimes.settled_plain(64) and regimes.settled_plain(127)  # before any window
    ran = _run(regimes, 64, {GATE: 900.0, PLAIN: 100.0, FULL: 900.0}, windows=20)
    assert ran == [PLAIN] * 20 and regimes.settled_plain(64)
    assert regimes.means(64) == pytest.approx({PLAIN: 100.0})  # its own windows still count
    assert not regimes.settled_plain(16)  # a lower load learns nothing from a higher one
    assert _run(regimes, 16, {GATE: 300.0, PLAIN: 100.0, FULL: 120.0}, windows=3) == [
        GATE, PLAIN, FULL]


def test_a_load_inherits_only_from_the_nearest_lower_load_with_a_verdict():
    regimes = Regimes(window=2, settle=0, explore_every=2, max_explore_every=8)
    _run(regimes, 8, {GATE: 300.0, PLAIN: 100.0, FULL: 120.0}, windows=6)  # drafting wins
    _run(regimes, 64, {GATE: 100.0, PLAIN: 300.0, FULL: 120.0}, windows=1)  # GATE's window
    assert regimes.regime(64) == PLAIN and not regimes.settled_plain(64)  # its own turn
    assert _run(regimes, 64, {GATE: 100.0, PLAIN: 300.0, FULL: 120.0}) == [PLAIN]
    assert regimes.regime(64) == FULL  # nothing settled below it: FULL's window comes next
    _settle_plain(regimes, 16)  # now the nearest lower load with a verdict is settled
    assert regimes.regime(64) == PLAIN and regimes.settled_plain(64)  # FULL's window is off
    assert regimes.regime(32) == PLAIN and regimes.settled_plain(32)
    assert regimes.regime(8) == GATE and not regimes.settled_plain(8)  # below: its own


def test_a_load_that_has_tried_every_regime_keeps_its_own_verdict():
    regimes = Regimes(window=2, settle=0, explore_every=2, max_explore_every=8)
    _run(regimes, 64, {GATE: 300.0, PLAIN: 100.0, FULL: 120.0}, windows=4)  # drafting wins
    _settle_plain(regimes, 16)
    assert regimes.regime(64) == GATE and not regimes.settled_plain(64)


@pytest.mark.parametrize("gate, best", [(104.0, FULL), (100.0, FULL), (95.0, FULL),
                                        (106.0, GATE)])
def test_the_gate_must_beat_whole_blocks_by_its_margin(gate, best):
    """Where both draft, a window's throughput follows its text more than its regime: a near
    tie between the two drafting regimes goes to whole blocks."""
    regimes = Regimes(window=2, settle=0, margin=1.1, gate_margin=1.05)
    ran = _run(regimes, 1, {GATE: gate, PLAIN: 50.0, FULL: 100.0}, windows=5)
    assert ran[:3] == [GATE, PLAIN, FULL] and ran[3:5] == [best, best]


def test_a_window_counts_its_rows_at_what_its_regime_has_committed_a_row_so_far():
    """How many tokens a drafting row commits follows its text: a window of text the drafter
    guesses badly is not a slower regime. Each drafting step here takes 10 ms, whatever it
    commits; plain steps commit one token in 5 ms (200 tokens/s)."""
    regimes = Regimes(window=2, settle=0, regimes=TWO, explore_every=2, smoothing=1.0)
    per_step = iter([9, 9, 1, 1, 1, 1, 9, 9])  # the drafting windows' tokens a step, in turn
    ran = []
    for _ in range(5):
        regime = regimes.regime(1)
        ran.append(regime)
        for _ in range(2):
            tokens = next(per_step) if regime == GATE else 1
            regimes.observe(1, regime, tokens, 0.01 if regime == GATE else 0.005, rows=1)
    assert ran == [GATE, PLAIN, GATE, GATE, GATE]  # (without the rows: GATE, PLAIN, GATE,
    # then PLAIN, its second window at 100 tokens/s counted as drafting's pace)
    assert regimes.means(1)[GATE] == pytest.approx(500.0)  # 40 tokens over 8 rows, 10 ms a row


def test_a_plain_window_is_not_corrected():
    regimes = Regimes(window=2, settle=0, regimes=TWO, smoothing=1.0)
    regimes.regime(16)
    for _ in range(2):
        regimes.observe(16, GATE, 40, 0.1, rows=16)
    for _ in range(2):
        regimes.observe(16, PLAIN, 16, 0.1, rows=16)
    assert regimes.means(16) == pytest.approx({GATE: 400.0, PLAIN: 160.0})



def _forecast_at(table):
    """A forecast that answers `table[demand]` times the tokens a drafting row commits over
    5, and records what it was asked."""
    asked = []

    def forecast(demand, tokens_per_row):
        asked.append((demand, tokens_per_row))
        return None if table.get(demand) is None else table[demand] * tokens_per_row / 5.0
    return forecast, asked


def _draft_at_four(regimes):
    """Windows at 4 requests where whole blocks win by far, committing 5 tokens a row."""
    for _ in range(6):
        regime = regimes.regime(4)
        for _ in range(regimes.window):
            tokens = 20 if regime != PLAIN else 4
            regimes.observe(4, regime, tokens, 0.01, rows=4)


def test_a_new_load_the_tables_forecast_within_the_margin_runs_plain_settled_at_once():
    """The forecast is asked at the new load's fewest requests, at what whole blocks
    committed a row at the nearest lower load that tried every regime; within the margin,
    the load never runs a drafting window, even where drafting's windows would be faster."""
    regimes = Regimes(window=2, settle=0, margin=1.1)
    regimes.forecast, asked = _forecast_at({16: 1.05, 32: 0.9})
    _draft_at_four(regimes)
    assert regimes.regime(4) == FULL and asked == []  # nothing lower than 4 tried them all
    assert regimes.settled_plain(20) and asked == [(16, pytest.approx(5.0))]
    ran = _run(regimes, 20, {GATE: 900.0, PLAIN: 100.0, FULL: 900.0}, windows=10)
    assert ran == [PLAIN] * 10 and regimes.settled_plain(20)
    assert regimes.settled_plain(40)  # above it: inherited (or foreseen: 0.9 is below too)


@pytest.mark.parametrize("forecast", [1.2, None])
def test_a_load_the_tables_forecast_beyond_the_margin_or_cannot_forecast_tries_every_regime(
        forecast):
    regimes = Regimes(window=2, settle=0, margin=1.1)
    regimes.forecast, asked = _forecast_at({16: forecast})
    _draft_at_four(regimes)
    assert not regimes.settled_plain(16) and asked == [(16, pytest.approx(5.0))]
    assert _run(regimes, 16, {GATE: 100.0, PLAIN: 300.0, FULL: 120.0}, windows=3) == [
        GATE, PLAIN, FULL]


def test_a_lower_load_never_takes_a_forecast_from_a_higher_one():
    regimes = Regimes(window=2, settle=0, margin=1.1)
    regimes.forecast, asked = _forecast_at({1: 0.5, 2: 0.5, 4: 0.5, 16: 0.5})
    _draft_at_four(regimes)  # the first load: nothing lower to take a yield from
    assert regimes.regime(4) == FULL and not regimes.settled_plain(4) and asked == []
