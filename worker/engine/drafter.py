"""The DSpark draft model: DFlash-style backbone with KV injection, Markov and confidence heads.

Scope: the draft network of docs/DSPARK.md 1-2 with submodule names equal to the released tensor
names (docs/DSPARK.md 5), loading and validating a checkpoint, and the batched computations the
engine calls each step: context projection, context keys/values, the parallel backbone pass
over a block, and the sequential Markov stage.

Not in scope: the paged KV cache (the engine caches what ``context_kv`` returns and hands back
either padded context or a function that attends it in place, ``ContextAttention``), sampling
(a ``sample_fn`` from the engine), prefix scheduling and verification, the target model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from worker.engine.attention import merge
from worker.engine.draft_config import DraftCheckpointError, DraftConfig, check_fits_target
from worker.engine.draft_vocab import DraftVocab
from worker.engine.markov import MARKOV_HEADS, ConfidenceHead
from worker.engine.model_runner import sdpa

# context_attention(layer, q [R * G, heads, hd]) -> (out [R * G, heads, hd], lse [R * G, heads]):
# attention of the block queries over the cached context (every query of a block sees it all).
ContextAttention = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# sample_fn(k, logits_k [R, V]) -> (ids [R], probs [R, V] or None); k counts positions from 1.
SampleFn = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _native(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module` computes `x` with the fused bfloat16 ops (`csrc/fused_ops.cpp`): where
    the engine turned them on (`DSparkDraft.use_native_ops`), for bfloat16 without autograd
    (training and other dtypes run the torch ops)."""
    return module.native_ops and x.dtype == torch.bfloat16 and not torch.is_grad_enabled()


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm, computed in at least float32 (float64 stays float64)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.native_ops = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _native(self, x) and self.weight.dtype == torch.bfloat16:
            return torch.ops.sparkgrid.rms_norm_bf16(x.contiguous(), self.weight, self.eps)
        y = x.to(torch.promote_types(x.dtype, torch.float32))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, as the Qwen3 target: x [..., S, heads, hd], cos/sin [..., S, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


class DraftAttention(nn.Module):
    """Queries from the block; keys/values from ``[context ; block]`` (docs/DSPARK.md 2)."""

    def __init__(self, c: DraftConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        q_width, kv_width = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, q_width, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, kv_width, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, kv_width, bias=c.attention_bias)
        self.o_proj = nn.Linear(q_width, c.hidden_size, bias=c.attention_bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)  # per head
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.native_ops = False

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`apply_rope`, in one fused pass where the native ops are on (the same roundings:
        each product rounded to bfloat16, then their sum)."""
        if not _native(self, x):
            return apply_rope(x, cos, sin)
        heads, hd = x.shape[-2:]
        out = torch.ops.sparkgrid.rotary_bf16(x.reshape(-1, heads, hd).contiguous(),
                                              cos.contiguous(), sin.contiguous())
        return out.view(x.shape)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [..., S, d] -> k, v [..., S, kv_heads, hd]; k after k_norm and RoPE.

        The same projections serve the projected context and the block (KV injection):
        the context gets no input_layernorm, the block gets the layer's input_layernorm first.
        """
        k = self.k_norm(self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        return self.rope(k, cos, sin), v

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask):
        """x [R, G, d]; cos/sin [R, G, hd]; ctx_k/ctx_v [R, C, kv_heads, hd];
        mask [R, 1, 1, C + G] bool (True = may attend) -> [R, G, d]."""
        q = self.q_norm(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)))
        q = apply_rope(q, cos, sin)  # [R, G, heads, hd]
        k, v = self.keys_values(x, cos, sin)  # [R, G, kv_heads, hd]
        k = torch.cat([ctx_k, k], dim=1)  # [R, C + G, kv_heads, hd]
        v = torch.cat([ctx_v, v], dim=1)
        out = sdpa(  # scale 1/sqrt(head_dim), as Qwen3
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            enable_gqa=self.num_heads != self.num_kv_heads)  # [R, heads, G, hd]
        return self.o_proj(out.transpose(1, 2).flatten(-2))

    def forward_paged(self, layer_idx: int, x, cos, sin, context_attention: ContextAttention):
        """As `forward`, with the context attended where the engine caches it: attention over
        the cached context and over the block's own keys, joined by their log-sum-exps."""
        rows, gamma = x.shape[:2]
        q = self.q_norm(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)))
        q = self.rope(q, cos, sin)  # [R, G, heads, hd]
        k, v = self.keys_values(x, cos, sin)  # [R, G, kv_heads, hd]
        out_ctx, lse_ctx = context_attention(layer_idx, q.flatten(0, 1))
        acc = torch.promote_types(q.dtype, torch.float32)
        group = self.num_heads // self.num_kv_heads
        qf = q.to(acc).transpose(1, 2)  # [R, heads, G, hd]
        kf = k.to(acc).repeat_interleave(group, dim=2).transpose(1, 2)
        vf = v.to(acc).repeat_interleave(group, dim=2).transpose(1, 2)
        scores = qf @ kf.transpose(-1, -2) * self.head_dim ** -0.5  # [R, heads, G, G]
        lse_blk = torch.logsumexp(scores, dim=-1)
        out_blk = torch.exp(scores - lse_blk[..., None]) @ vf  # [R, heads, G, hd]
        out = merge(out_ctx.view(rows, gamma, self.num_heads, self.head_dim),
                    lse_ctx.view(rows, gamma, self.num_heads),
                    out_blk.transpose(1, 2), lse_blk.transpose(1, 2))
        return self.o_proj(out.to(x.dtype).flatten(-2))


