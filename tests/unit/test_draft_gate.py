"""The engine's draft gate: when a `prefix` step drafts, from earlier blocks only."""

from types import SimpleNamespace

import pytest
import torch

from sparkgrid.costs import SPSTable
from worker.engine.draft_gate import DraftGate
from worker.engine.online_costs import OnlineCosts
from worker.engine.spec_step import DraftProposal

FLAT = SPSTable([1], [1.0])  # one second per verify forward, whatever its size
SLOW_DRAFT = SPSTable([1], [1 / 5.0])  # five seconds per draft pass: never pays beside FLAT
MODERATE_DRAFT = SPSTable([1], [1 / 1.5])  # pays for likely tokens only (1.2 against 1 tok/s)
FAST_DRAFT = SPSTable([1], [1e6])  # a microsecond per draft pass


def _reqs(*policies, remaining=100):
    return [SimpleNamespace(req_id=f"r{i}", policy=p, remaining=remaining)
            for i, p in enumerate(policies)]


def _proposal(conf_logits):
    conf = torch.tensor(conf_logits, dtype=torch.float32)
    return DraftProposal(ids=torch.zeros(conf.shape, dtype=torch.long), probs=None,
                         conf_logits=conf)


UNLIKELY, LIKELY = [[-4.0, -4.0]], [[6.0, 6.0]]  # a ~ 0.018; a ~ 0.9975


def test_a_request_without_an_estimate_drafts():
    gate = DraftGate(gamma=2, sts=None, draft_cost=MODERATE_DRAFT)
    reqs = _reqs("prefix", "prefix")
    assert gate.rows(reqs, [0, 1], FLAT, 512) == [0, 1]


def test_costly_drafting_of_unlikely_tokens_is_skipped_then_refreshed_less_often():
    gate = DraftGate(gamma=2, sts=None, draft_cost=MODERATE_DRAFT, refresh_steps=3,
                     max_refresh_steps=6)
    reqs = _reqs("prefix")
    drafted_at = []
    for step in range(20):
        rows = gate.rows(reqs, [0], FLAT, 512) if step else [0]
        if rows:
            drafted_at.append(step)
            gate.observe(reqs, rows, _proposal(UNLIKELY))
    # skips 3, then 6 (doubled, the cap), then 6 again, between refreshing drafts
    assert drafted_at == [0, 4, 11, 18]
    assert gate.skipped_steps == 20 - len(drafted_at)


def test_cheap_drafting_of_likely_tokens_goes_ahead():
    gate = DraftGate(gamma=2, sts=None, draft_cost=FAST_DRAFT)
    reqs = _reqs("prefix")
    gate.observe(reqs, [0], _proposal(LIKELY))
    assert gate.rows(reqs, [0], FLAT, 512) == [0]
    assert gate.skipped_steps == 0


def test_the_draft_cost_decides_between_the_same_estimates():
    reqs = _reqs("prefix")
    fast = DraftGate(gamma=2, sts=None, draft_cost=FAST_DRAFT)
    slow = DraftGate(gamma=2, sts=None, draft_cost=SLOW_DRAFT)
    for gate in (fast, slow):
        gate.observe(reqs, [0], _proposal(LIKELY))
    # drafting commits up to 3 tokens a step: worth a microsecond, not five seconds
    assert fast.rows(reqs, [0], FLAT, 512) == [0]
    assert slow.rows(reqs, [0], FLAT, 512) == []


def test_the_refresh_interval_resets_when_drafting_pays_again():
    gate = DraftGate(gamma=2, sts=None, draft_cost=SPSTable([1], [2.0]), refresh_steps=2,
                     max_refresh_steps=16)  # half a second per draft pass
    reqs = _reqs("prefix")
    gate.observe(reqs, [0], _proposal(UNLIKELY))
    for _ in range(2):
        assert gate.rows(reqs, [0], FLAT, 512) == []
    assert gate.rows(reqs, [0], FLAT, 512) == [0]  # refresh: the text got easy
    for _ in range(10):  # a running mean: the old estimate fades
        gate.observe(reqs, [0], _proposal(LIKELY))
    assert gate.rows(reqs, [0], FLAT, 512) == [0]
    assert gate._interval["r0"] == 2


