"""Greedy losslessness: every policy reproduces `transformers.generate(do_sample=False)`
token for token, with requests of mixed lengths served together and joining mid-run."""

from __future__ import annotations

import copy
import zlib

import pytest
import torch

from worker.engine.config import EngineConfig, SamplingParams
from worker.engine.engine import LLMEngine

pytestmark = pytest.mark.integration

NUM_PROMPTS = 24
MAX_TOKENS = 24


def prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (NUM_PROMPTS,), generator=gen).tolist()
    return [torch.randint(0, 30, (n,), generator=gen).tolist() for n in lengths]


def reference(target, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def serve_staggered(engine: LLMEngine, prompt_list, params, policy) -> tuple[dict, list]:
    """Half the prompts start at once; the rest join one per step while others decode."""
    outputs = {}
    accept_lengths = []
    pending = list(enumerate(prompt_list))
    for i, p in pending[: len(pending) // 2]:
        engine.add_request(p, params, req_id=str(i), policy=policy)
    pending = pending[len(pending) // 2:]
    while engine.has_unfinished() or pending:
        if pending:
            i, p = pending.pop(0)
            engine.add_request(p, params, req_id=str(i), policy=policy)
        for out in engine.step():
            outputs.setdefault(out.req_id, []).extend(out.token_ids)
            if out.finished:
                accept_lengths += out.stats.accept_lengths
    return outputs, accept_lengths


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("head_type", ["vanilla", "gated", "rnn"])
def test_every_policy_matches_target_greedy_generate(structured_pairs, family, head_type,
                                                      request, tmp_path):
    device = request.config.getoption("--device", default="cpu")
    target, draft, tok, _ = structured_pairs(family, head_type)
    prompt_list = prompts(seed=zlib.crc32(f"{family}-{head_type}".encode()))
    expected = [reference(target, p, MAX_TOKENS) for p in prompt_list]  # on the CPU
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    if device != "cpu":  # the engine runs on the accelerator, the reference stays here
        target, draft = copy.deepcopy(target).to(device), copy.deepcopy(draft).to(device)
    def make_engine():
        return LLMEngine(EngineConfig(device=device, dtype="float64", max_num_seqs=16,
                                      max_batch_tokens=64, sps_cache_dir=str(tmp_path)),
                         target, tok, draft)
    engines = [make_engine()]
    for policy in ["ar", "fixed", "threshold", "prefix"]:
        if policy == "prefix":  # a fresh engine (profiles read back): its gate holds no
            # estimate from the other policies' requests, so each newcomer drafts its first
            # block whatever the timing (later blocks are the gate's choice)
            engines.append(make_engine())
        engine = engines[-1]
        got, accept_lengths = serve_staggered(engine, prompt_list, params, policy)
        for i, exp in enumerate(expected):
            assert got[str(i)] == exp, f"{policy}: prompt {i} diverged"
        if policy != "ar":  # the draft was really used, with partial acceptance
            assert max(accept_lengths) > 1, policy
        if policy == "fixed":
            assert min(accept_lengths) < draft.gamma + 1
    for engine in engines:
        assert engine.kv.allocator.num_used_blocks == 0
        assert engine.draft_kv.allocator.num_used_blocks == 0


def test_dflash_style_draft_without_markov_or_confidence_is_lossless(structured_pairs,
                                                                      tmp_path):
    target, draft, tok, _ = structured_pairs("qwen3", "vanilla", rank=0, confidence=False)
    prompt_list = prompts(seed=7)[:8]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    engine = LLMEngine(EngineConfig(dtype="float64", policy="fixed",
                                    sps_cache_dir=str(tmp_path)), target, tok, draft)
    got = engine.generate(prompt_list, params)
    for p, res in zip(prompt_list, got):
        assert res["token_ids"] == reference(target, p, MAX_TOKENS)
    with pytest.raises(ValueError, match="policy.*confidence head"):
        engine.add_request([1, 2], params, policy="prefix")


def test_torch_attention_path_matches_target_greedy_generate(structured_pairs, monkeypatch,
                                                             tmp_path):
    """The torch reference of paged attention (used where the native kernel cannot be built)
    is lossless too."""
    monkeypatch.setenv("SPARKGRID_ATTENTION", "torch")
    target, draft, tok, _ = structured_pairs("qwen3", "vanilla")
    prompt_list = prompts(seed=11)[:12]
    expected = [reference(target, p, MAX_TOKENS) for p in prompt_list]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    engine = LLMEngine(EngineConfig(dtype="float64", max_num_seqs=8, max_batch_tokens=64,
                                    sps_cache_dir=str(tmp_path)), target, tok, draft)
    assert engine.runner.backend == "torch"
    for policy in ["ar", "fixed", "prefix"]:
        got, _ = serve_staggered(engine, prompt_list, params, policy)
        for i, exp in enumerate(expected):
            assert got[str(i)] == exp, f"{policy}: prompt {i} diverged"
