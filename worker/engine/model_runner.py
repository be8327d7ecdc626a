"""The target model on ragged batches: packed tokens in, logits and drafter features out.

Knows: a Hugging Face causal LM of the Qwen3 or Llama family, run layer by layer through its
own modules (projections, norms, MLP, rotary embedding), with keys and values kept in a
`PagedKV` cache. Every linear layer runs once over all new tokens of all sequences packed
together (no padding). Decode and verify rows attend the cache where it lies
(`attention.paged_attention`: no copy of any context); a prefill from position 0 attends only
its own new keys (causal attention per sequence, no cache read). `load_target` and
`load_tokenizer` read checkpoints saved by transformers 4.x or 5.x with either installed.

Does not know: sampling, drafting, which sequences run (the `ForwardBatch` says), or budgets.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from worker.engine.attention import (
    AttentionMeta,
    attention_meta,
    backend_for,
    paged_attention,
    reads_prefill_in_place,
)
from worker.engine.kv_cache import PagedKV
from worker.engine.linear import Linear

SUPPORTED_FAMILIES = ("qwen3", "llama")


@dataclass
class ForwardBatch:
    """What the target runs in one forward: the contract between engine and runner."""

    seq_ids: list[str]        # R sequences, each already holding `starts[r]` cached tokens
    starts: list[int]         # first new position of each sequence (= tokens already cached)
    num_new: list[int]        # new tokens of each sequence, all >= 1
    input_ids: torch.Tensor   # [N] new tokens of all sequences, packed in seq order
    logits_rows: torch.Tensor  # [M] rows of the packed tokens whose logits are wanted


@dataclass
class _Layout:
    """Index tensors shared by every layer of one forward."""

    positions: torch.Tensor   # [N] absolute position of each packed token
    write_slots: torch.Tensor  # [N] cache slot of each new token's k/v
    meta: AttentionMeta | None  # where each row's keys are (None: a prefill from position 0)
    num_new: list[int]        # new tokens of each sequence (prefill: split points)


TRANSFORMERS_5 = int(transformers.__version__.split(".", 1)[0]) >= 5
"""transformers 5.x, whose checkpoints differ from 4.x's in the two ways handled below."""


def load_target(path: str, *, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """Load a Qwen3 or Llama causal LM from a local directory or a Hugging Face id, saved by
    transformers 4.x or 5.x."""
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"target: model_type {config.model_type!r} is not supported; "
            f"expected one of {SUPPORTED_FAMILIES}"
        )
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        raise ValueError("target: sliding-window attention layers are not supported")
    if not TRANSFORMERS_5:
        _rope_parameters_to_4x(config)
    with _no_progress_bars(Path(path).is_dir()):  # a hub id keeps its download bars
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def _rope_parameters_to_4x(config) -> None:
    """transformers 5 saves RoPE settings as one `rope_parameters` dict (theta, type, scaling)
    where 4.x reads `rope_theta` and `rope_scaling`; 4.x keeps the unknown dict and would run
    its default theta. Set the fields 4.x reads from it."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        return
    if "rope_theta" in params:
        config.rope_theta = float(params["rope_theta"])
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default":
        config.rope_scaling = scaling


@contextmanager
def _no_progress_bars(quiet: bool):
    """transformers 5 draws a progress bar over loading the weights, on stderr: noise for a
    local directory (the CLI's and the worker's output). Restores the setting afterwards."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if quiet and was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_on:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The target's tokenizer (a local directory or a Hugging Face id), whichever transformers
    (4.x or 5.x) saved it.

    transformers 5 saves a fast tokenizer with `tokenizer_class: TokenizersBackend`, its new
    name for the class that 4.x calls `PreTrainedTokenizerFast`; 4.x's `AutoTokenizer` knows no
    such class, so there the same files load as the fast tokenizer they are."""
    if TRANSFORMERS_5:
        return AutoTokenizer.from_pretrained(path)
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    if get_tokenizer_config(path).get("tokenizer_class") == "TokenizersBackend":
        return _TokenizersBackend.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


class _TokenizersBackend(PreTrainedTokenizerFast):
    """transformers 4.x: a fast tokenizer saved by transformers 5 (named as it was saved, so
    4.x's check that the saved class matches the loading one stays quiet)."""


_TokenizersBackend.__name__ = _TokenizersBackend.__qualname__ = "TokenizersBackend"


@dataclass
class _Fused:
    """One layer's projections as `Linear`s, q/k/v and gate/up each fused into one matrix
    (one matmul each)."""

    qkv: Linear                    # [q_out + 2 * kv_out, d]
    qkv_sizes: tuple[int, int, int]
    o: Linear
    gate_up: Linear                # [2 * intermediate, d]
    down: Linear


def _fuse_layer(layer, pack: bool) -> _Fused:
    """Concatenate projections, then point the model's own modules at views of the result,
    so the weights exist once and the Hugging Face model keeps working unchanged; `pack`: lay
    the weights out for oneDNN as well (`linear.py`)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv_w = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], "weight")
    qkv_b = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], "bias")
    gate_up_w = _fuse([mlp.gate_proj, mlp.up_proj], "weight")
    gate_up_b = _fuse([mlp.gate_proj, mlp.up_proj], "bias")
    sizes = (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features)
    return _Fused(Linear(qkv_w, qkv_b, pack), sizes,
                  Linear(attn.o_proj.weight, attn.o_proj.bias, pack),
                  Linear(gate_up_w, gate_up_b, pack),
                  Linear(mlp.down_proj.weight, mlp.down_proj.bias, pack))


def _fuse(linears, name: str) -> torch.Tensor | None:
    parts = [getattr(lin, name) for lin in linears]
    if any(p is None for p in parts):
        return None
    fused = torch.cat([p.data for p in parts], dim=0)
    start = 0
    for lin, part in zip(linears, parts):
        rows = part.shape[0]
        getattr(lin, name).data = fused[start:start + rows]
        start += rows
    return fused


def rms_norm(norm: torch.nn.Module, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """The model's own RMSNorm (Qwen3/Llama semantics: statistics in float32, weight applied
    in the input dtype) in one fused op for float32, and for bfloat16 where `fused` (the
    native ops are built: `csrc/fused_ops.cpp`)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    if fused:
        return torch.ops.sparkgrid.rms_norm_bf16(x.contiguous(), norm.weight,
                                                 norm.variance_epsilon)
    normed = F.rms_norm(x.float(), norm.weight.shape, eps=norm.variance_epsilon)
    return norm.weight * normed.to(x.dtype)


