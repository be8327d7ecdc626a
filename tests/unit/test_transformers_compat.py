"""Checkpoints of either transformers line load and serve with the installed one (4.x or 5.x).

What differs between the lines: 5.x saves a fast tokenizer as `tokenizer_class:
TokenizersBackend` (a class 4.x lacks), and RoPE settings as one `rope_parameters` dict where
4.x writes `rope_theta` / `rope_scaling` (4.x would silently run its default theta). Files in
the other line's form are written here by hand, so each line is tested on both forms.
"""

import json
import shutil

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from worker.engine.config import EngineConfig, SamplingParams
from worker.engine.draft_config import DraftConfig
from worker.engine.drafter import DSparkDraft
from worker.engine.engine import LLMEngine
from worker.engine.model_runner import load_target, load_tokenizer
from worker.tiny import EOS_TOKEN, MASK_TOKEN, MULTIBYTE_SAMPLE, build_demo_pair, build_target

CPU = torch.device("cpu")
PROMPT = "def main(args):\n"


def _hf_greedy(target_dir, max_new_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    ids = load_tokenizer(str(target_dir))(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def _engine_greedy(target_dir, draft_dir, max_tokens: int, **config) -> dict:
    engine = LLMEngine.from_pretrained(str(target_dir), draft_dir and str(draft_dir),
                                       EngineConfig(profile_sps=False, dtype="float32", **config))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return engine.generate([PROMPT], params)[0]


def test_a_pair_saved_by_the_installed_transformers_loads_and_generates(tmp_path):
    """What CI installs (the newest 5.x) writes the files; the engine serves them, plain and
    speculative, with the target's own greedy output."""
    target_dir, draft_dir = build_demo_pair(tmp_path, family="llama")
    saved = json.loads((target_dir / "config.json").read_text())
    assert saved["transformers_version"] == transformers.__version__
    expected = _hf_greedy(target_dir, 24)
    for draft, policy in ((None, "ar"), (draft_dir, "fixed"), (draft_dir, "threshold")):
        out = _engine_greedy(target_dir, draft, 24, policy=policy)
        assert out["token_ids"] == expected, policy
        assert out["text"] == load_tokenizer(str(target_dir)).decode(expected)


def _as_transformers_5_tokenizer(src, dst) -> None:
    """The tokenizer files in `src` rewritten as transformers 5 saves them."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("added_tokens_decoder",
                                                             "extra_special_tokens")}
    config.update(tokenizer_class="TokenizersBackend", backend="tokenizers")
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (dst / "special_tokens_map.json").unlink(missing_ok=True)


def test_a_tokenizers_backend_tokenizer_config_loads(tmp_path, tiny_tokenizer_dir):
    _as_transformers_5_tokenizer(tiny_tokenizer_dir, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] \
        == "TokenizersBackend"
    tokenizer = load_tokenizer(str(tmp_path))
    reference = load_tokenizer(str(tiny_tokenizer_dir))
    assert len(tokenizer) == len(reference) == 512
    assert tokenizer.eos_token == tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.mask_token == MASK_TOKEN
    assert (tokenizer.eos_token_id, tokenizer.mask_token_id) == (reference.eos_token_id,
                                                                 reference.mask_token_id)
    for text in (MULTIBYTE_SAMPLE, "def f(x):\n    return x ** 2  # ½ ≠ ∞ 🚀"):
        assert tokenizer.encode(text) == reference.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_a_target_with_a_tokenizers_backend_tokenizer_serves(tmp_path, qwen3_target_dir):
    target = tmp_path / "target"
    shutil.copytree(qwen3_target_dir, target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (target / name).unlink(missing_ok=True)
    _as_transformers_5_tokenizer(qwen3_target_dir, target)
    assert _engine_greedy(target, None, 16, policy="ar") == \
        _engine_greedy(qwen3_target_dir, None, 16, policy="ar")


def _write_rope_parameters(target_dir, rope_parameters: dict) -> None:
    """The target's config.json with its RoPE settings as transformers 5 writes them."""
    path = target_dir / "config.json"
    config = json.loads(path.read_text())
    for key in ("rope_theta", "rope_scaling"):
        config.pop(key, None)
    config["rope_parameters"] = rope_parameters
    path.write_text(json.dumps(config, indent=2))


@pytest.mark.parametrize("rope_parameters, factor", [
    ({"rope_type": "default", "rope_theta": 5000.0}, 1.0),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}, 2.0),
])
def test_a_target_config_with_rope_parameters_keeps_its_rope(tmp_path, qwen3_target_dir,
                                                            rope_parameters, factor):
    target = tmp_path / "target"
    shutil.copytree(qwen3_target_dir, target)
    _write_rope_parameters(target, rope_parameters)
    model = load_target(str(target), device=CPU, dtype=torch.float32)
    head_dim = model.config.head_dim
    wanted = 1.0 / (5000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)) / factor
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, wanted)


def test_a_draft_config_with_rope_parameters_keeps_theta_and_scaling(tmp_path, qwen3_target_dir):
    """A draft written by transformers 5 (its target's `rope_parameters` copied) rotates as the
    target does."""
    target = tmp_path / "target"
    shutil.copytree(qwen3_target_dir, target)
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    _write_rope_parameters(target, rope)
    model = load_target(str(target), device=CPU, dtype=torch.float32)
    _, draft_dir = build_demo_pair(tmp_path / "pair")
    draft_config = json.loads((draft_dir / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling"):
        draft_config.pop(key, None)
    draft_config["rope_parameters"] = rope
    (draft_dir / "config.json").write_text(json.dumps(draft_config))
    parsed = DraftConfig.from_json_dict(draft_config)
    assert parsed.rope_theta == 5000.0
    assert dict(parsed.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
    draft = DSparkDraft.from_pretrained(draft_dir, model.config, device=CPU, dtype=torch.float32)
    torch.testing.assert_close(draft.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


def test_the_loading_progress_bar_stays_off_for_a_local_directory(capfd, qwen3_target_dir):
    """transformers 5 draws a bar over loading weights; the CLI's and the worker's stderr do
    not carry it, and the setting is the same afterwards."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    capfd.readouterr()
    load_target(str(qwen3_target_dir), device=CPU, dtype=torch.float32)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled() == before


def test_build_target_writes_a_generation_config_with_the_tokenizers_ids(tmp_path,
                                                                          tiny_tokenizer_dir):
    tokenizer = load_tokenizer(str(tiny_tokenizer_dir))
    target = build_target(tmp_path, "qwen3", tokenizer)
    generation = json.loads((target / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    assert generation["pad_token_id"] == tokenizer.pad_token_id
