"""Tiny local models for the engine demo and the tests, built from local data only.

Builds a byte-level BPE tokenizer trained on standard-library source, randomly initialised
Qwen3 / Llama targets that `AutoModelForCausalLM.from_pretrained` loads, and a matching random
DSpark draft. They stand in for the shipped model pair until it exists: their text is gibberish,
but shapes, special tokens and file formats are real. Nothing here is cached globally (callers
pass a directory) and nothing is downloaded. Training real models is not this module's job.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from worker.training.tokenizer import EOS_TOKEN, MASK_TOKEN, train_byte_bpe  # noqa: F401

# Training text: fixed, so a given Python version always yields the same tokenizer.
CORPUS_MODULES = (
    "textwrap", "string", "json.decoder", "json.encoder", "argparse", "dataclasses",
    "functools", "collections", "heapq", "bisect", "random", "statistics", "fractions",
)
# Multi-byte samples, so merges exist beyond ASCII and round-trips are tested on real text.
MULTIBYTE_SAMPLE = (
    "Café crème brûlée, naïve façade, Ærøskøbing, Łódź, São Paulo, Zürich.\n"
    "Здравствуй, мир. Γειά σου κόσμε. שלום עולם. مرحبا بالعالم.\n"
    "你好，世界。日本語のテキスト、カタカナとひらがな。한국어 문장입니다.\n"
    "Emoji: 🚀✨🔥👍🏽 👩‍💻 🇫🇷 — “quotes” … ½ € ∑ ∞ ≠ ≤\n"
)

_FAMILIES = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def corpus_text() -> list[str]:
    """The tokenizer's training documents: module sources, then the multi-byte sample."""
    sources = [inspect.getsource(importlib.import_module(name)) for name in CORPUS_MODULES]
    return sources + [MULTIBYTE_SAMPLE] * 8


def build_tokenizer(out_dir, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer of `vocab_size` entries and save it to `out_dir`."""
    return train_byte_bpe(corpus_text(), out_dir, vocab_size)


def build_target(
    out_dir,
    family: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    head_dim: int | None = None,
    vocab_size: int | None = None,
) -> Path:
    """Save a randomly initialised `family` ("qwen3" or "llama") causal LM and `tokenizer` to
    `out_dir`. `head_dim` defaults to hidden_size / num_heads; `vocab_size` to the tokenizer's
    (a larger one gives a real model's output layer; ids past the tokenizer decode to "")."""
    if family not in _FAMILIES:
        raise ValueError(f"family must be one of {sorted(_FAMILIES)}, got {family!r}")
    config_cls, model_cls = _FAMILIES[family]
    config = config_cls(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        # Wider than the usual 0.02: random weights then give varied greedy text, not one token
        # repeated.
        initializer_range=0.15,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = model_cls(config)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_demo_pair(out_dir, *, family: str = "qwen3", head_type: str = "vanilla",
                    seed: int = 0) -> tuple[Path, Path]:
    """Build a tiny target (with tokenizer) and a random DSpark draft for it under `out_dir`.

    Returns (target_dir, draft_dir).
    """
    # Imported here so the tokenizer and target builders work without the engine package.
    from worker.engine.draft_checkpoint import random_dspark_checkpoint

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir / "target")
    target_dir = build_target(out_dir / "target", family, tokenizer, seed=seed)
    target = AutoModelForCausalLM.from_pretrained(target_dir)
    draft_dir = random_dspark_checkpoint(
        target.config,
        out_dir / "draft",
        head_type=head_type,
        mask_token_id=tokenizer.mask_token_id,
        seed=seed,
        target_model=target,
    )
    return target_dir, Path(draft_dir)