class DraftMLP(nn.Module):
    """Qwen3 SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, c: DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    """A Qwen3 decoder layer whose attention also sees the injected context keys/values."""

    def __init__(self, c: DraftConfig):
        super().__init__()
        self.self_attn = DraftAttention(c)
        self.mlp = DraftMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx_k, ctx_v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_paged(self, layer_idx: int, x, cos, sin, context_attention: ContextAttention):
        x = x + self.self_attn.forward_paged(layer_idx, self.input_layernorm(x), cos, sin,
                                             context_attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class DSparkDraft(nn.Module):
    """The draft model. Build with ``from_pretrained``; the engine owns all caching."""

    def __init__(self, config: DraftConfig):
        super().__init__()
        c = self._config = config
        d, n = c.hidden_size, len(c.target_layer_ids)
        self.embed_tokens = nn.Embedding(c.vocab_size, d)
        self.layers = nn.ModuleList(DraftLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(d, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(d, c.rms_norm_eps)
        self.fc = nn.Linear(n * d, d, bias=False)
        self.lm_head = nn.Linear(d, c.vocab_size, bias=False)
        self.markov_head = (MARKOV_HEADS[c.markov_head_type](c.vocab_size, d, c.markov_rank)
                            if c.markov_rank > 0 else None)
        self.confidence_head = (
            ConfidenceHead(d, c.markov_rank if c.confidence_uses_markov else 0)
            if c.enable_confidence_head else None)
        self.rotary_emb = _rotary_for(c)
        self.serving_lm_head = None
        """What computes the base logits in place of `lm_head` when it is given (a `Linear`
        over the same weight, packed or widened: the target runner's, where the lm_head is
        shared with the target); None: `lm_head` itself."""

    @property
    def config(self) -> DraftConfig:
        return self._config

    def use_native_ops(self) -> None:
        """Compute RMSNorm and RoPE with the fused bfloat16 ops (`csrc/fused_ops.cpp`, which
        must be loaded) wherever this draft runs in bfloat16 without autograd: the engine's
        draft passes and context writes, on its native attention path."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, DraftAttention)):
                module.native_ops = True

    @property
    def gamma(self) -> int:
        return self._config.block_size

    @property
    def target_layer_ids(self) -> tuple[int, ...]:
        return self._config.target_layer_ids

    @classmethod
    def from_pretrained(cls, path: str | Path, target_config: Any, *,
                        device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.bfloat16) -> "DSparkDraft":
        """Load a released-format checkpoint (local directory or Hugging Face id), validated
        against ``target_config``; the model comes back in eval mode without gradients."""
        ckpt_dir = _resolve_checkpoint_dir(path)
        config_path = ckpt_dir / "config.json"
        if not config_path.is_file():
            raise DraftCheckpointError(f"{ckpt_dir}: no config.json in the draft checkpoint")
        config = DraftConfig.from_json_dict(json.loads(config_path.read_text()),
                                            source=str(config_path))
        check_fits_target(config, target_config)
        state = _read_safetensors(ckpt_dir)
        with torch.device("meta"):  # shapes only: no random init of weights we will replace
            model = cls(config)
        _check_tensors(model, state, ckpt_dir)
        model.load_state_dict({k: t.to(device=device, dtype=dtype) for k, t in state.items()},
                              strict=True, assign=True)
        model.rotary_emb = _rotary_for(config, device)  # non-persistent buffer, was on meta
        return model.eval().requires_grad_(False)

    def project_context(self, target_features: torch.Tensor) -> torch.Tensor:
        """[N, n*d] concatenated target hidden states -> [N, d] (``fc`` then ``hidden_norm``)."""
        return self.hidden_norm(self.fc(target_features))

    def context_kv(self, layer_idx: int, ctx: torch.Tensor, positions: torch.Tensor):
        """ctx [N, d], positions [N] -> k, v [N, kv_heads, hd]: layer ``layer_idx``'s keys and
        values of the projected context at its absolute positions (docs/DSPARK.md 2)."""
        cos, sin = self.rotary_emb(ctx, positions[None])  # [1, N, hd]
        return self.layers[layer_idx].self_attn.keys_values(ctx, cos[0], sin[0])

    def backbone(self, anchor_ids: torch.Tensor, anchor_positions: torch.Tensor,
                 ctx_k: list[torch.Tensor], ctx_v: list[torch.Tensor],
                 ctx_mask: torch.Tensor) -> torch.Tensor:
        """The parallel stage (docs/DSPARK.md 1.2) for R requests at once.

        anchor_ids, anchor_positions: [R]. ctx_k / ctx_v: one [R, C, kv_heads, hd] per draft
        layer, padded; ctx_mask [R, C] bool, True where a real context position (< anchor).
        Returns h [R, gamma, d] after the final norm; slot j predicts the token j+1 places
        after the anchor.
        """
        if len(ctx_k) != len(self.layers) or len(ctx_v) != len(self.layers):
            raise ValueError(f"need context keys/values for {len(self.layers)} draft layers, "
                             f"got {len(ctx_k)} keys and {len(ctx_v)} values")
        x, cos, sin = self._block_input(anchor_ids, anchor_positions)
        num_rows, gamma = x.shape[:2]
        # Block queries see the real context and the whole block, bidirectionally
        # (docs/DSPARK.md 2).
        block_visible = ctx_mask.new_ones(num_rows, gamma)
        mask = torch.cat([ctx_mask, block_visible], dim=1)[:, None, None, :]  # [R, 1, 1, C+G]
        for layer, k, v in zip(self.layers, ctx_k, ctx_v):
            x = layer(x, cos, sin, k, v, mask)
        return self.norm(x)

    def backbone_paged(self, anchor_ids: torch.Tensor, anchor_positions: torch.Tensor,
                       context_attention: ContextAttention) -> torch.Tensor:
        """`backbone`, with each layer's context attended where the engine caches it (every
        position before the anchor): `context_attention(layer, q)` gives the attention of the
        block queries over that context with its log-sum-exp. Returns h [R, gamma, d]."""
        x, cos, sin = self._block_input(anchor_ids, anchor_positions)
        for idx, layer in enumerate(self.layers):
            x = layer.forward_paged(idx, x, cos, sin, context_attention)
        return self.norm(x)

    def _block_input(self, anchor_ids: torch.Tensor, anchor_positions: torch.Tensor):
        """Embeddings [R, G, d] of [anchor, mask, ...] and their RoPE cos/sin [R, G, hd]."""
        num_rows, gamma = anchor_ids.shape[0], self.gamma
        block_ids = anchor_ids.new_full((num_rows, gamma), self._config.mask_token_id)
        block_ids[:, 0] = anchor_ids  # [R, G]: anchor, then gamma-1 mask tokens
        x = self.embed_tokens(block_ids)  # [R, G, d]
        positions = anchor_positions[:, None] + torch.arange(gamma, device=x.device)  # [R, G]
        cos, sin = self.rotary_emb(x, positions)  # [R, G, hd]
        return x, cos, sin

    def draft_block(self, h: torch.Tensor, anchor_ids: torch.Tensor, sample_fn: SampleFn,
                    vocab: DraftVocab | None = None):
        """The sequential stage (docs/DSPARK.md 1.3-1.4): for k = 1..gamma,
        ``logits_k = U_k + B(x_{k-1})`` with ``x_0`` the anchor, ``x_k, p_k = sample_fn(k,
        logits_k)``, and the raw confidence logit of position k from ``[h_k ; W1[x_{k-1}]]``.

        h [R, G, d], anchor_ids [R] -> draft_ids [R, G], draft_probs [R, G, V] (the exact
        distributions sampled from, kept for rejection sampling; None when `sample_fn` gives
        none, as for greedy rows), conf_logits [R, G] or None.

        With a `vocab` (`DraftVocab`, N kept tokens) the logits span those N only: `sample_fn`
        sees [R, N] and returns indices into them, which come back as token ids, and each
        distribution comes back over all V with zeros outside the N.
        """
        base_logits = (vocab.lm_head(h) if vocab is not None else
                       self.serving_lm_head(h) if self.serving_lm_head is not None else
                       self.lm_head(h))
        prev_ids = anchor_ids  # x_0
        state = self.markov_head.init_state(h.shape[0]) if self.markov_head is not None else None
        w2 = vocab.markov_w2 if vocab is not None else None
        table = vocab.markov_table if vocab is not None else None
        ids, probs, embeds = [], [], []
        for k in range(h.shape[1]):
            logits_k, prev_embed = base_logits[:, k], None  # [R, V] (or [R, N])
            if self.markov_head is not None:
                bias, prev_embed, state = self.markov_head.step(h[:, k], prev_ids, state, w2,
                                                                 table)
                logits_k = logits_k + bias
            embeds.append(prev_embed)
            prev_ids, p_k = sample_fn(k + 1, logits_k)
            if vocab is not None:
                prev_ids = vocab.token_ids[prev_ids]
                if p_k is not None:
                    full = p_k.new_zeros(p_k.shape[0], self.lm_head.weight.shape[0])
                    p_k = full.index_copy_(1, vocab.token_ids, p_k)
            ids.append(prev_ids)
            probs.append(p_k)
        conf_logits = None
        if self.confidence_head is not None:
            # every position's confidence at once (it steers no draw): one product, not gamma
            prev = torch.stack(embeds, dim=1) if embeds[0] is not None else None  # [R, G, r]
            conf_logits = self.confidence_head(h, prev)  # [R, G]
        draft_probs = torch.stack(probs, dim=1) if probs[0] is not None else None
        return torch.stack(ids, dim=1), draft_probs, conf_logits


