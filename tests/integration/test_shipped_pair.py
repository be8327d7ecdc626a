"""The shipped pair (`worker/models/stdlib-pair/`): it is installed, its drafter loads against
its target, and speculation on it is lossless: greedy output equals the target's own
`transformers.generate` on held-out standard-library prefixes (float64 on both sides, so the
comparison is exact rather than tie-prone)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparkgrid.costs import SPSTable
from worker.engine.config import EngineConfig, SamplingParams
from worker.engine.engine import LLMEngine
from worker.engine.linear import float32_packing_invariant, packing_supported, widening_pays
from worker.models import PAIR_DIR, shipped_pair
from worker.training.corpus import load_corpus
from worker.training.draft_stages import corpus_prefixes

pytestmark = pytest.mark.integration
NUM_PROMPTS, MAX_TOKENS = 6, 40


@pytest.fixture(scope="module")
def pair():
    found = shipped_pair()
    assert found is not None, f"the shipped pair is missing from {PAIR_DIR}; build it with " \
                              "`python -m worker.training.build_pair --out DIR`"
    return found


@pytest.fixture(scope="module")
def heldout_prompts(pair):
    tokenizer = AutoTokenizer.from_pretrained(pair[0])
    return corpus_prefixes(load_corpus().heldout, tokenizer, NUM_PROMPTS, 64, seed=1234)


def test_the_package_holds_target_and_both_drafters_within_60_mb():
    meta = json.loads((PAIR_DIR / "pair.json").read_text())
    assert set(meta["bytes"]) == {"target", "dspark", "dflash"}
    on_disk = sum(f.stat().st_size for f in PAIR_DIR.rglob("*") if f.is_file())
    assert on_disk <= 60e6
    for drafter in ("dspark", "dflash"):
        assert shipped_pair(drafter) is not None
    assert (PAIR_DIR / "dspark" / "sts.json").is_file()


@pytest.mark.parametrize("drafter, policy",
                         [("dspark", "prefix"), ("dspark", "fixed"), ("dflash", "fixed")])
def test_greedy_output_equals_the_targets_own_generate(pair, heldout_prompts, drafter, policy):
    target_dir, draft_dir = shipped_pair(drafter)
    engine = LLMEngine.from_pretrained(str(target_dir), str(draft_dir),
                                       EngineConfig(dtype="float64", policy="fixed",
                                                    profile_sps=False))
    if policy == "prefix":
        # As on a GPU, where a verify forward costs the same up to hundreds of tokens: the
        # policy then verifies deep blocks, so the acceptance path runs (on this CPU's own
        # profile it would verify few tokens).
        engine.sps = SPSTable([1, 512], [100.0, 100.0])
    got = engine.generate(heldout_prompts,
                          SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                          policy=policy)
    target = AutoModelForCausalLM.from_pretrained(target_dir, torch_dtype=torch.float64)
    for prompt, result in zip(heldout_prompts, got):
        ids = torch.tensor([prompt])
        want = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                               min_new_tokens=MAX_TOKENS, do_sample=False,
                               pad_token_id=0)[0, len(prompt):]
        assert result["token_ids"] == want.tolist()
    accepted = sum(r["stats"]["tokens_accepted"] for r in got)
    assert accepted > 0  # the drafter really drafts for this target: the acceptance path ran
    # its frozen copies of the target's embedding and lm_head were shared, not kept twice
    assert engine.shared_with_target == ["embed_tokens", "lm_head"]
    assert engine.draft.lm_head.weight.data_ptr() == engine.runner.model.lm_head.weight.data_ptr()


def _row_invariant_bfloat16_linears() -> bool:
    """Whether this CPU's bfloat16 projections give a row the same bits whatever rows are
    beside it: packed for oneDNN (AVX512-BF16), or widened to float32 and packed (AVX2)."""
    cpu = torch.device("cpu")
    return packing_supported(cpu, torch.bfloat16) or (
        widening_pays(cpu, torch.bfloat16) and float32_packing_invariant())


@pytest.mark.skipif(not _row_invariant_bfloat16_linears(),
                    reason="this CPU's oneDNN gives no row-invariant bfloat16 projections")
def test_in_bfloat16_every_policy_reproduces_plain_decoding(pair, heldout_prompts):
    """The production dtype on the native kernel: a position's logits have the same bits
    however many rows were verified beside it (and, on AVX512-BF16, whether its prompt was
    prefilled or it was decoded), so greedy speculation reproduces the engine's own plain
    decoding exactly."""
    target_dir, draft_dir = shipped_pair("dspark")
    engine = LLMEngine.from_pretrained(str(target_dir), str(draft_dir),
                                       EngineConfig(dtype="bfloat16", policy="fixed",
                                                    profile_sps=False))
    assert engine.runner.backend == "native"
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    want = [r["token_ids"] for r in engine.generate(heldout_prompts, params, policy="ar")]
    engine.sps = SPSTable([1, 512], [100.0, 100.0])  # deep blocks: many rows a verify
    for policy in ("fixed", "prefix"):
        got = engine.generate(heldout_prompts, params, policy=policy)
        assert [r["token_ids"] for r in got] == want, policy
        assert sum(r["stats"]["tokens_accepted"] for r in got) > 0, policy


def test_in_bfloat16_the_drafter_reads_the_targets_own_copy_of_the_shared_lm_head(pair):
    """With the whole vocabulary the draft's base logits come from the lm_head it shares with
    the target; where the runner holds that weight packed for oneDNN (AVX512-BF16) or widened
    to float32 (AVX2), the draft pass uses the runner's copy rather than the plain bfloat16
    one (the slowest product of a draft pass on either CPU)."""
    target_dir, draft_dir = shipped_pair("dspark")
    engine = LLMEngine.from_pretrained(str(target_dir), str(draft_dir),
                                       EngineConfig(dtype="bfloat16", policy="fixed",
                                                    profile_sps=False))
    assert engine.draft_vocab is None and "lm_head" in engine.shared_with_target
    if engine.runner.linears == "plain":
        pytest.skip("this machine runs the projections as they are (no native kernel)")
    assert engine.draft.serving_lm_head is engine.runner.lm_head
    assert engine.packed_weight_bytes >= engine.runner.packed_bytes > 0
    h = torch.randn(5, engine.draft.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        mine = engine.draft.lm_head(h.bfloat16()).float()
        served = engine.draft.serving_lm_head(h.bfloat16()).float()
    assert torch.allclose(served, mine, rtol=1e-2, atol=1e-2)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    got = engine.generate([[5, 6, 7, 8]], params, policy="fixed")[0]
    assert len(got["token_ids"]) == 16  # a draft pass through the runner's copy ran