def test_other_policies_and_missing_cost_models_are_never_gated():
    gate = DraftGate(gamma=2, sts=None, draft_cost=SLOW_DRAFT)
    reqs = _reqs("prefix", "fixed")
    gate.observe(reqs, [0, 1], _proposal(UNLIKELY * 2))
    assert gate.rows(reqs, [0, 1], FLAT, 512) == [0, 1]
    assert gate.rows(reqs, [0, 1], None, 512) == [0, 1]  # no SPS table
    ungated = DraftGate(gamma=2, sts=None, draft_cost=None)
    one = _reqs("prefix")
    ungated.observe(one, [0], _proposal(UNLIKELY))
    assert ungated.rows(one, [0], FLAT, 512) == [0]


def test_a_request_arriving_with_nobody_around_starts_from_the_finished_ones():
    """A finished request's estimate is dropped, and a request arriving with nobody around
    starts from the finished requests' of its kind, greedy or sampled (a running mean),
    instead of forcing a draft pass; without any, it drafts to learn."""
    reqs = _reqs("prefix")
    fresh = DraftGate(gamma=2, sts=None, draft_cost=MODERATE_DRAFT)
    assert fresh.rows(reqs, [0], FLAT, 512) == [0]
    for prior, drafts in ((UNLIKELY, []), (LIKELY, [0])):
        gate = DraftGate(gamma=2, sts=None, draft_cost=MODERATE_DRAFT)
        gate.observe(_reqs("prefix"), [0], _proposal(prior))
        gate.forget("r0")
        newcomer = [SimpleNamespace(req_id="later", policy="prefix", remaining=100)]
        assert gate.rows(newcomer, [0], FLAT, 512) == drafts
        # a sampled request begins from sampled ones only (greedy steps follow the timing)
        sampled = [SimpleNamespace(req_id="sampled", policy="prefix", remaining=100,
                                   params=SimpleNamespace(temperature=0.8))]
        gate.forget("later")
        assert gate.rows(sampled, [0], FLAT, 512) == [0]


def test_only_the_requests_whose_drafting_pays_draft():
    """A draft pass costs 0.1 s for one row and 5 s for two; a verify forward 1 s. Drafting
    the likely request alone commits about 4 tokens in 1.1 s (plain: 2 in 1 s); drafting both
    would take 6 s. So only the likely one drafts, and the unlikely one counts as skipped."""
    cost = SPSTable([1, 2], [1 / 0.1, 1 / 5.0])
    gate = DraftGate(gamma=2, sts=None, draft_cost=cost)
    reqs = _reqs("prefix", "prefix")
    gate.observe(reqs, [0, 1], _proposal(UNLIKELY + LIKELY))
    assert gate.rows(reqs, [0, 1], FLAT, 512) == [1]
    assert (gate.skipped_steps, gate.skipped_rows) == (0, 1)
    free = DraftGate(gamma=2, sts=None, draft_cost=SPSTable([1, 2], [1e6, 1e6]))
    free.observe(reqs, [0, 1], _proposal(UNLIKELY + LIKELY))
    assert free.rows(reqs, [0, 1], FLAT, 512) == [0, 1]  # free drafting: even ~0.02 tokens


def test_a_request_due_for_refresh_drafts_beside_the_chosen_ones():
    gate = DraftGate(gamma=2, sts=None, draft_cost=SPSTable([1, 2], [1 / 0.1, 1 / 0.2]),
                     refresh_steps=2)
    reqs = _reqs("prefix", "prefix")
    gate.observe(reqs, [0, 1], _proposal(UNLIKELY + LIKELY))
    drafted = []
    for _ in range(6):
        rows = gate.rows(reqs, [0, 1], FLAT, 512)
        drafted.append(rows)
        gate.observe(reqs, rows, _proposal([UNLIKELY[0] if i == 0 else LIKELY[0] for i in rows]))
    # the unlikely request skips 2 steps, refreshes, then its interval doubles to 4
    assert drafted == [[1], [1], [0, 1], [1], [1], [1]]
    assert gate._interval["r0"] == 4


