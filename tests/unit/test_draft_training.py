"""Training the DSpark drafter: the training forward is the inference path, masking and loss
weights are as documented (docs/DSPARK.md 4), and a short run on a tiny target's own answers is
something the engine can measure, resume exactly, load and serve.

Exactness checks run in float64 on random drafts; the run uses the session's tiny Qwen3 target.
"""

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen3Config

from worker.engine.calibration import calibrate_sts
from worker.engine.config import EngineConfig, SamplingParams
from worker.engine.draft_checkpoint import random_dspark_checkpoint
from worker.engine.drafter import DSparkDraft
from worker.engine.engine import LLMEngine
from worker.tiny import corpus_text
from worker.training.draft_data import DraftBatch, DraftDataConfig, DraftDataset, build_draft_data
from worker.training.draft_forward import (
    LossWeights,
    dspark_loss,
    sample_anchors,
    teacher_forced_blocks,
    weighted_mean,
)
from worker.training.draft_train import DraftTrainConfig, dflash_variant, train_draft

V, D, L, H, KVH, HD, FFN = 128, 32, 4, 4, 2, 8, 64
LAYER_IDS = [0, 2]
HEADS = [  # (head_type, markov_rank, confidence_with_markov)
    ("vanilla", 16, True), ("gated", 16, True), ("rnn", 8, True), ("vanilla", 0, False)]


def target_config():
    return Qwen3Config(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                       num_key_value_heads=KVH, head_dim=HD, intermediate_size=FFN,
                       max_position_embeddings=256)


def tiny_draft(path, head_type="vanilla", rank=16, with_markov=True, gamma=5, num_layers=2):
    random_dspark_checkpoint(target_config(), path, num_layers=num_layers, head_type=head_type,
                             markov_rank=rank, confidence=True, confidence_with_markov=with_markov,
                             target_layer_ids=LAYER_IDS, gamma=gamma, mask_token_id=V - 1, seed=3)
    return DSparkDraft.from_pretrained(path, target_config(), dtype=torch.float64)


