"""The tiny local stand-ins load with the stock Auto* classes and behave like real models."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.tiny import (
    EOS_TOKEN,
    MASK_TOKEN,
    MULTIBYTE_SAMPLE,
    build_demo_pair,
    build_target,
    build_tokenizer,
)

TARGET_FIXTURES = ["qwen3_target_dir", "llama_target_dir"]


def test_tokenizer_round_trips_multibyte_text(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    for text in [MULTIBYTE_SAMPLE, "def f(x):\n    return x ** 2  # ½ ≠ ∞ 🚀",
                 "  leading and trailing spaces  "]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_has_the_special_tokens(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.mask_token == MASK_TOKEN
    assert tokenizer.eos_token_id != tokenizer.mask_token_id
    assert tokenizer.encode(f"a{MASK_TOKEN}b").count(tokenizer.mask_token_id) == 1


def test_tokenizer_training_is_deterministic(tmp_path):
    first = build_tokenizer(tmp_path / "a")
    second = build_tokenizer(tmp_path / "b")
    assert first.get_vocab() == second.get_vocab()
    assert ((tmp_path / "a" / "tokenizer.json").read_bytes()
            == (tmp_path / "b" / "tokenizer.json").read_bytes())


@pytest.mark.parametrize("target_fixture", TARGET_FIXTURES)
def test_target_loads_with_the_tokenizer_beside_it(target_fixture, request):
    target_dir = request.getfixturevalue(target_fixture)
    model = AutoModelForCausalLM.from_pretrained(target_dir)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.eos_token_id == model.generation_config.eos_token_id
            == tokenizer.eos_token_id)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert not model.config.tie_word_embeddings
    assert model.dtype == torch.float32


@pytest.mark.parametrize("target_fixture", TARGET_FIXTURES)
def test_target_greedy_output_is_not_one_repeated_token(target_fixture, request):
    target_dir = request.getfixturevalue(target_fixture)
    model = AutoModelForCausalLM.from_pretrained(target_dir)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    inputs = tokenizer("def main(args):\n", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    new_ids = output[0, inputs.input_ids.shape[1]:].tolist()
    assert len(set(new_ids)) >= 10, new_ids


def test_target_build_is_deterministic_per_seed(tmp_path, tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    weights = {
        name: load_file(build_target(tmp_path / name, "qwen3", tokenizer, seed=seed)
                        / "model.safetensors")
        for name, seed in [("a", 0), ("b", 0), ("c", 1)]
    }
    assert weights["a"].keys() == weights["b"].keys()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not torch.equal(weights["a"]["model.embed_tokens.weight"],
                           weights["c"]["model.embed_tokens.weight"])


def test_target_build_leaves_the_callers_rng_alone(tmp_path, tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_target(tmp_path, "llama", tokenizer, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_demo_pair_draft_uses_the_tokenizers_mask_token(tmp_path):
    target_dir, draft_dir = build_demo_pair(tmp_path, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    AutoModelForCausalLM.from_pretrained(target_dir)
    draft_config = json.loads((draft_dir / "config.json").read_text())
    assert draft_config["mask_token_id"] == tokenizer.mask_token_id


def test_a_drafter_shares_the_targets_embedding_and_head_only_when_equal(tmp_path):
    from worker.engine.drafter import DSparkDraft
    from worker.engine.loader import share_frozen_copies

    target_dir, draft_dir = build_demo_pair(tmp_path, seed=0)  # the draft copies both
    target = AutoModelForCausalLM.from_pretrained(target_dir)
    draft = DSparkDraft.from_pretrained(draft_dir, target.config, dtype=torch.float32)
    draft.lm_head.weight = torch.nn.Parameter(draft.lm_head.weight + 1e-3, requires_grad=False)
    assert share_frozen_copies(draft, target) == ["embed_tokens"]  # an lm_head of its own stays
    assert draft.embed_tokens.weight is target.get_input_embeddings().weight
    assert draft.lm_head.weight is not target.get_output_embeddings().weight


def test_target_takes_a_real_models_head_size_and_output_layer(tmp_path, tiny_tokenizer_dir):
    """Random targets of real shapes (bench/engine.py --random-size): the head size and the
    output layer need not follow the width and the tokenizer; ids past the tokenizer decode
    to nothing rather than failing."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    out = build_target(tmp_path / "t", "qwen3", tok, hidden_size=32, num_heads=2,
                       num_kv_heads=1, head_dim=24, vocab_size=len(tok) + 300)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.head_dim == 24
    assert model.get_output_embeddings().weight.shape[0] == len(tok) + 300
    assert model.model.layers[0].self_attn.q_proj.out_features == 2 * 24
    assert tok.backend_tokenizer.decode([len(tok) + 5]) == ""