def test_a_newcomer_starts_from_the_others_mean_instead_of_drafting():
    """With estimates around, a new request is weighed like the others: where drafting
    unlikely tokens costs too much it does not draft either (until its refresh interval);
    where likely tokens are cheap to draft, it drafts."""
    gate = DraftGate(gamma=2, sts=None, draft_cost=SPSTable([1], [2.0]), refresh_steps=3)
    old = _reqs("prefix")
    gate.observe(old, [0], _proposal(UNLIKELY))
    reqs = old + [SimpleNamespace(req_id="new", policy="prefix", remaining=100)]
    drafted = [gate.rows(reqs, [0, 1], FLAT, 512) for _ in range(4)]
    assert drafted[:3] == [[], [], []]
    assert 1 in drafted[3]  # its refresh interval ran out
    gate = DraftGate(gamma=2, sts=None, draft_cost=FAST_DRAFT)
    gate.observe(old, [0], _proposal(LIKELY))
    assert gate.rows(reqs, [0, 1], FLAT, 512) == [0, 1]


def test_where_not_even_accepted_drafts_would_pay_nobody_drafts_until_the_load_falls():
    """A draft pass costs 1.5 s for one row and 20 s for eight; a verify forward 1 s whatever
    it holds. Among eight requests no subset's drafting could pay with every token accepted,
    so none drafts, not even one without an estimate; alone, it drafts to get one."""
    gate = DraftGate(gamma=2, sts=None, draft_cost=SPSTable([1, 8], [1 / 1.5, 1 / 20.0]))
    crowd = _reqs(*["prefix"] * 8)
    for _ in range(3):
        assert gate.rows(crowd, list(range(8)), FLAT, 512) == []
    assert (gate.skipped_steps, gate.skipped_rows) == (3, 24)
    assert gate.rows(crowd[:1], [0], FLAT, 512) == [0]


def test_a_refresh_forces_a_draft_pass_only_where_the_due_requests_drafting_could_pay():
    """Three requests, a draft pass of 1.5 s, a verify forward of 1 s: one request drafting
    alone could not pay even with every token accepted (5 tokens in 2.5 s against 3 in 1 s),
    all three could (9 in 2.5 s). So a lone stale estimate stays out when its refresh falls
    due, and three falling due together draft."""
    gate = DraftGate(gamma=2, sts=None, draft_cost=MODERATE_DRAFT, refresh_steps=2)
    reqs = _reqs("prefix", "prefix", "prefix")
    gate.observe(reqs, [0, 1, 2], _proposal(UNLIKELY * 3))
    assert gate.rows(reqs, [0, 1, 2], FLAT, 512) == []
    gate.observe(reqs, [1, 2], _proposal(UNLIKELY * 2))  # r1, r2 fresh again: r0 due first
    assert gate.rows(reqs, [0, 1, 2], FLAT, 512) == []
    assert gate.rows(reqs, [0, 1, 2], FLAT, 512) == []  # r0 is due, alone
    assert gate.rows(reqs, [0, 1, 2], FLAT, 512) == [0, 1, 2]  # all three due