def random_batch(lengths, prompt_len, seed=0):
    """Random sequences; labels (loss mask) from `prompt_len` to each length."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    lengths = torch.tensor(lengths)
    inside = torch.arange(width)[None, :] < lengths[:, None]
    return DraftBatch(
        input_ids=torch.randint(0, V - 1, (len(lengths), width), generator=gen) * inside,
        loss_mask=inside & (torch.arange(width)[None, :] >= prompt_len),
        lengths=lengths,
        features=torch.randn(len(lengths), width, len(LAYER_IDS) * D, generator=gen,
                             dtype=torch.float64) * inside[..., None],
        target_hidden=torch.randn(len(lengths), width, D, generator=gen, dtype=torch.float64))


def greedy_inference(draft, features, anchor_id, anchor_pos):
    """The serving path for one block: context K/V, backbone, greedy draft_block.
    Returns draft ids [G], logits [G, V], confidence logits [G] or None."""
    ctx = draft.project_context(features[:anchor_pos])
    positions = torch.arange(anchor_pos)
    kv = [draft.context_kv(i, ctx, positions) for i in range(len(draft.layers))]
    h = draft.backbone(torch.tensor([anchor_id]), torch.tensor([anchor_pos]),
                       [k[None] for k, _ in kv], [v[None] for _, v in kv],
                       torch.ones(1, anchor_pos, dtype=torch.bool))
    seen = []

    def greedy(k, logits):
        seen.append(logits[0])
        ids = logits.argmax(-1)
        return ids, torch.nn.functional.one_hot(ids, V).to(logits.dtype)

    ids, _, conf = draft.draft_block(h, torch.tensor([anchor_id]), greedy)
    return ids[0], torch.stack(seen), None if conf is None else conf[0]


@pytest.mark.parametrize("head_type,rank,with_markov", HEADS)
@torch.no_grad()
def test_training_forward_equals_the_inference_path(tmp_path, head_type, rank, with_markov):
    draft = tiny_draft(tmp_path, head_type, rank, with_markov)
    gamma = draft.gamma
    batch = random_batch([32, 25], prompt_len=1)
    anchors = torch.tensor([[3, 10, 24], [1, 8, 19]])  # blocks do not overlap (gap > gamma)
    expected = {}
    for b in range(2):
        for a in anchors[b].tolist():
            ids, logits, conf = greedy_inference(draft, batch.features[b],
                                                 int(batch.input_ids[b, a]), a)
            expected[b, a] = (logits, conf)
            # teacher forcing with the greedy draft as ground truth: x_{k-1} agree
            batch.input_ids[b, a + 1:a + gamma] = ids[:gamma - 1]
    batch.features[1, 25:] = 1e6  # padding must not be seen
    blocks = teacher_forced_blocks(draft, batch, anchors,
                                   torch.ones_like(anchors, dtype=torch.bool))
    for r, (b, a) in enumerate((i, j) for i in range(2) for j in anchors[i].tolist()):
        logits, conf = expected[b, a]
        torch.testing.assert_close(blocks.logits[r], logits, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(blocks.conf_logits[r], conf, rtol=1e-10, atol=1e-10)
        assert blocks.valid[r].all()
        torch.testing.assert_close(blocks.target_logits[r],
                                   draft.lm_head(batch.target_hidden[b, a:a + gamma]))


def test_invalid_labels_contribute_nothing(tmp_path):
    draft = tiny_draft(tmp_path, "rnn", 8)
    for p in draft.parameters():
        p.requires_grad_(True)
    batch = random_batch([20, 14], prompt_len=8, seed=1)
    batch.loss_mask[0, 17:] = False  # labels end before the sequence does
    anchors, anchor_valid = sample_anchors(batch, 10, torch.Generator().manual_seed(0))
    assert not anchor_valid[1].all()  # seq 1 has only 6 anchor positions (7..12)

    def loss_and_grads(b):
        draft.zero_grad()
        loss, _ = dspark_loss(teacher_forced_blocks(draft, b, anchors, anchor_valid))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in draft.parameters()]

    clean = loss_and_grads(batch)
    gen = torch.Generator().manual_seed(9)
    # what only invalid slots read: label ids, the target's hidden state that predicts them,
    # and features no valid anchor has before it
    for b, first_bad_label, first_unseen_feature in ((0, 17, 15), (1, 14, 12)):
        n = batch.input_ids.shape[1] - first_bad_label
        batch.input_ids[b, first_bad_label:] = torch.randint(0, V, (n,), generator=gen)
        batch.target_hidden[b, first_bad_label - 1:] = 1e4
        batch.features[b, first_unseen_feature:] = 1e6
    poisoned = loss_and_grads(batch)
    torch.testing.assert_close(poisoned[0], clean[0], rtol=1e-12, atol=0)
    for g_poisoned, g_clean in zip(poisoned[1], clean[1]):
        torch.testing.assert_close(g_poisoned, g_clean, rtol=1e-12, atol=1e-15)


def test_a_slot_after_an_invalid_slot_is_invalid(tmp_path):
    draft = tiny_draft(tmp_path, gamma=5)
    batch = random_batch([30], prompt_len=2)
    batch.loss_mask[0, 12] = False  # a hole: slot 2 of the block at anchor 10
    blocks = teacher_forced_blocks(draft, batch, torch.tensor([[10, 20, 27]]),
                                   torch.tensor([[True, True, True]]))
    assert blocks.valid.tolist() == [[True, False, False, False, False],
                                     [True] * 5,
                                     [True, True, False, False, False]]  # labels 28, 29 exist


def test_loss_is_the_documented_formula_with_position_weights(tmp_path):
    draft = tiny_draft(tmp_path, gamma=5)
    batch = random_batch([30, 22], prompt_len=4, seed=2)
    anchors, anchor_valid = sample_anchors(batch, 6, torch.Generator().manual_seed(1))
    blocks = teacher_forced_blocks(draft, batch, anchors, anchor_valid)
    loss, metrics = dspark_loss(blocks)
    # docs/DSPARK.md 4, written out: weights exp(-(k-1)/4), means over valid slots
    w = torch.tensor([math.exp(-(k - 1) / 4) for k in range(1, 6)], dtype=torch.float64)
    w = w * blocks.valid
    p, pt = blocks.logits.softmax(-1), blocks.target_logits.softmax(-1)
    ce = -p.gather(-1, blocks.labels[..., None]).squeeze(-1).log()
    l1 = (p - pt).abs().sum(-1)
    c_star = 1 - 0.5 * l1
    c = torch.sigmoid(blocks.conf_logits)
    bce = -(c_star * c.log() + (1 - c_star) * (1 - c).log())
    mean = lambda t: (torch.where(blocks.valid, t, 0) * w).sum() / w.sum()  # noqa: E731
    expected = 0.1 * mean(ce) + 0.9 * mean(l1) + 1.0 * mean(bce)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    assert metrics["num_slots"] == int(blocks.valid.sum()) > 0

    # the gradient reaching each slot's term is proportional to exp(-(k-1)/4)
    terms = torch.rand(3, 7, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True] * 7, [True] * 3 + [False] * 4, [False] * 7])
    weighted_mean(terms, valid, LossWeights().decay).backward()
    grad = terms.grad
    for k in range(7):
        torch.testing.assert_close(grad[0, k] / grad[0, 0], torch.tensor(math.exp(-k / 4),
                                   dtype=torch.float64))
    assert (grad[~valid] == 0).all()


def test_anchors_are_label_positions_and_reproducible():
    batch = random_batch([40, 12], prompt_len=10)
    anchors, valid = sample_anchors(batch, 8, torch.Generator().manual_seed(5))
    again, _ = sample_anchors(batch, 8, torch.Generator().manual_seed(5))
    assert torch.equal(anchors, again)
    assert valid[0].all() and len(set(anchors[0].tolist())) == 8
    assert ((anchors[0] >= 9) & (anchors[0] <= 38)).all()  # the next token is a label
    assert sorted(anchors[1][valid[1]].tolist()) == [9, 10] and valid[1].sum() == 2


# ------------------------------------------------------------------ a short run on a tiny target

TRAIN = DraftTrainConfig(markov_rank=16, gamma=4, num_anchors=16, steps=200, lr=5e-3, log_every=20,
                         checkpoint_every=0)


def prompts(tokenizer, doc, count):
    ids = tokenizer(corpus_text()[doc]).input_ids
    return [ids[i * 40:i * 40 + 16] for i in range(count)]


@pytest.fixture(scope="module")
def draft_data(qwen3_target_dir, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(qwen3_target_dir)
    out = tmp_path_factory.mktemp("draft_data")
    config = DraftDataConfig(target_layer_ids=(0, 2), max_new_tokens=32, temperature=0.0,
                             seqs_per_shard=16)
    return build_draft_data(qwen3_target_dir, prompts(tokenizer, 0, 48), out, config), config


@pytest.fixture(scope="module")
def trained(qwen3_target_dir, draft_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("draft_run")
    summary = train_draft(qwen3_target_dir, draft_data[0], root / "draft", root / "work", TRAIN)
    return root, summary


def mean_accept_length(target_dir, draft_dir, prompt_ids):
    engine = LLMEngine.from_pretrained(str(target_dir), str(draft_dir),
                                       EngineConfig(policy="fixed", profile_sps=False))
    results = engine.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=32),
                              policy="fixed")
    lengths = [n for r in results for n in r["stats"]["accept_lengths"]]
    return sum(lengths) / len(lengths)


def test_draft_data_holds_the_targets_answers_and_skips_finished_shards(qwen3_target_dir,
                                                                        draft_data):
    data_dir, config = draft_data
    data = DraftDataset(data_dir)
    assert len(data) == 48 and data.target_layer_ids == (0, 2)
    batch = data.batch([0, 5])
    assert batch.features.shape[-1] == 2 * 64 and batch.target_hidden.shape[-1] == 64
    assert batch.loss_mask[:, :16].sum() == 0 and (batch.loss_mask.sum(1) >= 1).all()
    # an interrupted build: the last shard never made it into the manifest
    manifest = json.loads((data_dir / "manifest.json").read_text())
    last = manifest["shards"].pop()
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    old_last = torch.load(data_dir / last["file"])
    (data_dir / last["file"]).unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in data_dir.glob("shard_*.pt")}
    tokenizer = AutoTokenizer.from_pretrained(qwen3_target_dir)
    build_draft_data(qwen3_target_dir, prompts(tokenizer, 0, 48), data_dir, config)
    assert {p.name: p.stat().st_mtime_ns for p in data_dir.glob("shard_*.pt")
            if p.name != last["file"]} == stamps
    new_last = torch.load(data_dir / last["file"])
    assert all(torch.equal(new_last[k], old_last[k]) for k in old_last)
    assert len(DraftDataset(data_dir)) == 48
    with pytest.raises(ValueError, match="other settings"):
        build_draft_data(qwen3_target_dir, prompts(tokenizer, 0, 47), data_dir, config)


def test_short_training_lowers_the_loss_and_raises_greedy_acceptance(qwen3_target_dir, trained):
    root, summary = trained
    assert summary["finished"] and summary["steps"] == TRAIN.steps
    log = [json.loads(line) for line in (root / "work" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] - 0.2
    tokenizer = AutoTokenizer.from_pretrained(qwen3_target_dir)
    # the training prompts: 200 steps over 48 answers learn them, not the language
    prompt_ids = prompts(tokenizer, 0, 8)
    before = mean_accept_length(qwen3_target_dir, root / "work" / "init", prompt_ids)
    after = mean_accept_length(qwen3_target_dir, root / "draft", prompt_ids)
    assert after > before + 0.2, (before, after)


def test_trained_draft_loads_serves_and_calibrates(qwen3_target_dir, trained):
    root, _ = trained
    engine = LLMEngine.from_pretrained(
        str(qwen3_target_dir), str(root / "draft"),
        EngineConfig(policy="threshold", profile_sps=False, record_confidence=True))
    frozen = load_file(str(root / "work" / "init" / "model.safetensors"))
    assert torch.equal(engine.draft.lm_head.weight, frozen["lm_head.weight"])
    assert torch.equal(engine.draft.embed_tokens.weight, frozen["embed_tokens.weight"])
    assert (json.loads((root / "draft" / "config.json").read_text())["num_anchors"]
            == TRAIN.num_anchors)
    tokenizer = AutoTokenizer.from_pretrained(qwen3_target_dir)
    out = engine.generate(prompts(tokenizer, 2, 2), SamplingParams(temperature=0, max_tokens=8))
    assert all(len(r["token_ids"]) == 8 for r in out)
    metrics = calibrate_sts(engine, prompts(tokenizer, 3, 6),
                            SamplingParams(temperature=1.0, seed=0, max_tokens=24),
                            draft_dir=root / "draft")
    assert len(metrics["temperatures"]) == TRAIN.gamma and (root / "draft" / "sts.json").is_file()


@pytest.mark.parametrize("variant", ["dspark", "dflash"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(qwen3_target_dir, draft_data,
                                                               tmp_path, variant):
    config = DraftTrainConfig(markov_rank=8, gamma=4, num_anchors=4, batch_size=4, steps=6,
                              log_every=2, checkpoint_every=0)
    config = dflash_variant(config) if variant == "dflash" else config
    train_draft(qwen3_target_dir, draft_data[0], tmp_path / "a", tmp_path / "wa", config)
    paused = train_draft(qwen3_target_dir, draft_data[0], tmp_path / "b", tmp_path / "wb",
                         replace(config, stop_after_steps=4))
    assert not paused["finished"] and not (tmp_path / "b").exists()
    train_draft(qwen3_target_dir, draft_data[0], tmp_path / "b", tmp_path / "wb", config)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ("markov_head.markov_w1.weight" in a) == (variant == "dspark")
    assert "confidence_head.proj.weight" in a
    with pytest.raises(ValueError, match="training settings"):
        train_draft(qwen3_target_dir, draft_data[0], tmp_path / "b", tmp_path / "wb",
                    replace(config, lr=1e-2))


def test_data_directories_combine_and_must_match(qwen3_target_dir, draft_data, tmp_path):
    data_dir, config = draft_data
    greedy = build_draft_data(qwen3_target_dir, [[5, 6, 7, 8]] * 3, tmp_path / "greedy",
                              replace(config, temperature=1.0, seqs_per_shard=2))
    both = DraftDataset([data_dir, greedy])
    assert len(both) == len(DraftDataset(data_dir)) + 3
    last = both.batch([len(both) - 1])
    # the second directory's sequences come last
    assert last.input_ids[0, :4].tolist() == [5, 6, 7, 8]
    other_layers = build_draft_data(qwen3_target_dir, [[5, 6, 7, 8]], tmp_path / "other",
                                    replace(config, target_layer_ids=(1,)))
    with pytest.raises(ValueError, match="other layers"):
        DraftDataset([data_dir, other_layers])
