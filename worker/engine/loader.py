"""Loading what an engine serves: a target, its tokenizer and a DSpark drafter, and wiring them.

`load_models` is the one loader: `LLMEngine.from_pretrained` calls it, and so does every
benchmark that builds an engine over models it loads itself (one target under several
drafters: `EngineModels.with_draft`). The helpers below it are what the engine derives from
the models when it is built (shared frozen tensors, end-of-sequence ids, the reduced draft
vocabulary).

Knows: model directories (or hub ids), the drafter's side files (`sts.json`,
`draft_vocab.json`), the devices and dtypes of an `EngineConfig`. Does not know: caches,
requests, or how a step runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from worker.engine.config import EngineConfig
from worker.engine.draft_vocab import RANKING_NAME, DraftVocab, load_ranking
from worker.engine.drafter import DSparkDraft
from worker.engine.model_runner import load_target, load_tokenizer
from worker.engine.sts import load_sts


@dataclass(frozen=True)
class EngineModels:
    """The models of one engine, as loaded: what `LLMEngine.from_models` takes."""

    target: torch.nn.Module
    """The Qwen3/Llama causal LM (eval mode, on the config's device and dtype)."""
    tokenizer: object
    """The target's tokenizer."""
    draft: DSparkDraft | None = None
    """The DSpark drafter, or None (plain decoding only)."""
    sts: list[float] | None = None
    """The drafter's STS temperatures (`sts.json` beside its weights), or None."""
    ranking: list[int] | None = None
    """The drafter's token ranking (`draft_vocab.json`), or None."""

    def with_draft(self, draft: str | Path, config: EngineConfig) -> "EngineModels":
        """These models with the drafter at `draft` (a directory or hub id) in place of any
        other: one loaded target serves several drafters in turn."""
        model = DSparkDraft.from_pretrained(draft, self.target.config,
                                            device=config.torch_device, dtype=config.torch_dtype)
        sts = ranking = None
        if Path(draft).is_dir():  # a hub id ships neither side file
            sts = load_sts(draft)
            ranking = load_ranking(draft, model.config.vocab_size)
        return replace(self, draft=model, sts=sts, ranking=ranking)


def load_models(target: str | Path, draft: str | Path | None = None,
                config: EngineConfig | None = None) -> EngineModels:
    """Load a Qwen3/Llama target and its tokenizer (local directory or hub id) and, when given,
    a DSpark draft checkpoint, on `config`'s device and dtype."""
    config = config or EngineConfig()
    model = load_target(str(target), device=config.torch_device, dtype=config.torch_dtype)
    models = EngineModels(model, load_tokenizer(str(target)))
    return models.with_draft(draft, config) if draft is not None else models


def share_frozen_copies(draft: DSparkDraft, target) -> list[str]:
    """Point the drafter's embedding and ``lm_head`` at the target's when they hold the same
    values (docs/DSPARK.md 2: the released drafters ship frozen copies of them). A copy costs
    memory (about 0.8 GB for Qwen3-4B in bf16) and, on a CPU, cache room on every step. Returns
    the names of the shared tensors; a drafter trained with its own ones keeps them."""
    pairs = (("embed_tokens", target.get_input_embeddings()),
             ("lm_head", target.get_output_embeddings()))
    shared = []
    for name, target_module in pairs:
        mine = getattr(draft, name).weight
        theirs = getattr(target_module, "weight", None)
        if (theirs is not None and mine.shape == theirs.shape and mine.dtype == theirs.dtype
                and mine.device == theirs.device and torch.equal(mine, theirs)):
            getattr(draft, name).weight = theirs
            shared.append(name)
    return shared


def draft_vocab(draft: DSparkDraft | None, ranking: list[int] | None,
                size: int) -> DraftVocab | None:
    """The tokens a draft pass may propose (`draft_vocab_size` of them); None: all of them."""
    if not size or draft is None:
        return None
    if ranking is None:
        raise ValueError("draft_vocab_size: a reduced draft vocabulary needs the draft's "
                         f"token ranking ({RANKING_NAME} beside its weights); this draft "
                         "has none (use 0, the full vocabulary)")
    return DraftVocab.build(draft, ranking, size)


def eos_ids(target, tokenizer, config: EngineConfig) -> frozenset[int]:
    """Every id that ends a request: the config's extra ones, the generation config's, the
    model config's and the tokenizer's."""
    ids = set(config.extra_eos_token_ids)
    gen_eos = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, target.config.eos_token_id, tokenizer.eos_token_id):
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return frozenset(ids)
