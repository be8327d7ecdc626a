"""The first half of the model-pair pipeline: corpus, tokenizer, target training, `build_pair`.

Everything runs at tiny sizes on a capped standard-library corpus, so the file takes well
under a minute on two CPU cores.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.engine.config import EngineConfig, SamplingParams
from worker.engine.engine import LLMEngine
from worker.training import build_pair
from worker.training.corpus import is_heldout, load_corpus
from worker.training.target import SUMMARY_NAME, TrainConfig, target_config, train_target
from worker.training.tokenizer import EOS_TOKEN, MASK_TOKEN, train_tokenizer

TINY_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=16, intermediate_size=64)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.fixture(scope="module")
def small_corpus(corpus):
    return corpus.capped(150_000, 20_000)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, small_corpus):
    return train_tokenizer(small_corpus, tmp_path_factory.mktemp("tokenizer"), vocab_size=400)


def _train(corpus, tokenizer, root, **train_overrides):
    model_config = target_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id,
                                 **TINY_MODEL)
    settings = dict(target_tokens=40 * 8 * 32, seq_len=32, batch_size=8, eval_tokens=2048,
                    eval_every=0, log_every=10)
    train = TrainConfig(**{**settings, **train_overrides})
    return train_target(corpus, tokenizer, root / "target", root / "work",
                        model_config=model_config, train=train)


def test_corpus_split_is_deterministic_disjoint_and_about_five_percent(corpus):
    again = load_corpus()
    modules = lambda docs: [d.module for d in docs]  # noqa: E731
    assert (modules(again.train) == modules(corpus.train)
            and modules(again.heldout) == modules(corpus.heldout))
    assert not set(modules(corpus.train)) & set(modules(corpus.heldout))
    assert (all(is_heldout(m) for m in modules(corpus.heldout))
            and not any(map(is_heldout, modules(corpus.train))))
    assert modules(corpus.train) == sorted(modules(corpus.train))
    assert 0.02 < len(corpus.heldout) / (len(corpus.train) + len(corpus.heldout)) < 0.10
    summary = corpus.summary()
    assert summary["train"]["files"] == len(corpus.train) and summary["train"]["bytes"] > 1_000_000


def test_corpus_excludes_test_packages_and_counts_undecodable_files(corpus, tmp_path):
    names = lambda c: {d.module for d in c.train + c.heldout}  # noqa: E731
    for module in names(corpus):
        parts = module.split(".")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), module
    assert {"json", "json.decoder", "asyncio.events"} <= names(corpus)

    heldout_name = next(f"m{i}" for i in range(1000) if is_heldout(f"m{i}"))
    files = {f"{heldout_name}.py": "x = 1\n", "pkg/__init__.py": "y = 2\n", "pkg/mod.py": "z = 3\n",
             "pkg/tests/test_mod.py": "t = 1\n", "test/test_x.py": "t = 2\n",
             "idle_test/a.py": "t = 3\n", "site-packages/lib.py": "t = 4\n",
             "_sysconfigdata__linux.py": "t = 5\n", "empty.py": "\n"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "latin.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    fake = load_corpus(tmp_path)
    assert names(fake) == {heldout_name, "pkg", "pkg.mod"}
    assert [d.module for d in fake.heldout] == [heldout_name]
    assert fake.num_undecodable == 1 and fake.undecodable == ["latin"]


def test_tokenizer_fits_vocab_has_special_tokens_and_round_trips_heldout_source(
        tokenizer, corpus, tmp_path):
    assert len(tokenizer) <= 400
    assert (tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == EOS_TOKEN
            and tokenizer.mask_token == MASK_TOKEN)
    assert tokenizer.convert_tokens_to_ids([EOS_TOKEN, MASK_TOKEN]) == [0, 1]
    texts = [d.text for d in corpus.heldout[:8]] + ["Zürich — 你好 🚀\r\n\tx  =  1  "]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(texts[0])["input_ids"] == tokenizer(texts[0])["input_ids"]
    assert reloaded.model_input_names == ["input_ids", "attention_mask"]


def test_tiny_training_lowers_heldout_loss_and_saves_a_loadable_model(small_corpus, tokenizer,
                                                                      tmp_path):
    summary = _train(small_corpus, tokenizer, tmp_path, target_tokens=120 * 8 * 32)
    assert summary["finished"] and summary["steps"] == 120
    assert summary["final_heldout_loss"] < summary["initial_heldout_loss"] - 0.5
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "target")
    assert model.config.num_hidden_layers == 2 and not model.config.tie_word_embeddings
    assert json.loads((tmp_path / "target" / SUMMARY_NAME).read_text())["steps"] == 120
    records = [json.loads(line)
               for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert {"step", "tokens", "loss", "lr", "tokens_per_s", "elapsed_s"} <= set(records[1])


def test_resume_from_mid_run_checkpoint_gives_the_same_weights_as_an_uninterrupted_run(
        small_corpus, tokenizer, tmp_path):
    _train(small_corpus, tokenizer, tmp_path / "straight")
    paused = _train(small_corpus, tokenizer, tmp_path / "resumed", stop_after_steps=17)
    assert not paused["finished"] and paused["steps"] == 17
    assert not (tmp_path / "resumed" / "target").exists()
    resumed = _train(small_corpus, tokenizer, tmp_path / "resumed")
    assert resumed["finished"] and resumed["steps"] == 40
    straight = load_file(tmp_path / "straight" / "target" / "model.safetensors")
    again = load_file(tmp_path / "resumed" / "target" / "model.safetensors")
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    with pytest.raises(ValueError, match="lr"):
        _train(small_corpus, tokenizer, tmp_path / "resumed", lr=2e-3)


def test_smoke_pipeline_builds_a_pair_that_transformers_loads_and_the_engine_serves(tmp_path,
                                                                                    capsys):
    out = tmp_path / "pair"
    assert build_pair.main(["--out", str(out), "--smoke"]) == 0
    for path in ("corpus.json", "tokenizer/tokenizer.json", "target/config.json",
                 "target/model.safetensors", "target/tokenizer.json", f"target/{SUMMARY_NAME}",
                 "target_train/log.jsonl", "dspark/config.json", "dspark/model.safetensors",
                 "dspark/sts.json", "dflash/config.json", "dflash/model.safetensors",
                 "package/pair.json", "package/target/tokenizer.json",
                 "package/dflash/model.safetensors", "package/dspark/draft_vocab.json",
                 "package/dflash/draft_vocab.json"):
        assert (out / path).exists(), path
    model = AutoModelForCausalLM.from_pretrained(out / "target")
    assert model.config.model_type == "qwen3"
    engine = LLMEngine.from_pretrained(str(out / "target"), None,
                                       EngineConfig(policy="ar", profile_sps=False))
    result = engine.generate(["def main():\n"],
                             SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    assert len(result["token_ids"]) == 16 and result["text"]
    spec = LLMEngine.from_pretrained(str(out / "target"), str(out / "dspark"),
                                     EngineConfig(policy="fixed", profile_sps=False))
    assert spec.sts is not None  # the STS stage's temperatures are picked up
    packaged = LLMEngine.from_pretrained(str(out / "package" / "target"),
                                         str(out / "package" / "dspark"),
                                         EngineConfig(policy="fixed", profile_sps=False))
    assert packaged.sts == spec.sts  # float16 copies of all three models, STS included
    assert len(packaged.generate(["def main():\n"],
                                 SamplingParams(max_tokens=8))[0]["token_ids"]) >= 1
    reduced = LLMEngine.from_pretrained(  # the shipped ranking serves a reduced draft vocabulary
        str(out / "package" / "target"), str(out / "package" / "dspark"),
        EngineConfig(policy="fixed", profile_sps=False, draft_vocab_size=64))
    assert reduced.draft_vocab.token_ids.numel() == 64
    assert spec.generate(["def main():\n"], SamplingParams(
        temperature=0, max_tokens=16, ignore_eos=True))[0]["token_ids"] == result["token_ids"]

    assert build_pair.main(["--out", str(out), "--smoke"]) == 0  # rerun: everything is complete
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert ([e["stage"] for e in events if e["event"] == "skipped"]
            == [s.name for s in build_pair.STAGES])
    assert build_pair.main(["--out", str(out)]) == 2  # a smoke directory refuses a full build
    assert build_pair.main(["--out", str(out), "--smoke", "--stages", "corpus,nope"]) == 2
    assert "unknown stages ['nope']" in capsys.readouterr().err