def _qk_norm_eps(layers) -> float | None:
    eps = {norm.variance_epsilon for layer in layers
           for norm in (getattr(layer.self_attn, "q_norm", None),
                        getattr(layer.self_attn, "k_norm", None))
           if norm is not None and hasattr(norm, "variance_epsilon")}
    complete = all(hasattr(layer.self_attn, "q_norm") and hasattr(layer.self_attn, "k_norm")
                   for layer in layers)
    return eps.pop() if complete and len(eps) == 1 else None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [N, heads, head_dim]; cos, sin: [N, 1, head_dim] (rotate-half convention of HF)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class TargetRunner:
    """Runs the target over a `ForwardBatch`, writing its keys/values into `kv`."""

    def __init__(self, model: PreTrainedModel, kv: PagedKV, feature_layer_ids: list[int]):
        self.model = model
        self.kv = kv
        self.feature_layer_ids = list(feature_layer_ids)
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size = cfg.vocab_size
        self.heads = (cfg.num_attention_heads,
                      getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        """(query heads, key/value heads)."""
        self.qk_norm_eps = _qk_norm_eps(model.model.layers)
        """The eps of Qwen3's per-head query and key norms where every layer has both with one
        eps (the fused native pass applies them), else None."""
        self.device = kv.device
        self.silu = getattr(cfg, "hidden_act", None) == "silu"  # the fused SwiGLU's activation
        self._backend: str | None = None
        pack = self.backend == "native"  # linear.py: weights laid out for oneDNN
        self.fused = [_fuse_layer(layer, pack) for layer in model.model.layers]
        """Every layer's projections (packed, or widened to float32, on the native backend
        in half precision: `linear.py`)."""
        self.lm_head = Linear(model.lm_head.weight, model.lm_head.bias, pack)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch,
                want_features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns logits `[M, V]` (float32) and, if asked, features `[N, n * d]`."""
        layout = self._layout(batch)
        body = self.model.model
        h = body.embed_tokens(batch.input_ids)  # [N, d]
        feats = [h] if want_features and -1 in self.feature_layer_ids else []
        cos, sin = body.rotary_emb(h[None], layout.positions[None])  # [1, N, head_dim]
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]
        ops = self._native_ops(h)
        if ops:  # the fused ops read [N, D] rows
            cos, sin = cos.contiguous(), sin.contiguous()
        for idx, (layer, fused) in enumerate(zip(body.layers, self.fused)):
            attn_in = rms_norm(layer.input_layernorm, h, ops)
            h = h + self._attention(idx, layer.self_attn, fused, attn_in, cos, sin, layout, ops)
            gate_up = fused.gate_up(rms_norm(layer.post_attention_layernorm, h, ops))
            if ops and self.silu:
                act = torch.ops.sparkgrid.silu_mul_bf16(gate_up)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                act = layer.mlp.act_fn(gate) * up
            h = h + fused.down(act)
            if want_features and idx in self.feature_layer_ids:
                feats.append(h)
        last = rms_norm(body.norm, h[batch.logits_rows], ops)
        logits = self.lm_head(last).float()
        return logits, (torch.cat(feats, dim=-1) if want_features else None)

    def _native_ops(self, h: torch.Tensor) -> bool:
        """Whether this forward uses the fused bfloat16 ops (`csrc/fused_ops.cpp`): on the
        native backend (built with them) in bfloat16; the torch backend stays plain torch."""
        return self.backend == "native" and h.dtype == torch.bfloat16

    def _attention(self, layer_idx, attn, fused, x, cos, sin, layout: _Layout,
                   ops: bool = False) -> torch.Tensor:
        n = x.shape[0]
        qkv = fused.qkv(x)
        if ops and self.qk_norm_eps is not None:  # Qwen3's norms and RoPE in one native pass
            heads, kv_heads = self.heads
            qk = torch.ops.sparkgrid.qk_norm_rotary_bf16(
                qkv, attn.q_norm.weight, attn.k_norm.weight, self.qk_norm_eps, cos, sin,
                heads, kv_heads)
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, (heads + kv_heads) * self.head_dim:].reshape(n, kv_heads, self.head_dim)
            return self._attend(layer_idx, attn, fused, q, k, v, layout)
        q, k, v = qkv.split(fused.qkv_sizes, dim=-1)
        q, k, v = (t.reshape(n, -1, self.head_dim) for t in (q, k, v))
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
            q, k = rms_norm(attn.q_norm, q, ops), rms_norm(attn.k_norm, k, ops)
        qk = torch.cat((q, k), dim=1)
        qk = torch.ops.sparkgrid.rotary_bf16(qk, cos, sin) if ops else _rotate(qk, cos, sin)
        q, k = qk.split((q.shape[1], k.shape[1]), 1)
        return self._attend(layer_idx, attn, fused, q, k, v, layout)

    def _attend(self, layer_idx, attn, fused, q, k, v, layout: _Layout) -> torch.Tensor:
        """Write the new keys and values, attend, project: the layer's attention output."""
        n = q.shape[0]
        self.kv.write(layer_idx, layout.write_slots, k, v)
        if layout.meta is None:
            out = prefill_attention(q, k, v, layout.num_new, attn.scaling)
        else:
            out, _ = paged_attention(q, self.kv.k[layer_idx], self.kv.v[layer_idx], layout.meta,
                                     attn.scaling)
        return fused.o(out.reshape(n, -1))

    def _layout(self, batch: ForwardBatch) -> _Layout:
        for sid, start, n in zip(batch.seq_ids, batch.starts, batch.num_new):
            self.kv.allocator.grow(sid, start + n)
        dev = self.device
        seq_of, offset = packed_index(torch.tensor(batch.num_new, device=dev))  # [N], [N]
        positions = torch.tensor(batch.starts, device=dev)[seq_of] + offset
        tables = self.kv.block_tables(batch.seq_ids)  # [R, max_blocks]
        bs = self.kv.allocator.block_size
        write = tables[seq_of, positions // bs] * bs + positions % bs
        if not any(batch.starts) and not reads_prefill_in_place(
                self.backend, self.kv.k[0].dtype, self.head_dim, bs):
            return _Layout(positions, write, None, list(batch.num_new))  # SDPA on new keys
        # causal: row i of a sequence sees positions [0, start + i]
        kv_len = [s + i + 1 for s, n in zip(batch.starts, batch.num_new) for i in range(n)]
        meta = attention_meta(tables, batch.num_new, kv_len, bs, self.backend)
        return _Layout(positions, write, meta, list(batch.num_new))

    @property
    def linears(self) -> str:
        """How the projections run (`linear.py`): "onednn-packed", "float32" (a widened copy,
        on a CPU without native half-precision matmuls) or "plain"."""
        head = self.lm_head
        return "onednn-packed" if head.packed is not None else (
            "float32" if head.wide is not None else "plain")

    @property
    def packed_bytes(self) -> int:
        """Bytes of the weights held a second time, in oneDNN's layout or in float32
        (`linear.py`)."""
        return sum(lin.packed_bytes for f in self.fused for lin in (f.qkv, f.o, f.gate_up, f.down)
                   ) + self.lm_head.packed_bytes

    @property
    def backend(self) -> str:
        """The paged attention implementation this runner uses (`native` or `torch`)."""
        if self._backend is None:
            self._backend = backend_for(self.device)
        return self._backend


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: list[int],
                      scale: float) -> torch.Tensor:
    """Causal attention of each sequence's packed new tokens over themselves: q [N, heads, dim],
    k, v [N, kv_heads, dim], `counts` tokens a sequence -> [N, heads, dim]."""
    outs, start = [], 0
    for count in counts:
        rows = slice(start, start + count)
        out = sdpa(q[rows].transpose(0, 1)[None], k[rows].transpose(0, 1)[None],
                   v[rows].transpose(0, 1)[None], is_causal=count > 1, scale=scale,
                   enable_gqa=True)  # [1, heads, count, dim]
        outs.append(out[0].transpose(0, 1))
        start += count
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def packed_index(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows packed sequence after sequence (`counts[r]` rows each): the sequence of each
    row and its offset within that sequence, both `[sum(counts)]`."""
    seq_of = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first_row = torch.cumsum(counts, 0) - counts
    return seq_of, torch.arange(seq_of.numel(), device=counts.device) - first_row[seq_of]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, run in float32 for half-precision tensors on a CPU.

    Used for prefills (each sequence over its own new keys) and the drafter's padded path.
    torch's CPU kernel in bfloat16 was measured slow for few queries (one query over 200 keys,
    16 sequences: 1.8 ms against 0.3 ms in float32 on an AVX512-BF16 core), while the
    projections around it gain from bfloat16; float32 only adds precision, and the output
    comes back in the input dtype."""
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                          **kwargs).to(q.dtype)
