"""The DSpark draft model's configuration, parsed from a checkpoint's ``config.json``.

Scope: the released DeepSpec format (docs/DSPARK.md section 5): the target's Qwen3 config plus the
DSpark keys. ``DraftConfig`` holds the fields the draft model needs and validates what can be
checked without the target; ``check_fits_target`` checks that a draft fits a given target.

Not in scope: reading files or tensors (``drafter.DSparkDraft.from_pretrained``), writing
checkpoints (``draft_checkpoint``), anything about the engine's cache or sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")

_REQUIRED = object()


class DraftCheckpointError(ValueError):
    """A draft checkpoint is malformed or does not fit the target model."""


@dataclass(frozen=True)
class DraftConfig:
    """What the draft model needs from ``config.json``; immutable and validated on creation."""

    # --- Qwen3 fields (copied from the target's config) ---
    vocab_size: int
    """Vocabulary size ``V``; must equal the target's."""
    hidden_size: int
    """Hidden size ``d``; must equal the target's (context features are target hidden states)."""
    num_hidden_layers: int
    """Number of *draft* decoder layers (5 in the released checkpoints)."""
    num_attention_heads: int
    """Query heads per draft layer."""
    num_key_value_heads: int
    """Key/value heads per draft layer (GQA); divides ``num_attention_heads``."""
    head_dim: int
    """Per-head width; Qwen3 sets it explicitly, otherwise
    ``hidden_size // num_attention_heads``."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm in the draft."""
    rope_theta: float
    """RoPE base, the target's."""
    rope_scaling: Mapping[str, Any] | None
    """The target's RoPE scaling dict (``rope_type`` ...), or None for plain RoPE."""
    max_position_embeddings: int
    """The target's maximum position (used by scaled RoPE variants)."""
    attention_bias: bool
    """Whether q/k/v/o projections carry a bias (False for Qwen3)."""
    # --- DSpark keys (docs/DSPARK.md section 5) ---
    num_target_layers: int
    """The target's layer count ``L``."""
    block_size: int
    """``gamma``: block slots per draft pass and draft tokens per block (7 when released)."""
    target_layer_ids: tuple[int, ...]
    """Target layers whose hidden states form the context features; -1 = embedding output."""
    mask_token_id: int
    """Token id filling block slots 1..gamma-1 behind the anchor."""
    markov_rank: int
    """Rank ``r`` of the Markov head; 0 = no Markov head (a DFlash-style draft)."""
    markov_head_type: str | None
    """``"vanilla"``, ``"gated"`` or ``"rnn"``; None when ``markov_rank`` is 0."""
    enable_confidence_head: bool
    """Whether the checkpoint has a confidence head (``confidence_head.proj``)."""
    confidence_head_with_markov: bool
    """Whether the confidence head also reads ``W1[x_{k-1}]`` (only when ``markov_rank > 0``)."""
    num_anchors: int | None = None
    """Anchor blocks per training sequence; training only, kept for the record."""
    hidden_act: str = "silu"
    """MLP activation; the Qwen3 draft layer is SwiGLU, so only ``silu`` is accepted."""

    def __post_init__(self) -> None:
        problems = _intrinsic_problems(self)
        if problems:
            raise DraftCheckpointError("invalid draft config: " + "; ".join(problems))

    @property
    def gamma(self) -> int:
        return self.block_size

    @property
    def confidence_uses_markov(self) -> bool:
        """The confidence head reads ``[h_k ; W1[x_{k-1}]]`` rather than ``h_k`` alone."""
        return (self.enable_confidence_head and self.confidence_head_with_markov
                and self.markov_rank > 0)

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "DraftConfig":
        """Parse a checkpoint's ``config.json`` dict; errors name ``source`` and the key."""
        r = _Reader(d, source)
        hidden = r.get("hidden_size", int)
        heads = r.get("num_attention_heads", int)
        rope_params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
        markov_rank = r.get("markov_rank", int)
        enable_conf = r.get("enable_confidence_head", bool)
        return cls(
            vocab_size=r.get("vocab_size", int),
            hidden_size=hidden,
            num_hidden_layers=r.get("num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=r.get("num_key_value_heads", int, heads),
            head_dim=r.get("head_dim", int, hidden // heads if heads > 0 else 0),
            intermediate_size=r.get("intermediate_size", int),
            rms_norm_eps=r.get("rms_norm_eps", float),
            # transformers >= 5 writes the RoPE settings as one `rope_parameters` dict.
            rope_theta=r.get("rope_theta", float, rope_params.get("rope_theta", 10000.0)),
            rope_scaling=r.get("rope_scaling", dict, _scaling_of(rope_params)),
            max_position_embeddings=r.get("max_position_embeddings", int, 32768),
            attention_bias=r.get("attention_bias", bool, False),
            num_target_layers=r.get("num_target_layers", int),
            block_size=r.get("block_size", int),
            target_layer_ids=tuple(r.get("target_layer_ids", list)),
            mask_token_id=r.get("mask_token_id", int),
            markov_rank=markov_rank,
            markov_head_type=r.get("markov_head_type", str) if markov_rank > 0 else None,
            enable_confidence_head=enable_conf,
            confidence_head_with_markov=(
                r.get("confidence_head_with_markov", bool) if enable_conf else False
            ),
            num_anchors=r.get("num_anchors", int, None),
            hidden_act=r.get("hidden_act", str, "silu"),
        )


def check_fits_target(draft: DraftConfig, target_config: Any) -> None:
    """Raise ``DraftCheckpointError`` naming every way ``draft`` does not fit the target.

    ``target_config``: a transformers config (or a plain dict) of the target model.
    """
    if hasattr(target_config, "get_text_config"):
        target_config = target_config.get_text_config()
    get = target_config.get if isinstance(target_config, Mapping) else (
        lambda key: getattr(target_config, key, None))
    problems = []  # what DraftConfig checks on its own was checked when it was made
    t_vocab, t_hidden, t_layers = get("vocab_size"), get("hidden_size"), get("num_hidden_layers")
    if draft.vocab_size != t_vocab:
        problems.append(f"vocabulary size {draft.vocab_size} != target vocab_size {t_vocab}")
    if draft.hidden_size != t_hidden:
        problems.append(f"hidden size {draft.hidden_size} != target hidden_size {t_hidden}")
    if draft.num_target_layers != t_layers:
        problems.append(
            f"num_target_layers {draft.num_target_layers} != target num_hidden_layers {t_layers}")
    if isinstance(t_layers, int):
        last = t_layers - 1
        for i in draft.target_layer_ids:
            if not -1 <= i <= last:
                problems.append(f"target layer id {i} is out of range [-1, {last}]")
            elif i == last:
                # docs/DSPARK.md 2: the final target layer is never a context feature.
                problems.append(f"target layer id {i} is the target's last layer ({last})")
    if problems:
        raise DraftCheckpointError("draft does not fit the target: " + "; ".join(problems))


def _intrinsic_problems(c: DraftConfig) -> list[str]:
    """What is wrong with ``c`` on its own, without looking at the target."""
    problems = []
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "intermediate_size"):
        if getattr(c, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(c, name)}")
    if c.num_key_value_heads >= 1 and c.num_attention_heads % c.num_key_value_heads:
        problems.append(f"num_attention_heads {c.num_attention_heads} is not a multiple of "
                        f"num_key_value_heads {c.num_key_value_heads}")
    if c.block_size < 1:
        problems.append(f"block_size must be >= 1, got {c.block_size}")
    if not 0 <= c.mask_token_id < c.vocab_size:
        problems.append(f"mask_token_id {c.mask_token_id} is outside "
                        f"[0, vocab_size={c.vocab_size})")
    ids = c.target_layer_ids
    if not ids:
        problems.append("target_layer_ids is empty")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        problems.append(f"target_layer_ids {list(ids)} are not strictly increasing")
    if any(i < -1 for i in ids):
        problems.append(f"target_layer_ids {list(ids)} contain an id below -1")
    if c.markov_rank < 0:
        problems.append(f"markov_rank must be >= 0, got {c.markov_rank}")
    if c.markov_rank > 0 and c.markov_head_type not in MARKOV_HEAD_TYPES:
        problems.append(f"unknown markov_head_type {c.markov_head_type!r}; "
                        f"expected one of {list(MARKOV_HEAD_TYPES)}")
    if c.hidden_act != "silu":
        problems.append(f"hidden_act {c.hidden_act!r} is not supported; "
                        "the draft MLP is SwiGLU (silu)")
    return problems


def _scaling_of(rope_parameters: Mapping[str, Any]) -> dict[str, Any] | None:
    """The scaling part of a transformers >= 5 `rope_parameters` dict (None: plain RoPE)."""
    if rope_parameters.get("rope_type", "default") == "default":
        return None
    return {k: v for k, v in rope_parameters.items() if k != "rope_theta"}


class _Reader:
    """Typed access to a config dict with errors that name the file and the key."""

    def __init__(self, d: Mapping[str, Any], source: str):
        self.d, self.source = d, source

    def get(self, key: str, kind: type, default: Any = _REQUIRED) -> Any:
        value = self.d.get(key)
        if value is None:
            if default is _REQUIRED:
                raise DraftCheckpointError(f"{self.source}: missing required key {key!r}")
            return default
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if kind is list and ok and not all(isinstance(v, int) and not isinstance(v, bool)
                                           for v in value):
            ok = False
        if not ok:
            raise DraftCheckpointError(
                f"{self.source}: key {key!r} should be {kind.__name__}"
                f"{' of ints' if kind is list else ''}, got {value!r}")
        return value
