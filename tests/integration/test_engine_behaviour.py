"""Engine behaviour on real (small) weights: one forward each per step, the KV budget,
admission, cancellation, stop conditions, streaming text, and bad input."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_engines import count_calls, make_engine  # noqa: E402  (beside this file)

from sparkgrid.costs import SPSTable
from worker.engine.config import EngineConfig, SamplingParams
from worker.engine.draft_vocab import DraftVocab
from worker.engine.engine import LLMEngine
from worker.engine.kv_cache import CacheBudgetError

pytestmark = pytest.mark.integration


def test_each_decode_step_runs_at_most_one_draft_and_one_target_forward(structured_pairs, tmp_path):
    engine = make_engine(structured_pairs("qwen3", "vanilla"), tmp_path)
    target_calls = count_calls(engine.runner, "forward")
    draft_calls = count_calls(engine.draft, "backbone")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for i in range(8):
        engine.add_request(list(range(i, i + 3 + 2 * i)), params)
    engine.step()  # admission: one batched prefill for all eight
    assert (target_calls[0], draft_calls[0]) == (1, 0)
    assert engine.counters.prefill_forwards == 1
    while engine.has_unfinished():
        before_t, before_d = target_calls[0], draft_calls[0]
        running = len(engine.running)
        outputs = engine.step()
        assert len(outputs) == running  # every running request moved in this one step
        # one target forward; one draft pass, unless the gate judged drafting not to pay
        assert target_calls[0] - before_t == 1 and draft_calls[0] - before_d in (0, 1)
    c = engine.counters
    assert c.verify_forwards == c.draft_forwards + engine.gate.skipped_steps == c.steps - 1
    assert c.draft_forwards >= 1
    assert c.generated_tokens == 8 * 12


def test_cache_returns_to_empty_after_1000_requests(structured_pairs, tmp_path):
    engine = make_engine(structured_pairs("qwen3", "gated"), tmp_path, max_num_seqs=128,
                         kv_budget_tokens=4096, draft_kv_budget_tokens=4096)
    rng = random.Random(0)
    aborted = 0
    submitted = 0
    while submitted < 1000 or engine.has_unfinished():
        while submitted < 1000 and len(engine.waiting) < 96:
            prompt = [rng.randrange(30) for _ in range(rng.randint(1, 30))]
            params = SamplingParams(temperature=rng.choice([0, 1.0]), seed=submitted,
                                    max_tokens=rng.randint(1, 6),
                                    stop=("t7",) if rng.random() < 0.2 else (),
                                    ignore_eos=rng.random() < 0.5)
            engine.add_request(prompt, params, req_id=f"r{submitted}",
                               policy=rng.choice(["ar", "fixed", "threshold", "prefix"]))
            submitted += 1
        engine.step()
        if engine.running and rng.random() < 0.1:  # cancel a running request mid-flight
            assert engine.abort(engine.running[0].req_id).finish_reason == "abort"
            aborted += 1
        if engine.waiting and rng.random() < 0.05:  # and one still queued
            engine.abort(engine.waiting[-1].req_id)
            aborted += 1
        assert engine.kv.allocator.num_reserved_blocks <= engine.kv.allocator.num_blocks
    assert aborted > 0
    for kv in (engine.kv, engine.draft_kv):
        assert kv.allocator.num_used_blocks == 0
        assert kv.allocator.num_reserved_blocks == 0
        assert kv.allocator.num_sequences == 0
    assert not engine.requests


def test_requests_wait_for_budget_and_too_large_ones_are_refused(structured_pairs, tmp_path):
    engine = make_engine(structured_pairs("qwen3", "vanilla"), tmp_path,
                         kv_budget_tokens=64, draft_kv_budget_tokens=64, kv_block_size=16)
    with pytest.raises(CacheBudgetError, match="can never fit"):
        engine.add_request(list(range(20)), SamplingParams(max_tokens=50))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for i in range(5):  # each reserves 2 blocks of 16: only two fit at once
        engine.add_request(list(range(i, i + 12)), params)
    peak = 0
    finished = 0
    while engine.has_unfinished():
        finished += sum(o.finished for o in engine.step())
        peak = max(peak, len(engine.running))
    assert peak == 2 and finished == 5


def test_stream_is_detokenized_incrementally_and_stops_on_stop_string(tmp_path,
                                                                      qwen3_target_dir):
    engine = LLMEngine.from_pretrained(str(qwen3_target_dir), None,
                                       EngineConfig(policy="ar", profile_sps=False))
    tok = engine.tokenizer
    full = engine.generate(["def main():\n"], SamplingParams(temperature=1.0, seed=3,
                                                             max_tokens=40, ignore_eos=True))[0]
    assert full["text"] == tok.decode(full["token_ids"], skip_special_tokens=True)
    assert len(full["text"]) > 0
    stop = full["text"][10:13]
    assert stop and stop in full["text"]
    cut = engine.generate(["def main():\n"], SamplingParams(temperature=1.0, seed=3,
                                                            max_tokens=40, stop=(stop,),
                                                            ignore_eos=True))[0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full["text"][:full["text"].index(stop)]
    assert stop not in cut["text"]


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(stop=("",)), "stop"), (dict(seed=-5), "seed"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**kwargs)


def test_bad_requests_name_the_field(structured_pairs, tmp_path):
    engine = make_engine(structured_pairs("qwen3", "vanilla"), tmp_path)
    ok = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="^prompt:"):
        engine.add_request([], ok)
    with pytest.raises(ValueError, match="^prompt:.*vocabulary"):
        engine.add_request([1, 999], ok)
    with pytest.raises(ValueError, match="policy"):
        engine.add_request([1, 2], ok, policy="turbo")
    with pytest.raises(ValueError, match="^max_tokens:.*context"):
        engine.add_request([1, 2], SamplingParams(max_tokens=10_000))
    engine.add_request([1, 2], ok, req_id="same")
    with pytest.raises(ValueError, match="^req_id:"):
        engine.add_request([1, 2], ok, req_id="same")
    with pytest.raises(ValueError, match="^device:"):
        EngineConfig(device="gpu0")


def test_per_request_seed_makes_sampling_repeatable_across_batches(structured_pairs, tmp_path):
    engine = make_engine(structured_pairs("qwen3", "vanilla", bend=0.4, sharpness=0.5),
                         tmp_path)
    params = SamplingParams(temperature=1.0, seed=42, max_tokens=16, ignore_eos=True)
    alone = engine.generate([[3, 4, 5]], params, policy="ar")[0]["token_ids"]
    crowd = engine.generate([[3, 4, 5]] + [[i] for i in range(6)],
                            [params] + [SamplingParams(temperature=1.0, seed=i, max_tokens=9)
                                        for i in range(6)], policy="ar")[0]["token_ids"]
    assert alone == crowd


def test_engine_serves_in_bfloat16_on_the_chosen_device(tmp_path, request):
    """The production dtype: the same code, only `device` and `dtype` change."""
    from worker.tiny import build_demo_pair

    device = request.config.getoption("--device")
    target_dir, draft_dir = build_demo_pair(tmp_path / "pair")
    engine = LLMEngine.from_pretrained(str(target_dir), str(draft_dir), EngineConfig(
        device=device, dtype="bfloat16", sps_cache_dir=str(tmp_path), sps_context_len=32,
        max_batch_tokens=64))
    results = engine.generate(["import os\n", "def f(x):"],
                              SamplingParams(temperature=0.8, seed=1, max_tokens=12))
    assert all(r["finish_reason"] in ("stop", "length") for r in results)
    assert all(len(r["token_ids"]) >= 1 for r in results)
    assert engine.kv.allocator.num_used_blocks == 0


def test_the_one_pass_query_key_norms_give_the_separate_ops_logits(tmp_path, monkeypatch):
    """In bfloat16 on the native ops, Qwen3's query and key norms and RoPE run as one pass
    (`qk_norm_rotary_bf16`); the same engine taking the separate ops gives the same logits,
    bit for bit, at every step."""
    from worker.tiny import build_demo_pair

    target_dir, draft_dir = build_demo_pair(tmp_path / "pair")
    engine = LLMEngine.from_pretrained(str(target_dir), str(draft_dir), EngineConfig(
        dtype="bfloat16", sps_cache_dir=str(tmp_path), sps_context_len=32, max_batch_tokens=64))
    runner = engine.runner
    if runner.qk_norm_eps is None or not runner._native_ops(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("no native bfloat16 ops here, or the target has no query/key norms")
    logits, forward = [], runner.forward

    def recording(batch, want_features):
        out = forward(batch, want_features)
        logits.append(out[0].clone())
        return out
    monkeypatch.setattr(runner, "forward", recording)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [[3, 4, 5, 6], [7, 8], list(range(10, 40))]
    fused_tokens = engine.generate(prompts, params, policy="ar")
    fused, logits = logits, []
    runner.qk_norm_eps = None
    separate_tokens = engine.generate(prompts, params, policy="ar")
    assert len(fused) == len(logits) >= 24
    assert all(torch.equal(a, b) for a, b in zip(fused, logits))
    assert ([r["token_ids"] for r in fused_tokens]
            == [r["token_ids"] for r in separate_tokens])


def test_the_draft_gate_skips_costly_drafting_and_stays_lossless(structured_pairs, tmp_path):
    """Prefix steps draft, then stop while every draft pass is taken to cost a minute (their
    draft context is deferred meanwhile), then draft again from that context once the cost
    is back; the greedy output is the target's own throughout."""
    pair = structured_pairs("qwen3", "vanilla")
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [list(range(i, i + 5)) for i in range(4)]
    want = make_engine(pair, tmp_path, policy="ar").generate(prompts, params)
    engine = make_engine(pair, tmp_path, policy="prefix")
    gate = engine.gate
    assert gate.draft_cost is not None  # profiled at start, beside SPS(B)
    profiled = (gate.draft_cost, gate.overhead.drafting)
    engine.sps = engine.step_cost = SPSTable([1, 512], [100.0, 100.0])  # drafting pays
    ids = [engine.add_request(p, params) for p in prompts]
    got = {i: [] for i in ids}
    minute = SPSTable([1], [1 / 60.0])
    phases = [(4, profiled), (6, (minute, minute if profiled[1] else None)), (None, profiled)]
    drafts = []
    for steps, (cost, overhead) in phases:
        gate.draft_cost, gate.overhead.drafting = cost, overhead
        before = engine.counters.draft_forwards
        while engine.has_unfinished() and steps != 0:
            for out in engine.step():
                got[out.req_id] += out.token_ids
            steps = None if steps is None else steps - 1
        drafts.append(engine.counters.draft_forwards - before)
    assert [got[i] for i in ids] == [w["token_ids"] for w in want]
    assert drafts[0] >= 1 and drafts[1] == 0 and drafts[2] >= 1, drafts
    assert gate.skipped_steps >= 6
    assert not engine.draft_runner._deferred  # finished requests leave nothing behind


