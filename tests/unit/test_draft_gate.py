"""The engine's draft gate: when a `prefix` step drafts, from earlier blocks only."""

from types import SimpleNamespace

import torch

from worker.engine.prefix_scheduler import SPSTable
from worker.engine.spec_step import DraftGate, DraftProposal

FLAT = SPSTable([1], [1.0])  # one second per verify forward, whatever its size


def _reqs(*policies, remaining=100):
    return [SimpleNamespace(req_id=f"r{i}", policy=p, remaining=remaining)
            for i, p in enumerate(policies)]


def _proposal(conf_logits):
    conf = torch.tensor(conf_logits, dtype=torch.float32)
    return DraftProposal(ids=torch.zeros(conf.shape, dtype=torch.long), probs=None,
                         conf_logits=conf)


def test_a_request_without_an_estimate_drafts():
    gate = DraftGate(gamma=2, sts=None)
    reqs = _reqs("prefix", "prefix")
    assert gate.rows(reqs, [0, 1], FLAT, 512) == [0, 1]


def test_costly_drafting_of_unlikely_tokens_is_skipped_then_refreshed_less_often():
    gate = DraftGate(gamma=2, sts=None, refresh_steps=3, max_refresh_steps=6)
    reqs = _reqs("prefix")
    unlikely = _proposal([[-4.0, -4.0]])  # a ~ 0.018, and a draft pass takes 5 s
    drafted_at = []
    for step in range(20):
        rows = gate.rows(reqs, [0], FLAT, 512) if step else [0]
        if rows:
            drafted_at.append(step)
            gate.observe(reqs, rows, unlikely, seconds=5.0)
    # skips 3, then 6 (doubled, the cap), then 6 again, between refreshing drafts
    assert drafted_at == [0, 4, 11, 18]
    assert gate.skipped_steps == 20 - len(drafted_at)


def test_the_refresh_interval_resets_when_drafting_pays_again():
    gate = DraftGate(gamma=2, sts=None, refresh_steps=2, max_refresh_steps=16)
    reqs = _reqs("prefix")
    gate.observe(reqs, [0], _proposal([[-4.0, -4.0]]), seconds=5.0)
    for _ in range(2):
        assert gate.rows(reqs, [0], FLAT, 512) == []
    assert gate.rows(reqs, [0], FLAT, 512) == [0]  # refresh: the text got easy, drafts are cheap
    for _ in range(10):  # running means: the old estimate and draft time fade
        gate.observe(reqs, [0], _proposal([[6.0, 6.0]]), seconds=0.0)
    assert gate.rows(reqs, [0], FLAT, 512) == [0]
    assert gate._interval["r0"] == 2


def test_cheap_drafting_of_likely_tokens_goes_ahead():
    gate = DraftGate(gamma=2, sts=None)
    reqs = _reqs("prefix")
    gate.observe(reqs, [0], _proposal([[4.0, 4.0]]), seconds=0.01)
    assert gate.rows(reqs, [0], FLAT, 512) == [0]
    assert gate.skipped_steps == 0


def test_other_policies_are_never_gated():
    gate = DraftGate(gamma=2, sts=None)
    reqs = _reqs("prefix", "fixed")
    gate.observe(reqs, [0, 1], _proposal([[-4.0, -4.0], [-4.0, -4.0]]), seconds=5.0)
    assert gate.rows(reqs, [0, 1], FLAT, 512) == [0, 1]
    assert gate.rows(reqs, [0, 1], None, 512) == [0, 1]  # no cost model, no gate


def test_draft_time_is_kept_per_batch_size_and_smoothed():
    gate = DraftGate(gamma=2, sts=None, smoothing=0.5)
    one, three = _reqs("prefix"), _reqs("prefix", "prefix", "prefix")
    gate.observe(one, [0], _proposal([[-4.0, -4.0]]), seconds=5.0)
    # three rows (bucket 4) were never timed: they draft, whatever one row's estimate says
    gate.observe(three, [0, 1, 2], _proposal([[4.0, 4.0]] * 3), seconds=0.5)
    gate.observe(three, [0, 1, 2], _proposal([[4.0, 4.0]] * 3), seconds=1.5)
    assert gate._draft_seconds == {1: 5.0, 4: 1.0}


def test_a_finished_request_is_forgotten():
    gate = DraftGate(gamma=2, sts=None)
    reqs = _reqs("prefix")
    gate.observe(reqs, [0], _proposal([[-4.0, -4.0]]), seconds=5.0)
    gate.forget("r0")
    assert gate.rows(reqs, [0], FLAT, 512) == [0]