def test_a_request_due_for_refresh_joins_a_draft_pass_that_runs_anyway():
    """Three requests; a draft pass costs 1 s for one or two rows, 1.2 s for three; a verify
    forward 1 s. One request drafting alone could not pay (5 tokens in 2 s against 3 in 1 s),
    the two likely ones together do, so the unlikely one is left out until its refresh falls
    due, and then drafts beside them instead of forcing a pass of its own."""
    gate = DraftGate(gamma=2, sts=None, draft_cost=SPSTable([1, 2, 3], [1.0, 1.0, 1 / 1.2]),
                     refresh_steps=2)
    reqs = _reqs("prefix", "prefix", "prefix")
    gate.observe(reqs, [0, 1, 2], _proposal(LIKELY * 2 + UNLIKELY))
    drafted = []
    for _ in range(3):
        rows = gate.rows(reqs, [0, 1, 2], FLAT, 512)
        drafted.append(rows)
        gate.observe(reqs, rows, _proposal([UNLIKELY[0] if i == 2 else LIKELY[0] for i in rows]))
    assert drafted == [[0, 1], [0, 1], [0, 1, 2]]
    assert gate.rows(reqs, [0, 1, 2], FLAT, 512) == [0, 1]  # refreshed: still out
    assert gate._interval["r2"] == 4


def test_deferred_draft_context_is_charged_to_the_requests_that_would_write_it():
    """Drafting a likely request pays (about 3 tokens in 2.5 s against 1 in 1 s) when its
    context is current, and not when 100 tokens of deferred context at 10 ms each must be
    written first (3 tokens in 3.5 s) by a request with three tokens left to make (a
    step's worth: the write cannot be spread over later steps)."""
    flush = SPSTable([1, 64, 512], [1 / 0.1, 1 / 0.1, 1 / (0.1 + 448 * 0.01)])  # 10 ms a token
    decisions = {}
    for deferred in (3, 103):  # one block's tokens (gamma + 1) are in the profiled overhead
        gate = DraftGate(gamma=2, sts=None, draft_cost=MODERATE_DRAFT)
        gate.flush.table, gate.flush.tokens = flush, lambda req_id, n=deferred: n
        reqs = _reqs("prefix", remaining=3)
        gate.observe(reqs, [0], _proposal(LIKELY))
        decisions[deferred] = gate.rows(reqs, [0], FLAT, 512)
        assert gate.flush.seconds(["r0"]) == pytest.approx(0.01 * (deferred - 3))
    assert decisions == {3: [0], 103: []}


@pytest.mark.parametrize("remaining, drafts", [(3, False), (40, True), (400, True)])
def test_deferred_context_is_spread_over_the_steps_it_will_serve(remaining, drafts):
    """The same 100 deferred tokens (1 s to write) are written once and then serve every
    later draft pass: a request with many tokens left (at about 2.8 tokens a step, 40 tokens
    are 14 steps; at most 16 are counted) drafts, one about to end does not."""
    flush = SPSTable([1, 64, 512], [1 / 0.1, 1 / 0.1, 1 / (0.1 + 448 * 0.01)])
    gate = DraftGate(gamma=2, sts=None, draft_cost=MODERATE_DRAFT)
    gate.flush.table, gate.flush.tokens = flush, lambda req_id: 103
    reqs = _reqs("prefix", remaining=remaining)
    gate.observe(reqs, [0], _proposal(LIKELY))
    est = gate._estimate["r0"]
    steps = min(max(1.0, remaining / (1 + est.sum())), 16)
    assert gate.flush.step_tokens(reqs[0], est) == pytest.approx(100 / steps)
    assert gate.rows(reqs, [0], FLAT, 512) == ([0] if drafts else [])


def test_the_online_factor_steers_greedy_steps_only():
    """Where drafting steps have run twice as long as their tables say, relative to plain
    ones, drafting the likely request (1.2 against 1 token a second by the tables) no longer
    pays in a greedy step; a step with a sampled request keeps the tables' choice, so its
    random draws keep their schedule."""
    gate = DraftGate(gamma=2, sts=None, draft_cost=MODERATE_DRAFT)
    gate.online = OnlineCosts()
    for _ in range(10):
        gate.online.observe(1, True, predicted=1.0, measured=2.0)
        gate.online.observe(1, False, predicted=1.0, measured=1.0)
    reqs = _reqs("prefix")
    gate.observe(reqs, [0], _proposal(LIKELY))
    assert gate.rows(reqs, [0], FLAT, 512, greedy=True) == []
    assert gate.rows(reqs, [0], FLAT, 512, greedy=False) == [0]
    gate.online = OnlineCosts()  # nothing learned yet: the tables alone
    assert gate.rows(reqs, [0], FLAT, 512, greedy=True) == [0]