def test_the_step_cost_by_sequences_is_profiled_with_sps_and_read_back(structured_pairs,
                                                                        tmp_path, monkeypatch):
    from worker.engine import profile_cache

    pair = structured_pairs("qwen3", "vanilla")
    engine = make_engine(pair, tmp_path, policy="prefix", max_num_seqs=8)
    table = engine.step_cost
    assert table.rows == [1, 2, 4, 8] and table.gamma == engine.gamma
    assert all(b >= a for a, b in zip(table.plain_seconds, table.plain_seconds[1:]))
    assert all(f >= p for f, p in zip(table.full_seconds, table.plain_seconds))
    assert len(list(tmp_path.glob("rows-*.json"))) == 1
    assert engine.kv.allocator.num_used_blocks == 0  # the profiling sequences are gone
    # read from the cache, not measured again (however much faster a spot check runs now)
    monkeypatch.setattr(profile_cache, "SLOWED", float("inf"))
    again = make_engine(pair, tmp_path, policy="prefix", max_num_seqs=8)
    assert again.step_cost == table


def test_greedy_drafting_requests_and_a_sampled_one_share_a_step(structured_pairs, tmp_path):
    """Greedy requests verify from ids alone; a sampled request in the same steps must still
    sample (not take the argmax), exactly as it does alone with its seed."""
    pair = structured_pairs("qwen3", "vanilla")
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    sampled = SamplingParams(temperature=2.0, seed=5, max_tokens=24, ignore_eos=True)
    prompts = [list(range(i, i + 6)) for i in range(3)]
    want_greedy = make_engine(pair, tmp_path, policy="ar").generate(prompts[:2], greedy)
    want_sampled = make_engine(pair, tmp_path, policy="ar").generate(prompts[2:], sampled)
    argmax = make_engine(pair, tmp_path, policy="ar").generate(prompts[2:], greedy)
    assert want_sampled[0]["token_ids"] != argmax[0]["token_ids"]  # sampling shows
    engine = make_engine(pair, tmp_path, policy="fixed")
    ids = [engine.add_request(p, greedy) for p in prompts[:2]]
    ids.append(engine.add_request(prompts[2], sampled, policy="ar"))
    got = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.req_id] += out.token_ids
    assert [got[i] for i in ids[:2]] == [w["token_ids"] for w in want_greedy]
    assert got[ids[2]] == want_sampled[0]["token_ids"]
    assert engine.counters.draft_tokens_accepted > 0


