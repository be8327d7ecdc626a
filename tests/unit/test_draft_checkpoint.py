"""The DSpark draft: released checkpoint format, the documented computation, refusals at load.

Tiny random targets only (no network). Exactness checks run in float64 against a plain
per-request reference written from docs/DSPARK.md 1-2 and 5, not from the drafter's code.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from worker.engine.draft_checkpoint import random_dspark_checkpoint
from worker.engine.draft_config import DraftCheckpointError
from worker.engine.drafter import DSparkDraft

V, D, L, H, KVH, HD, FFN = 128, 32, 4, 4, 2, 8, 64


def qwen3_target_config(**overrides):
    fields = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                  num_key_value_heads=KVH, head_dim=HD, intermediate_size=FFN,
                  max_position_embeddings=256, rope_theta=10000.0)
    return Qwen3Config(**{**fields, **overrides})


def qwen3_target(**overrides):
    torch.manual_seed(0)
    return Qwen3ForCausalLM(qwen3_target_config(**overrides)).to(torch.float64).eval()


def documented_tensor_names(num_layers, head_type, rank, confidence, attention_bias=False):
    """The tensor names of docs/DSPARK.md section 5, spelled out."""
    names = ["embed_tokens.weight", "norm.weight", "hidden_norm.weight", "fc.weight",
             "lm_head.weight"]
    for i in range(num_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(f"layers.{i}.self_attn.{proj}.weight")
            if attention_bias:
                names.append(f"layers.{i}.self_attn.{proj}.bias")
        names += [f"layers.{i}.self_attn.q_norm.weight", f"layers.{i}.self_attn.k_norm.weight",
                  f"layers.{i}.mlp.gate_proj.weight", f"layers.{i}.mlp.up_proj.weight",
                  f"layers.{i}.mlp.down_proj.weight", f"layers.{i}.input_layernorm.weight",
                  f"layers.{i}.post_attention_layernorm.weight"]
    if rank > 0:
        names += ["markov_head.markov_w1.weight", "markov_head.markov_w2.weight"]
        if head_type == "gated":
            names += ["markov_head.gate_proj.weight", "markov_head.gate_proj.bias"]
        if head_type == "rnn":
            names += ["markov_head.joint_proj.weight", "markov_head.joint_proj.bias"]
    if confidence:
        names += ["confidence_head.proj.weight", "confidence_head.proj.bias"]
    return set(names)


HEAD_VARIANTS = [  # (head_type, markov_rank, confidence, confidence_with_markov)
    ("vanilla", 16, True, True), ("gated", 16, True, True), ("rnn", 16, True, True),
    ("vanilla", 16, False, False), ("rnn", 8, True, False), ("vanilla", 0, True, False),
    ("vanilla", 0, False, False),
]


@pytest.mark.parametrize("head_type,rank,confidence,with_markov", HEAD_VARIANTS)
def test_random_checkpoint_has_the_documented_names_and_loads(
        tmp_path, head_type, rank, confidence, with_markov):
    target_config = qwen3_target_config()
    random_dspark_checkpoint(target_config, tmp_path, num_layers=2, head_type=head_type,
                             markov_rank=rank, confidence=confidence,
                             confidence_with_markov=with_markov)
    written = load_file(str(tmp_path / "model.safetensors"))
    assert set(written) == documented_tensor_names(2, head_type, rank, confidence)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["model_type"] == "qwen3"
    assert config["num_hidden_layers"] == 2 and config["num_target_layers"] == L
    assert config["tie_word_embeddings"] is False and config["markov_rank"] == rank
    for key in ("block_size", "target_layer_ids", "mask_token_id", "markov_head_type",
                "enable_confidence_head", "confidence_head_with_markov", "num_anchors"):
        assert key in config

    model = DSparkDraft.from_pretrained(tmp_path, target_config, device="cpu", dtype=torch.float32)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert (model.markov_head is None) == (rank == 0)
    if confidence:
        r = rank if with_markov else 0
        assert model.confidence_head.proj.weight.shape == (1, D + r)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, written[name]), name


@pytest.mark.parametrize("head_type", ["gated", "rnn"])
def test_hand_written_checkpoint_in_the_released_format_loads(tmp_path, head_type):
    r, n = 8, 2  # markov rank, number of target layer ids
    shapes = {
        "embed_tokens.weight": (V, D),
        "layers.0.self_attn.q_proj.weight": (H * HD, D),
        "layers.0.self_attn.k_proj.weight": (KVH * HD, D),
        "layers.0.self_attn.v_proj.weight": (KVH * HD, D),
        "layers.0.self_attn.o_proj.weight": (D, H * HD),
        "layers.0.self_attn.q_norm.weight": (HD,),
        "layers.0.self_attn.k_norm.weight": (HD,),
        "layers.0.mlp.gate_proj.weight": (FFN, D),
        "layers.0.mlp.up_proj.weight": (FFN, D),
        "layers.0.mlp.down_proj.weight": (D, FFN),
        "layers.0.input_layernorm.weight": (D,),
        "layers.0.post_attention_layernorm.weight": (D,),
        "norm.weight": (D,),
        "hidden_norm.weight": (D,),
        "fc.weight": (D, n * D),
        "lm_head.weight": (V, D),
        "markov_head.markov_w1.weight": (V, r),
        "markov_head.markov_w2.weight": (V, r),
        "confidence_head.proj.weight": (1, D + r),
        "confidence_head.proj.bias": (1,),
    }
    if head_type == "gated":
        shapes |= {"markov_head.gate_proj.weight": (r, D + r), "markov_head.gate_proj.bias": (r,)}
    else:
        shapes |= {"markov_head.joint_proj.weight": (3 * r, 2 * r + D),
                   "markov_head.joint_proj.bias": (3 * r,)}
    gen = torch.Generator().manual_seed(1)
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    target_config = qwen3_target_config()
    config = target_config.to_diff_dict() | {
        "architectures": ["Qwen3DSparkModel"], "num_hidden_layers": 1, "num_target_layers": L,
        "block_size": 7, "target_layer_ids": [0, 2], "mask_token_id": V - 2,
        "markov_rank": r, "markov_head_type": head_type, "enable_confidence_head": True,
        "confidence_head_with_markov": True, "num_anchors": 512, "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))

    model = DSparkDraft.from_pretrained(tmp_path, target_config, device="cpu", dtype=torch.float32)
    assert model.gamma == 7 and model.target_layer_ids == (0, 2)
    assert model.config.mask_token_id == V - 2
    state = model.state_dict()
    assert set(state) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name


def test_llama_target_gets_a_qwen3_style_draft_config(tmp_path):
    llama = LlamaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=3, num_attention_heads=H,
                        num_key_value_heads=KVH, intermediate_size=FFN, rope_theta=5000.0)
    torch.manual_seed(0)
    target = LlamaForCausalLM(llama)
    random_dspark_checkpoint(llama, tmp_path, target_model=target)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["head_dim"] == D // H
    assert config["num_target_layers"] == 3
    # transformers 4 writes `rope_theta`, 5 a `rope_parameters` dict; either carries the theta
    assert config.get("rope_theta", config.get("rope_parameters", {}).get("rope_theta")) == 5000.0
    model = DSparkDraft.from_pretrained(tmp_path, llama, device="cpu", dtype=torch.float32)
    assert model.config.rope_theta == 5000.0
    # the recipe copies the target's embedding and lm_head (docs/DSPARK.md 4)
    assert torch.equal(model.embed_tokens.weight, target.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, target.lm_head.weight)


# ---------------------------------------------------------------- the documented computation


def rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def rope(x, cos, sin):
    """x [S, heads, hd], cos/sin [S, hd]: pairs (i, i + hd/2) rotated by the position angle."""
    half = x.shape[-1] // 2
    out = torch.empty_like(x)
    c, s = cos[:, None, :half], sin[:, None, :half]
    out[..., :half] = x[..., :half] * c - x[..., half:] * s
    out[..., half:] = x[..., half:] * c + x[..., :half] * s
    return out


def reference_draft(w, cfg, features, anchor, rotary):
    """One request, no cache, no batching, greedy: docs/DSPARK.md 1.2-1.4 and 2 step by step.

    w: the checkpoint's tensors by name; features [T, n*d] for positions 0..T-1; the anchor
    sits at position T. Returns logits [G, V], ids [G], confidence logits [G] or None.
    """
    eps, G, T = cfg["rms_norm_eps"], cfg["block_size"], features.shape[0]
    heads, kv_heads, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def lin(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    def angles(positions):
        cos, sin = rotary(features, positions[None])
        return cos[0], sin[0]

    ctx = rms(lin(features, "fc"), w["hidden_norm.weight"], eps)  # [T, d]
    block = [anchor] + [cfg["mask_token_id"]] * (G - 1)
    x = w["embed_tokens.weight"][block]  # [G, d]
    ctx_cos, ctx_sin = angles(torch.arange(T))
    blk_cos, blk_sin = angles(T + torch.arange(G))
    for i in range(cfg["num_hidden_layers"]):
        a = f"layers.{i}.self_attn."
        xn = rms(x, w[f"layers.{i}.input_layernorm.weight"], eps)
        q = rms(lin(xn, a + "q_proj").view(G, heads, hd), w[a + "q_norm.weight"], eps)
        q = rope(q, blk_cos, blk_sin)
        kb = rope(rms(lin(xn, a + "k_proj").view(G, kv_heads, hd), w[a + "k_norm.weight"], eps),
                  blk_cos, blk_sin)
        vb = lin(xn, a + "v_proj").view(G, kv_heads, hd)
        # the context: same k_proj/k_norm/v_proj, no input_layernorm, its own positions
        kc = rope(rms(lin(ctx, a + "k_proj").view(T, kv_heads, hd), w[a + "k_norm.weight"], eps),
                  ctx_cos, ctx_sin)
        vc = lin(ctx, a + "v_proj").view(T, kv_heads, hd)
        keys, values = torch.cat([kc, kb]), torch.cat([vc, vb])  # all context < anchor + block
        out = torch.empty(G, heads, hd, dtype=x.dtype)
        for head in range(heads):
            g = head // (heads // kv_heads)
            scores = q[:, head] @ keys[:, g].T / math.sqrt(hd)  # [G, T + G], no causal mask
            out[:, head] = torch.softmax(scores, dim=-1) @ values[:, g]
        x = x + lin(out.reshape(G, heads * hd), a + "o_proj")
        xn = rms(x, w[f"layers.{i}.post_attention_layernorm.weight"], eps)
        m = f"layers.{i}.mlp."
        act = lin(xn, m + "gate_proj")
        x = x + lin(act * torch.sigmoid(act) * lin(xn, m + "up_proj"), m + "down_proj")
    h = rms(x, w["norm.weight"], eps)  # [G, d]
    base = h @ w["lm_head.weight"].T  # [G, V]

    r, head_type = cfg["markov_rank"], cfg["markov_head_type"]
    state = torch.zeros(r, dtype=h.dtype)
    prev, logits, ids, confs = anchor, [], [], []
    for k in range(G):
        logit = base[k].clone()
        e = w["markov_head.markov_w1.weight"][prev] if r > 0 else None
        if r > 0 and head_type == "vanilla":
            logit += w["markov_head.markov_w2.weight"] @ e
        elif r > 0 and head_type == "gated":
            gate = torch.sigmoid(lin(torch.cat([h[k], e]), "markov_head.gate_proj"))
            logit += w["markov_head.markov_w2.weight"] @ (gate * e)
        elif r > 0 and head_type == "rnn":
            z = lin(torch.cat([state, e, h[k]]), "markov_head.joint_proj")
            gate, cand, outp = torch.sigmoid(z[:r]), z[r:2 * r], z[2 * r:]
            state = (1 - gate) * state + gate * torch.tanh(cand)
            logit += w["markov_head.markov_w2.weight"] @ torch.tanh(outp)
        if cfg["enable_confidence_head"]:
            with_markov = cfg["confidence_head_with_markov"] and r > 0
            confs.append(lin(torch.cat([h[k], e]) if with_markov else h[k],
                             "confidence_head.proj")[0])
        logits.append(logit)
        prev = int(torch.argmax(logit))
        ids.append(prev)
    return torch.stack(logits), torch.tensor(ids), (torch.stack(confs) if confs else None)


def batched_draft(model, features_per_request, anchors):
    """What the engine does: project, cache context K/V, pad and gather, backbone, Markov."""
    R, C, n_layers = len(anchors), max(f.shape[0] for f in features_per_request), len(model.layers)
    kv_shape = (R, C, model.config.num_key_value_heads, model.config.head_dim)
    gen = torch.Generator().manual_seed(7)
    # padding holds garbage: the mask alone must keep it out
    ctx_k = [100 * torch.randn(kv_shape, generator=gen, dtype=torch.float64)
             for _ in range(n_layers)]
    ctx_v = [100 * torch.randn(kv_shape, generator=gen, dtype=torch.float64)
             for _ in range(n_layers)]
    ctx_mask = torch.zeros(R, C, dtype=torch.bool)
    for r, feats in enumerate(features_per_request):
        T = feats.shape[0]
        ctx = model.project_context(feats)
        for layer in range(n_layers):
            ctx_k[layer][r, :T], ctx_v[layer][r, :T] = model.context_kv(layer, ctx, torch.arange(T))
        ctx_mask[r, :T] = True
    anchor_ids = torch.tensor(anchors)
    positions = torch.tensor([f.shape[0] for f in features_per_request])
    h = model.backbone(anchor_ids, positions, ctx_k, ctx_v, ctx_mask)
    seen = []

    def greedy(k, logits):
        seen.append((k, logits))
        return logits.argmax(-1), torch.softmax(logits, dim=-1)

    ids, probs, conf = model.draft_block(h, anchor_ids, greedy)
    assert [k for k, _ in seen] == list(range(1, model.gamma + 1))
    return torch.stack([lg for _, lg in seen], dim=1), ids, probs, conf


@pytest.mark.parametrize("head_type,rank,confidence,with_markov",
                         [("vanilla", 16, True, True), ("gated", 16, True, True),
                          ("rnn", 16, True, True), ("rnn", 8, True, False),
                          ("vanilla", 0, True, False), ("vanilla", 0, False, False)])
@pytest.mark.parametrize("attention_bias", [False, True])
def test_draft_logits_follow_the_documented_computation(
        tmp_path, head_type, rank, confidence, with_markov, attention_bias):
    target = qwen3_target(attention_bias=attention_bias)
    layer_ids = [-1, 1, 2]
    random_dspark_checkpoint(target.config, tmp_path, num_layers=2, head_type=head_type,
                             markov_rank=rank, confidence=confidence,
                             confidence_with_markov=with_markov, target_layer_ids=layer_ids,
                             gamma=5, target_model=target)
    model = DSparkDraft.from_pretrained(tmp_path, target.config, device="cpu", dtype=torch.float64)
    w = {k: t.to(torch.float64) for k, t in load_file(str(tmp_path / "model.safetensors")).items()}
    cfg = json.loads((tmp_path / "config.json").read_text())

    gen = torch.Generator().manual_seed(3)
    features, anchors = [], []
    for T in (5, 11, 2):  # three requests, different context lengths, one batch
        prompt = torch.randint(0, V, (1, T), generator=gen)
        with torch.no_grad():
            hidden = target(prompt, output_hidden_states=True).hidden_states
        # layer i is hidden_states[i + 1]; -1 (embedding output) is hidden_states[0]
        features.append(torch.cat([hidden[i + 1][0] for i in layer_ids], dim=-1))  # [T, 3d]
        anchors.append(int(torch.randint(0, V, (1,), generator=gen)))

    logits, ids, probs, conf = batched_draft(model, features, anchors)
    assert ids.shape == (3, 5) and probs.shape == (3, 5, V)
    assert (conf is None) == (not confidence)
    for r in range(3):
        ref_logits, ref_ids, ref_conf = reference_draft(
            w, cfg, features[r], anchors[r], target.model.rotary_emb)
        torch.testing.assert_close(logits[r], ref_logits, rtol=0, atol=1e-9)
        torch.testing.assert_close(probs[r], torch.softmax(ref_logits, -1), rtol=0, atol=1e-9)
        assert torch.equal(ids[r], ref_ids)
        if confidence:
            torch.testing.assert_close(conf[r], ref_conf, rtol=0, atol=1e-9)


def test_backbone_of_a_row_without_context_is_finite_and_ignores_padding(tmp_path):
    target_config = qwen3_target_config()
    random_dspark_checkpoint(target_config, tmp_path, num_layers=2, gamma=3)
    model = DSparkDraft.from_pretrained(tmp_path, target_config, device="cpu", dtype=torch.float64)
    kv = (2, 4, KVH, HD)
    ctx_k = [torch.randn(kv, dtype=torch.float64) for _ in range(2)]
    ctx_v = [torch.randn(kv, dtype=torch.float64) for _ in range(2)]
    mask = torch.tensor([[False] * 4, [True, True, False, False]])
    h = model.backbone(torch.tensor([5, 6]), torch.tensor([0, 2]), ctx_k, ctx_v, mask)
    assert torch.isfinite(h).all()
    empty = [torch.zeros(1, 0, KVH, HD, dtype=torch.float64)] * 2
    alone = model.backbone(torch.tensor([5]), torch.tensor([0]), empty, empty,
                           torch.zeros(1, 0, dtype=torch.bool))
    torch.testing.assert_close(h[0], alone[0], rtol=0, atol=1e-12)
    trimmed = model.backbone(torch.tensor([6]), torch.tensor([2]), [k[1:, :2] for k in ctx_k],
                             [v[1:, :2] for v in ctx_v], mask[1:, :2])
    torch.testing.assert_close(h[1], trimmed[0], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- refusals at load


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


REFUSALS = {
    "vocab_mismatch": (lambda p: None, {"vocab_size": V + 1},
                       f"vocabulary size {V} != target vocab_size {V + 1}"),
    "hidden_mismatch": (lambda p: None, {"hidden_size": 2 * D, "head_dim": HD},
                        f"hidden size {D} != target hidden_size {2 * D}"),
    "layer_count_mismatch": (lambda p: edit_config(p, num_target_layers=L + 2), {},
                             f"num_target_layers {L + 2} != target num_hidden_layers {L}"),
    "layer_id_out_of_range": (lambda p: edit_config(p, target_layer_ids=[0, L + 3]), {},
                              f"target layer id {L + 3} is out of range [-1, {L - 1}]"),
    "layer_id_is_last_layer": (lambda p: edit_config(p, target_layer_ids=[0, L - 1]), {},
                               f"target layer id {L - 1} is the target's last layer"),
    "layer_ids_not_increasing": (lambda p: edit_config(p, target_layer_ids=[1, 0]), {},
                                 "not strictly increasing"),
    "unknown_head_type": (lambda p: edit_config(p, markov_head_type="lstm"), {},
                          "unknown markov_head_type 'lstm'"),
    "block_size_zero": (lambda p: edit_config(p, block_size=0), {}, "block_size must be >= 1"),
    "mask_token_outside_vocab": (lambda p: edit_config(p, mask_token_id=V), {},
                                 f"mask_token_id {V} is outside [0, vocab_size={V})"),
    "missing_key": (lambda p: edit_config(p, mask_token_id=None), {},
                    "missing required key 'mask_token_id'"),
    "mistyped_key": (lambda p: edit_config(p, block_size="7"), {},
                     "key 'block_size' should be int, got '7'"),
    "missing_tensor": (lambda p: edit_tensors(p, lambda t: t.pop("fc.weight")), {},
                       "missing tensors: fc.weight"),
    "wrong_shape": (lambda p: edit_tensors(p, lambda t: t.update(
        {"markov_head.markov_w1.weight": torch.zeros(V, 3)})), {},
        "wrong-shaped tensors: markov_head.markov_w1.weight (128, 3) (expected (128, 16))"),
    "unexpected_tensor": (lambda p: edit_tensors(p, lambda t: t.update(
        {"layers.5.mlp.up_proj.weight": torch.zeros(2)})), {},
        "unexpected tensors: layers.5.mlp.up_proj.weight"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_loading_refuses_a_checkpoint_that_does_not_fit_and_says_why(tmp_path, case):
    spoil, target_changes, message = REFUSALS[case]
    random_dspark_checkpoint(qwen3_target_config(), tmp_path, num_layers=1, markov_rank=16,
                             target_layer_ids=[0, 2])
    spoil(tmp_path)
    with pytest.raises(DraftCheckpointError) as info:
        DSparkDraft.from_pretrained(tmp_path, qwen3_target_config(**target_changes),
                                    device="cpu", dtype=torch.float32)
    assert message in str(info.value)

