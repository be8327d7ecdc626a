"""Writing DSpark draft checkpoints in the released format (docs/DSPARK.md 5).

Scope: ``save_dspark_checkpoint`` writes ``config.json`` + ``model.safetensors`` from a model or
state dict; ``random_dspark_checkpoint`` makes a randomly initialised draft for any Hugging Face
target config (tests, smoke runs, the starting point of training); ``draft_config_dict`` builds
the config dict itself.

Not in scope: training (``worker/training``), loading and validation
(``drafter.DSparkDraft.from_pretrained``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig, Qwen3Config

from worker.engine.draft_config import DraftConfig
from worker.engine.drafter import DSparkDraft, RMSNorm

# Qwen3 fields a non-Qwen3 target (e.g. Llama) shares and passes on to the draft's config.
_SHARED_QWEN3_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id",
    "rope_parameters",  # transformers >= 5: theta and scaling in one dict
)


def save_dspark_checkpoint(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
                           draft_config_dict: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors``; the config is validated first."""
    DraftConfig.from_json_dict(draft_config_dict, source="draft_config_dict")
    state = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module)
             else model_or_state_dict)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dict(draft_config_dict), indent=2) + "\n")
    # clone: safetensors refuses tensors that share memory (e.g. tied embeddings)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def draft_config_dict(target_config: PretrainedConfig, *, num_layers: int, gamma: int,
                      target_layer_ids: list[int], mask_token_id: int, markov_rank: int,
                      head_type: str, confidence: bool, confidence_with_markov: bool,
                      num_anchors: int = 512) -> dict[str, Any]:
    """The target's config in Qwen3 form plus the DSpark keys of docs/DSPARK.md 5."""
    target_config = target_config.get_text_config()
    if target_config.model_type == "qwen3":
        d = target_config.to_diff_dict()
    else:  # released drafts are Qwen3 models: carry over the fields a Qwen3 config has
        t = target_config.to_dict()
        if t.get("head_dim") is None:
            t["head_dim"] = t["hidden_size"] // t["num_attention_heads"]
        d = Qwen3Config(**{k: t[k] for k in _SHARED_QWEN3_FIELDS if k in t}).to_diff_dict()
    if "layer_types" in d:
        d["layer_types"] = ["full_attention"] * num_layers
    d.update(
        model_type="qwen3", architectures=["Qwen3DSparkModel"],
        num_hidden_layers=num_layers, num_target_layers=target_config.num_hidden_layers,
        block_size=gamma, target_layer_ids=list(target_layer_ids), mask_token_id=mask_token_id,
        markov_rank=markov_rank, markov_head_type=head_type,
        enable_confidence_head=confidence, confidence_head_with_markov=confidence_with_markov,
        num_anchors=num_anchors, tie_word_embeddings=False,
    )
    return d


def random_dspark_checkpoint(target_config: PretrainedConfig, out_dir: str | Path, *,
                             num_layers: int = 1, head_type: str = "vanilla",
                             markov_rank: int = 16, confidence: bool = True,
                             confidence_with_markov: bool = True,
                             target_layer_ids: list[int] | None = None, gamma: int = 4,
                             mask_token_id: int | None = None, seed: int = 0,
                             target_model: nn.Module | None = None) -> str | Path:
    """Write a randomly initialised draft for ``target_config`` and return ``out_dir``.

    Defaults: ``target_layer_ids`` spread over the target's layers (never the last one),
    ``mask_token_id`` = the last vocabulary id. With ``target_model`` the draft's
    ``embed_tokens`` and ``lm_head`` are copies of the target's, as in the recipe
    (docs/DSPARK.md 4).
    """
    text_config = target_config.get_text_config()
    if target_layer_ids is None:
        target_layer_ids = default_target_layer_ids(text_config.num_hidden_layers, num_layers)
    if mask_token_id is None:
        mask_token_id = text_config.vocab_size - 1
    config_dict = draft_config_dict(
        target_config, num_layers=num_layers, gamma=gamma, target_layer_ids=target_layer_ids,
        mask_token_id=mask_token_id, markov_rank=markov_rank, head_type=head_type,
        confidence=confidence, confidence_with_markov=confidence_with_markov)
    model = DSparkDraft(DraftConfig.from_json_dict(config_dict))
    _random_init(model, torch.Generator().manual_seed(seed))
    if target_model is not None:
        with torch.no_grad():
            model.embed_tokens.weight.copy_(target_model.get_input_embeddings().weight)
            model.lm_head.weight.copy_(target_model.get_output_embeddings().weight)
    save_dspark_checkpoint(model, config_dict, out_dir)
    return out_dir


def default_target_layer_ids(num_target_layers: int, num_ids: int) -> list[int]:
    """``num_ids`` layers spread evenly from layer 1 to layer L-3, DeepSpec's spacing (gives
    [1, 9, 17, 25, 33] for the 36-layer Qwen3-4B); small targets use 0..L-2 instead."""
    lo, hi = 1, num_target_layers - 3
    if hi - lo + 1 < num_ids:
        lo, hi = 0, num_target_layers - 2
    num_ids = max(1, min(num_ids, hi - lo + 1))
    if num_ids == 1:
        return [(lo + hi) // 2]
    return sorted({round(lo + i * (hi - lo) / (num_ids - 1)) for i in range(num_ids)})


@torch.no_grad()
def _random_init(model: DSparkDraft, gen: torch.Generator) -> None:
    """Weights and biases ~ N(0, 0.02); RMSNorm weights ~ 1 + N(0, 0.1), so that a test can
    tell whether each norm was applied."""
    for module in model.modules():
        for p in module.parameters(recurse=False):
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1 + 0.1 * noise if isinstance(module, RMSNorm) else 0.02 * noise)