KEPT = 20  # of the structured pair's 32 tokens


def _ranking() -> list[int]:
    """A fixed permutation of the 32 ids, so the kept ones are not simply the lowest."""
    return torch.randperm(32, generator=torch.Generator().manual_seed(3)).tolist()


def test_a_full_size_draft_vocabulary_changes_nothing(structured_pairs):
    _, draft, _, _ = structured_pairs("qwen3", "gated")
    h = torch.randn(3, draft.gamma, draft.config.hidden_size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    anchors = torch.tensor([0, 5, 9])

    def sample_fn(k, logits):
        probs = torch.softmax(logits, dim=-1)
        return probs.argmax(dim=-1), probs

    want = draft.draft_block(h, anchors, sample_fn)
    got = draft.draft_block(h, anchors, sample_fn, DraftVocab.build(draft, _ranking(), 32))
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[1], want[1]) and torch.allclose(got[2], want[2])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_reduced_draft_vocabulary_proposes_only_kept_tokens_and_stays_lossless(
        structured_pairs, tmp_path, temperature):
    pair = structured_pairs("qwen3", "vanilla")
    target, draft, tok, _ = pair
    params = SamplingParams(temperature=temperature, seed=4, max_tokens=40, ignore_eos=True)
    prompts = [list(range(i, i + 5)) for i in range(4)]
    want = make_engine(pair, tmp_path, policy="ar").generate(prompts, params)
    engine = LLMEngine(EngineConfig(dtype="float64", policy="fixed", profile_sps=False,
                                    draft_vocab_size=KEPT), target, tok, draft,
                       draft_ranking=_ranking())
    proposed = []
    original = draft.draft_block

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        proposed.append(out)
        return out

    draft.draft_block = spy
    try:
        got = engine.generate(prompts, params)
    finally:
        del draft.draft_block  # the shared pair's drafter gets its method back
    kept = set(_ranking()[:KEPT])
    assert proposed and all(set(ids.flatten().tolist()) <= kept for ids, _, _ in proposed)
    if temperature == 0:
        assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
    else:  # q: a distribution over the kept tokens only, as sampled from
        for _, probs, _ in proposed:
            outside = torch.ones(32, dtype=torch.bool)
            outside[list(kept)] = False
            assert float(probs[..., outside].abs().max()) == 0.0
            assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:2], dtype=probs.dtype))
    assert 0 < engine.counters.draft_tokens_accepted < engine.counters.draft_tokens_verified


def test_a_reduced_draft_vocabulary_needs_the_drafts_ranking(structured_pairs):
    target, draft, tok, _ = structured_pairs("qwen3", "vanilla")
    with pytest.raises(ValueError, match="draft_vocab_size: .*ranking"):
        LLMEngine(EngineConfig(dtype="float64", policy="fixed", profile_sps=False,
                               draft_vocab_size=8), target, tok, draft)
    with pytest.raises(ValueError, match=r"draft_vocab_size: expected 0 .* \[1, 32\]"):
        LLMEngine(EngineConfig(dtype="float64", policy="fixed", profile_sps=False,
                               draft_vocab_size=33), target, tok, draft, draft_ranking=_ranking())
    with pytest.raises(ValueError, match="draft_vocab_size"):
        EngineConfig(draft_vocab_size=-1)
