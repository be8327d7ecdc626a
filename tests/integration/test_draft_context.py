"""The drafter's context on real (small) weights: deferred and written later as if written
step by step, the cost of writing it profiled and charged, the steps that teach the gate's
online costs, and requests that stop keeping a context where drafting is ruled out."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_engines import make_engine  # noqa: E402  (beside this file)

from sparkgrid.costs import SPSTable
from worker.engine import profile_cache
from worker.engine.config import SamplingParams
from worker.engine.online_costs import OnlineCosts
from worker.engine.regimes import FULL, GATE, PLAIN, Regimes

TWO = (GATE, PLAIN)  # the regimes these tests weigh (not FULL)

pytestmark = pytest.mark.integration


def test_where_drafting_is_ruled_out_requests_stop_keeping_draft_context(structured_pairs,
                                                                         tmp_path):
    """A draft pass priced at a minute: the gate's first bound rules drafting out step after
    step. After `dormant_after` such steps the `prefix` requests drop their deferred context
    and keep none (no features asked of the target), a newcomer admitted meanwhile keeps
    none, and the text is still the target's. Once the engine has idled, a request at a load
    where drafting pays keeps its context again."""
    pair = structured_pairs("qwen3", "vanilla")
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = [list(range(i, i + 5)) for i in range(5)]
    want = make_engine(pair, tmp_path, policy="ar").generate(prompts, params)
    engine = make_engine(pair, tmp_path, policy="prefix")
    planner, gate = engine.planner, engine.gate
    planner.dormant_after = 4
    profiled = (gate.draft_cost, gate.overhead.drafting)
    minute = SPSTable([1], [1 / 60.0])
    gate.draft_cost, gate.overhead.drafting = minute, minute if profiled[1] else None
    asked = []  # whether each target forward was asked for features
    forward = engine.runner.forward
    engine.runner.forward = lambda batch, want_features: (
        asked.append(want_features) or forward(batch, want_features))
    ids = [engine.add_request(p, params) for p in prompts[:4]]
    got = {i: [] for i in ids}

    def step():
        for out in engine.step():
            got.setdefault(out.req_id, []).extend(out.token_ids)

    step()  # the prefill: prompts deferred as draft context
    assert all(engine.draft_runner.deferred_tokens(i) == 5 for i in ids)
    for _ in range(planner.dormant_after):
        step()
    assert not any(engine.requests[i].keeps_context for i in ids)
    assert all(engine.draft_runner.deferred_tokens(i) == 0 for i in ids)
    late = engine.add_request(prompts[4], params)
    ids.append(late)
    asked.clear()
    while engine.has_unfinished():
        step()
    assert not any(asked)  # nobody keeps a context: no features, no deferral
    assert engine.counters.draft_forwards == 0
    assert [got[i] for i in ids] == [w["token_ids"] for w in want]
    gate.draft_cost, gate.overhead.drafting = profiled
    engine.sps = engine.step_cost = SPSTable([1, 512], [100.0, 100.0])  # drafting pays
    alone = engine.add_request(prompts[0], params)
    engine.step()
    assert engine.requests[alone].keeps_context
    assert engine.draft_runner.deferred_tokens(alone) == 5


def test_a_step_with_a_dormant_row_teaches_the_regimes_nothing(structured_pairs, tmp_path):
    """Requests gone dormant by the gate's bounds run plain whatever the regime, so a step in
    which one runs beside a request that keeps its context measures a mix: the regimes learn
    from the steps where every `prefix` row keeps a context, and from no other."""
    pair = structured_pairs("qwen3", "vanilla")
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    longer = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)  # outlasts them
    prompts = [list(range(i, i + 5)) for i in range(3)]
    want = make_engine(pair, tmp_path, policy="ar").generate(prompts, [params, params, longer])
    engine = make_engine(pair, tmp_path, policy="prefix")
    engine.sps = engine.step_cost = SPSTable([1, 512], [100.0, 100.0])  # drafting pays
    planner, gate = engine.planner, engine.gate
    planner.dormant_after = 4
    regimes = planner.regimes = Regimes(window=1000, settle=0)  # one window: it sums all
    ids = [engine.add_request(p, params) for p in prompts[:2]]
    got = {i: [] for i in ids}

    def step():
        for out in engine.step():
            got.setdefault(out.req_id, []).extend(out.token_ids)

    for _ in range(3):  # the prefill, then two steps in which both keep a context
        step()
    pair_load = regimes.loads[1]  # two or three requests
    assert pair_load.tokens > 0  # measured
    profiled = (gate.draft_cost, gate.overhead.drafting)
    minute = SPSTable([1], [1 / 60.0])  # a draft pass priced at a minute: ruled out
    gate.draft_cost, gate.overhead.drafting = minute, minute if profiled[1] else None
    for _ in range(planner.dormant_after):
        step()
    assert not any(engine.requests[i].keeps_context for i in ids)
    taught = (pair_load.tokens, pair_load.seconds)
    gate.draft_cost, gate.overhead.drafting = profiled  # drafting may pay again
    late = engine.add_request(prompts[2], longer)
    ids.append(late)
    step()  # the late one's prefill: it keeps a context
    assert engine.requests[late].keeps_context
    mixed = 0
    while any(i in engine.requests for i in ids[:2]):  # until the dormant two finish
        step()
        mixed += 1
    assert mixed >= 4
    assert (pair_load.tokens, pair_load.seconds) == taught  # two dormant rows beside it
    while engine.has_unfinished():
        step()
    assert regimes.loads[0].tokens > 0  # alone, it keeps its context: measured
    assert [got[i] for i in ids] == [w["token_ids"] for w in want]


def test_at_a_load_settled_on_plain_decoding_requests_keep_no_draft_context(
        structured_pairs, tmp_path):
    """The tables say drafting pays (the gate's bounds never rule it out), but at this load
    the regimes have settled on plain decoding (drafting's windows lost, twice): greedy
    requests admitted at that load keep no context from the start, with no streak of steps
    needed, no draft pass runs, and the text is the target's; those already running drop
    theirs at the first plain step. A sampled newcomer (timing must not reach it) and a
    request at a load not settled (one request) keep theirs."""
    pair = structured_pairs("qwen3", "vanilla")
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = [list(range(i, i + 5)) for i in range(5)]
    want = make_engine(pair, tmp_path, policy="ar").generate(prompts, params)
    engine = make_engine(pair, tmp_path, policy="prefix")
    engine.sps = engine.step_cost = SPSTable([1, 512], [100.0, 100.0])  # drafting pays
    planner = engine.planner
    planner.dormant_after = 10_000  # the bounds' streak never gets there
    regimes = planner.regimes = Regimes(window=2, settle=0, regimes=TWO,
                                                 explore_every=2, max_explore_every=64)
    for regime, speed in [(GATE, 1.0), (PLAIN, 1e6), (PLAIN, 1e6), (PLAIN, 1e6), (GATE, 1.0)]:
        assert regimes.regime(4) == regime  # what the load's windows have given so far
        for _ in range(regimes.window):  # a window of that regime at 4 requests: 4 tokens
            regimes.observe(4, regime, 4, 4 / speed)
    assert regimes.settled_plain(4) and not regimes.settled_plain(1)
    ids = [engine.add_request(p, params) for p in prompts[:4]]
    got = {i: [] for i in ids}

    def step():
        for out in engine.step():
            got.setdefault(out.req_id, []).extend(out.token_ids)

    step()  # the prefill, at a load of 4
    assert not any(engine.requests[i].keeps_context for i in ids)
    assert all(engine.draft_runner.deferred_tokens(i) == 0 for i in ids)
    step()
    late = engine.add_request(prompts[4], params)
    sampled = engine.add_request(prompts[0], SamplingParams(temperature=0.8, seed=1,
                                                            max_tokens=4))
    ids.append(late)
    step()  # admitted at a load of 4 or more: settled on plain
    assert not engine.requests[late].keeps_context
    assert engine.requests[sampled].keeps_context
    while engine.has_unfinished():
        step()
    assert [got[i] for i in ids] == [w["token_ids"] for w in want]
    alone = engine.add_request(prompts[0], params)
    engine.step()
    assert engine.requests[alone].keeps_context  # one request: a load not settled
    regimes.loads[0] = regimes.loads[2]  # now one request's load has settled on plain too
    engine.step()  # a plain step there: the running request drops its context
    assert not engine.requests[alone].keeps_context
    assert engine.draft_runner.deferred_tokens(alone) == 0


def test_what_timing_made_of_greedy_steps_never_reaches_a_sampled_newcomer(structured_pairs,
                                                                           tmp_path):
    """Measured steps that made drafting look far dearer than the tables (the online factor,
    which steers greedy steps only) rule it out for greedy requests until they stop keeping
    a context; a sampled request admitted while that streak holds keeps its own (its
    schedule follows the tables and its seed, never the clock), and a greedy newcomer keeps
    none."""
    pair = structured_pairs("qwen3", "vanilla")
    engine = make_engine(pair, tmp_path, policy="prefix", online_regimes=False)
    planner = engine.planner
    planner.dormant_after = 4
    engine.gate.online = OnlineCosts(warmup=1, clip=30.0, limit=30.0)
    for rows in range(1, 9):  # drafting steps measured e^30 times their tables' time
        engine.gate.online.observe(rows, True, 1.0, math.exp(30.0))
        engine.gate.online.observe(rows, False, 1.0, 1.0)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    sampled = SamplingParams(temperature=0.9, max_tokens=8, seed=3, ignore_eos=True)
    ids = [engine.add_request(list(range(i, i + 5)), greedy) for i in range(2)]
    for _ in range(1 + planner.dormant_after):  # the prefill, then steps ruled out
        engine.step()
    assert not any(engine.requests[i].keeps_context for i in ids)
    late_sampled = engine.add_request(list(range(7, 12)), sampled)
    late_greedy = engine.add_request(list(range(9, 14)), greedy)
    engine.step()
    assert engine.requests[late_sampled].keeps_context
    assert not engine.requests[late_greedy].keeps_context


@pytest.mark.parametrize("copy", [False, True])
def test_a_deferred_draft_context_is_the_context_written_step_by_step(structured_pairs,
                                                                      tmp_path, copy):
    """Deferred chunks of target features, flushed in one batch (or when a sequence holds
    `max_deferred` tokens), give the drafter the keys and values that writing each chunk as
    it came gives; held as copies (a prefill's), they no longer depend on the features they
    came from."""
    pair = structured_pairs("qwen3", "vanilla")
    now, later = (make_engine(pair, tmp_path / name, policy="fixed") for name in "ab")
    width = pair[1].config.hidden_size * len(now.runner.feature_layer_ids)
    gen = torch.Generator().manual_seed(5)
    chunks = [(torch.randn(9, width, dtype=torch.float64, generator=gen), counts)
              for counts in ([1, 4], [1, 2], [1, 1], [1, 1])]
    later.draft_runner.max_deferred = 6  # "b" reaches it in the second chunk: written then
    for kv in (now.draft_kv, later.draft_kv):
        for sid in ("a", "b"):
            kv.allocator.reserve(sid, 32)
    pos = [0, 0]
    for feats, counts in chunks:
        rows = [0, counts[0]]
        now.draft_runner.extend_context(["a", "b"], feats, rows, counts, pos)
        later.draft_runner.defer_context(["a", "b"], feats, rows, counts, pos, copy=copy)
        if copy:  # the step's output goes away (or is reused): the copies stay
            feats.zero_()
        pos = [p + c for p, c in zip(pos, counts)]
    held = later.draft_runner._deferred
    assert (held["a"].start, held["a"].count, held["b"].start, held["b"].count) == (0, 4, 6, 2)
    later.draft_runner.flush_context(["a", "b"])
    for sid, n in zip(("a", "b"), pos):
        slots = now.draft_kv.packed_slots([sid], torch.zeros(n, dtype=torch.long),
                                          torch.arange(n))
        slots_later = later.draft_kv.packed_slots([sid], torch.zeros(n, dtype=torch.long),
                                                  torch.arange(n))
        torch.testing.assert_close(later.draft_kv.k[:, slots_later], now.draft_kv.k[:, slots])
        torch.testing.assert_close(later.draft_kv.v[:, slots_later], now.draft_kv.v[:, slots])
    with pytest.raises(RuntimeError, match="position 5 deferred after 4"):
        later.draft_runner.defer_context(["a"], chunks[0][0], [0], [1], [5])


def test_the_flush_cost_is_profiled_and_the_steps_teach_the_online_costs(structured_pairs,
                                                                          tmp_path,
                                                                          monkeypatch):
    """Writing deferred draft context is timed at start beside the draft pass (cached, on
    stand-ins that leave the draft cache empty); the gate reads each request's deferred
    tokens; every decode step it planned (with a `prefix` row) of a greedy run is compared with
    its tables, and no other."""
    pair = structured_pairs("qwen3", "vanilla")
    engine = make_engine(pair, tmp_path, policy="prefix")
    flush = engine.gate.flush.table
    assert flush is not None and flush.batch_tokens[0] == 1 and len(flush.batch_tokens) >= 2
    seconds = [1 / s for s in flush.steps_per_second]
    assert all(b >= a for a, b in zip(seconds, seconds[1:]))
    assert len(list(tmp_path.glob("flush-*.json"))) == 1
    assert engine.draft_kv.allocator.num_used_blocks == 0
    # read back (a spot check that finds a cached table slowed measures it again, as a
    # neighbouring test's load may make it seem here: test_profile_cache covers that)
    monkeypatch.setattr(profile_cache, "SLOWED", math.inf)
    assert make_engine(pair, tmp_path, policy="prefix").gate.flush.table == flush
    # a forward costs the same whatever its tokens: drafting pays on any machine (on a fast
    # CPU the tiny pair's profiled tables can rule it out, and this test is about the steps)
    engine.sps = engine.step_cost = SPSTable([1, 512], [100.0, 100.0])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    rid = engine.add_request([5, 6, 7, 8], params, policy="ar")  # its context is not kept
    spec = engine.add_request([5, 6, 7, 8], params, policy="prefix")
    engine.step()  # the prefill: both prompts' features, deferred for the one that drafts
    assert engine.gate.flush.tokens(spec) == 4 and engine.gate.flush.tokens(rid) == 0
    planned = others = 0  # steps with the `prefix` request, and `ar`-only steps after it
    while engine.has_unfinished():
        with_prefix = any(r.req_id == spec for r in engine.running)
        engine.step()
        planned += with_prefix
        others += not with_prefix
    online = engine.gate.online
    assert others >= 1  # the `prefix` request finished first: it drafted
    assert sum(sum(seen) for seen in online.seen.values()) == planned
    assert sum(seen[1] for seen in online.seen.values()) >= 1  # its first block, at least
    assert all(math.isfinite(m) for means in online.log_ratio.values() for m in means)
    engine.add_request([5, 6, 7, 8], params, policy="fixed")  # another regime: its steps
    drafted = engine.counters.draft_forwards  # teach the gate nothing
    while engine.has_unfinished():
        engine.step()
    assert engine.counters.draft_forwards > drafted
    assert sum(sum(seen) for seen in online.seen.values()) == planned


def test_greedy_prefix_steps_run_in_the_regime_that_gave_more_tokens_a_second(
        structured_pairs, tmp_path):
    """At each load (requests running and waiting), windows of steps where the gate chooses
    who drafts and windows where nobody does, each regime's tokens per second measured on the
    engine's own steps: in a plain window no draft pass runs, the text is the target's
    either way, and a step with a sampled request is not steered (nor measured)."""
    pair = structured_pairs("qwen3", "vanilla")
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    prompts = [list(range(i, i + 5)) for i in range(2)]
    want = make_engine(pair, tmp_path, policy="ar").generate(prompts, params)
    engine = make_engine(pair, tmp_path, policy="prefix")
    # a forward costs the same whatever its tokens: on the tables drafting pays
    engine.sps = engine.step_cost = SPSTable([1, 512], [100.0, 100.0])
    regimes = Regimes(window=3, settle=0, regimes=TWO, explore_every=2)
    engine.planner.regimes = regimes
    ids = [engine.add_request(p, params) for p in prompts]
    got = {i: [] for i in ids}
    ran = []  # (regime, whether a draft pass ran) of each decode step
    while engine.has_unfinished():
        demand = len(engine.running) + len(engine.waiting)  # what the regimes are keyed by
        keeping = any(r.keeps_context for r in engine.running)  # else nobody can draft
        regime = regimes.regime(demand) if keeping else None
        drafted = engine.counters.draft_forwards
        for out in engine.step():
            got[out.req_id] += out.token_ids
        if regime is not None:
            ran.append((regime, engine.counters.draft_forwards > drafted))
    assert [got[i] for i in ids] == [w["token_ids"] for w in want]
    assert (PLAIN, True) not in ran  # a plain window drafts nothing
    assert (GATE, True) in ran and (PLAIN, False) in ran
    assert regimes.plain_steps == sum(r == PLAIN for r, _ in ran)
    assert all(load.mean for load in regimes.loads.values() if sum(load.windows.values()))
    seen = {b: dict(load.windows) for b, load in regimes.loads.items()}
    plain = regimes.plain_steps
    sampled = SamplingParams(temperature=0.8, max_tokens=48, seed=3)
    engine.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=8,
                                                  ignore_eos=True))
    engine.add_request(prompts[1], sampled)  # it outlasts the greedy one
    while engine.has_unfinished():
        engine.step()
    assert regimes.plain_steps == plain
    assert {b: dict(load.windows) for b, load in regimes.loads.items()} == seen


def test_where_whole_blocks_won_every_request_drafts_and_verifies_its_whole_block(
        structured_pairs, tmp_path):
    """At a load where the regimes found FULL the best, every greedy `prefix` request drafts
    in each FULL step and verifies its whole block (up to the tokens it has left), as
    `fixed` would, and the text is still the target's."""
    pair = structured_pairs("qwen3", "vanilla")
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = [list(range(i, i + 5)) for i in range(4)]
    want = make_engine(pair, tmp_path, policy="ar").generate(prompts, params)
    engine = make_engine(pair, tmp_path, policy="prefix")
    # each verified token dear: Alg. 1 (and the gate) would cut blocks and keep rows out
    engine.sps = engine.step_cost = SPSTable([1, 4, 8, 512], [100.0, 50.0, 1.0, 0.5])
    regimes = engine.planner.regimes = Regimes(window=2, settle=0)
    for regime, speed in [(GATE, 1.0), (PLAIN, 1.0), (FULL, 10.0)]:
        assert regimes.regime(4) == regime
        for _ in range(regimes.window):  # a window of each at 4 requests
            regimes.observe(4, regime, 4, 4 / speed)
    assert regimes.regime(4) == FULL
    steps, choose = [], engine.planner.verify_lengths

    def verify_lengths(plan, proposal):
        choose(plan, proposal)
        steps.append((plan.regime, len(plan.decode), plan.drafting, plan.lengths,
                      [r.remaining for r in plan.decode]))

    engine.planner.verify_lengths = verify_lengths
    got = engine.generate(prompts, params)
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
    full = [s for s in steps if s[0] == FULL]
    assert full
    for _, rows, drafting, lengths, remaining in full:
        assert drafting == list(range(rows))
        assert lengths == [min(engine.gamma, left - 1) for left in remaining]


def test_the_planner_forecasts_whole_blocks_against_plain_decoding_on_its_tables(
        structured_pairs, tmp_path):
    """The engine's regimes ask the planner for a new load's forecast: on the tables of its
    last plan, a step of whole blocks against a plain one. Here a forward costs 10 ms
    whatever its tokens and a draft pass 20 ms more, so a drafting row committing y tokens
    gives y / 3 times plain decoding's tokens per second."""
    pair = structured_pairs("qwen3", "vanilla")
    engine = make_engine(pair, tmp_path, policy="prefix")
    planner, gate = engine.planner, engine.gate
    assert engine.planner.regimes.forecast == planner.drafting_outlook
    assert planner.drafting_outlook(4, 6.0) is None  # no plan yet: no tables
    engine.sps = engine.step_cost = SPSTable([1, 512], [100.0, 100.0])
    gate.draft_cost = SPSTable([1, 512], [50.0, 50.0])
    gate.overhead.plain = gate.overhead.drafting = None
    engine.add_request([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=2))
    engine.step()
    assert planner.drafting_outlook(4, 6.0) == pytest.approx(2.0)
    assert planner.drafting_outlook(4, 1.5) == pytest.approx(0.5)
    gate.draft_cost = SPSTable([1, 512], [100 / 7, 100 / 7])  # a 70 ms draft pass
    assert planner.drafting_outlook(4, 6.0) == pytest.approx(0.75)