def test_an_online_factor_below_one_lets_drafting_pay_where_the_tables_alone_would_not():
    """A five-second draft pass never pays beside a one-second forward by the tables (three
    tokens in 6 s against one in 1 s, every draft accepted); where drafting steps have run
    at 0.4 of their tables relative to plain ones, it does (0.5 / 0.4 = 1.25x), and the
    gate's first check, whether drafting could pay at all, must not rule it out first."""
    gate = DraftGate(gamma=2, sts=None, draft_cost=SLOW_DRAFT)
    reqs = _reqs("prefix")
    gate.observe(reqs, [0], _proposal(LIKELY))
    gate.online = OnlineCosts()
    assert gate.rows(reqs, [0], FLAT, 512, greedy=True) == []  # nothing learned: the tables
    for _ in range(10):
        gate.online.observe(1, True, predicted=1.0, measured=0.4)
        gate.online.observe(1, False, predicted=1.0, measured=1.0)
    assert gate.rows(reqs, [0], FLAT, 512, greedy=True) == [0]
    assert gate.rows(reqs, [0], FLAT, 512, greedy=False) == []  # sampled: the tables alone


def test_under_a_load_where_nothing_could_pay_nobody_drafts_and_planning_is_cached():
    """64 requests: drafting them all would pay if every draft token were accepted (192
    tokens in 1.5 s against 64 in 1 s), but not as well as the best estimate held (about 66
    tokens): nobody drafts, and no candidate subset is even weighed, step after step."""
    gate = DraftGate(gamma=2, sts=None, draft_cost=SPSTable([1, 64], [1 / 0.1, 1 / 0.5]),
                     refresh_steps=1000)
    reqs = _reqs(*["prefix"] * 64)
    gate.observe(reqs, list(range(64)), _proposal(UNLIKELY * 64))
    weighed = []
    original = gate._weigh_subsets
    gate._weigh_subsets = lambda *a: weighed.append(1) or original(*a)
    for _ in range(3):
        assert gate.rows(reqs, list(range(64)), FLAT, 4096) == []
    assert weighed == []


@pytest.mark.parametrize("reweigh", [1, 3])
def test_a_weighing_serves_at_most_reweigh_steps_while_the_estimates_move(reweigh):
    """Drafting pays on the first, likely estimate; every drafted block then is unlikely. A
    gate that weighs every step stops after one block; one whose weighing serves 3 steps
    stops after 3, and weighs a third as often where drafting keeps paying."""
    for cost, expected in ((MODERATE_DRAFT, [True] * reweigh + [False] * 4),
                           (FAST_DRAFT, [True] * 12)):
        gate = DraftGate(gamma=2, sts=None, draft_cost=cost, reweigh_steps=reweigh)
        weighed = _count_calls(gate, "_weigh_subsets")
        reqs = _reqs("prefix")
        gate.observe(reqs, [0], _proposal(LIKELY))
        drafted = []
        for _ in range(len(expected)):
            rows = gate.rows(reqs, [0], FLAT, 512)
            drafted.append(bool(rows))
            if rows:
                gate.observe(reqs, rows, _proposal(UNLIKELY))
        assert drafted == expected
        if cost is FAST_DRAFT:
            assert len(weighed) == len(expected) // reweigh
        newcomer = _reqs("prefix", "prefix")  # other requests: weighed at once
        before = len(weighed)
        gate.rows(newcomer, [0, 1], FLAT, 512)
        assert len(weighed) == before + 1
    with pytest.raises(ValueError, match="reweigh_steps"):
        DraftGate(gamma=2, sts=None, draft_cost=FAST_DRAFT, reweigh_steps=0)


def _count_calls(obj, name: str) -> list:
    """A list that grows by one at each call of `obj.name` (which still runs)."""
    calls, original = [], getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    setattr(obj, name, counted)
    return calls