def _rotary_for(c: DraftConfig, device: torch.device | str | None = None) -> Qwen3RotaryEmbedding:
    """The target's RoPE (theta and scaling from the draft config, which copies the target's)."""
    rope_config = Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim, rope_theta=c.rope_theta,
        rope_scaling=dict(c.rope_scaling) if c.rope_scaling else None,
        max_position_embeddings=c.max_position_embeddings)
    rotary = Qwen3RotaryEmbedding(rope_config)  # transformers 5 takes no `device` argument
    return rotary if device is None else rotary.to(device)


def _resolve_checkpoint_dir(path: str | Path) -> Path:
    """A local directory as is; anything else is taken as a Hugging Face repository id."""
    local = Path(path)
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download  # only needed for hub ids
    try:
        return Path(snapshot_download(repo_id=str(path),
                                      allow_patterns=["config.json", "*.safetensors"]))
    except Exception as exc:  # offline, unknown id, no access: say which checkpoint
        raise DraftCheckpointError(
            f"draft checkpoint {str(path)!r} is neither a local directory nor a downloadable "
            f"Hugging Face repository: {exc}") from exc


def _read_safetensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise DraftCheckpointError(f"{ckpt_dir}: no *.safetensors files in the draft checkpoint")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        for name, tensor in load_file(str(f)).items():
            if name in state:
                raise DraftCheckpointError(f"{f}: tensor {name!r} appears in two shards")
            state[name] = tensor
    return state


def _check_tensors(model: nn.Module, state: dict[str, torch.Tensor], ckpt_dir: Path) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{n} {tuple(state[n].shape)} (expected {expected[n]})"
                 for n in sorted(set(expected) & set(state))
                 if tuple(state[n].shape) != expected[n]]
    problems = [f"{label}: {', '.join(names)}" for label, names in
                (("missing tensors", missing), ("unexpected tensors", unexpected),
                 ("wrong-shaped tensors", misshaped)) if names]
    if problems:
        raise DraftCheckpointError(
            f"{ckpt_dir}: tensors do not match the config: " + "; ".join(problems))