def test_a_step_where_nobody_drafts_is_taken_again_without_weighing_and_the_same():
    """Requests that draft unlikely tokens, refreshed now and then, with requests coming and
    going: a gate that takes a quiet step's answer again (up to 8 steps, while nothing it
    rests on changed) chooses exactly as one that weighs every step, and weighs less."""
    script = []
    for quiet_steps in (8, 0):
        gate = DraftGate(gamma=2, sts=None, draft_cost=MODERATE_DRAFT, refresh_steps=3,
                         max_refresh_steps=12)
        gate.quiet_steps = quiet_steps
        asked = _count_calls(gate, "_could_pay")
        reqs, drafted = _reqs("prefix", "prefix"), []
        for step in range(60):
            if step == 20:
                reqs = reqs + [SimpleNamespace(req_id="late", policy="prefix", remaining=100)]
            if step == 40:
                gate.forget(reqs[0].req_id)
                reqs = reqs[1:]
            rows = gate.rows(reqs, list(range(len(reqs))), FLAT, 512)
            drafted.append(tuple(reqs[i].req_id for i in rows))
            if rows:
                gate.observe(reqs, rows, _proposal(UNLIKELY * len(rows)))
        script.append((drafted, gate.skipped_rows, gate.skipped_steps, len(asked)))
    (quiet, q_rows, q_steps, q_asked), (plain, p_rows, p_steps, p_asked) = script
    assert quiet == plain and (q_rows, q_steps) == (p_rows, p_steps)
    assert sum(1 for d in plain if not d) > 40  # mostly nobody drafts: refreshes only
    assert q_asked < p_asked / 2


@pytest.mark.parametrize("deferred, refreshed", [(3, True), (103, False)])
def test_a_refresh_is_charged_its_deferred_context_whole(deferred, refreshed):
    """A request left out (its blocks unlikely) falls due for a refresh after a step. With all
    its drafts accepted a refresh could pay by itself (3 tokens in 2.5 s against 1 in 1 s),
    and it forces a draft pass; with 100 deferred tokens to write first (1 s) it could not
    (3 in 3.5 s), however long the request has left: spread over later steps, the write
    would have passed (62 ms a step), but a refreshed request is most likely left out again."""
    flush = SPSTable([1, 64, 512], [1 / 0.1, 1 / 0.1, 1 / (0.1 + 448 * 0.01)])
    gate = DraftGate(gamma=2, sts=None, draft_cost=MODERATE_DRAFT, refresh_steps=1)
    gate.flush.table, gate.flush.tokens = flush, lambda req_id: deferred
    reqs = _reqs("prefix", remaining=1000)
    gate.observe(reqs, [0], _proposal(UNLIKELY))
    assert gate.rows(reqs, [0], FLAT, 512) == []  # unlikely: left out, now due
    assert gate.rows(reqs, [0], FLAT, 512) == ([0] if refreshed else [])


@pytest.mark.parametrize("margin, drafts", [(1.0, True), (1.1, True), (1.25, False)])
def test_drafting_by_choice_must_promise_the_margin(margin, drafts):
    """The likely request's drafting promises 1.2x plain decoding by the tables
    (`MODERATE_DRAFT`): it drafts under a margin of 1.1, not under one of 1.25, in greedy
    steps and sampled ones alike."""
    gate = DraftGate(gamma=2, sts=None, draft_cost=MODERATE_DRAFT, margin=margin)
    reqs = _reqs("prefix")
    gate.observe(reqs, [0], _proposal(LIKELY))
    for greedy in (True, False):
        assert gate.rows(reqs, [0], FLAT, 512, greedy=greedy) == ([0] if drafts else [])


@pytest.mark.parametrize("margin", [0.9, float("nan"), float("inf"), "1.1"])
def test_a_bad_margin_is_refused(margin):
    with pytest.raises(ValueError, match="margin"):
        DraftGate(gamma=2, sts=None, draft_cost=MODERATE_DRAFT, margin=margin)
