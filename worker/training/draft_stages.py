"""The drafter stages of the pair pipeline: data from the target, DSpark, DFlash, then STS.

Each stage reads what earlier stages wrote under the pipeline's output directory and writes
one directory of its own, complete or not at all, so `build_pair` can skip or resume it:

    DIR/draft_data/    the target's own answers to train-split prefixes, with its features
    DIR/dspark/        the DSpark drafter (vanilla Markov head, confidence head), released format
    DIR/dflash/        the DFlash-style baseline (markov_rank = 0), same depth, data and steps
    DIR/*_train/       their checkpoints and training logs
    DIR/dspark/sts.json  confidence temperatures fitted on held-out prefixes
    DIR/*/draft_vocab.json  tokens ranked by how often the target wrote them (`draft_vocab`)

Knows: which prompts each stage uses and the order of things. Does not know: how data is made
or drafters are trained (`draft_data`, `draft_train`) or how STS is fitted (`calibration`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace

from worker.engine.calibration import calibrate_sts
from worker.engine.config import EngineConfig, SamplingParams
from worker.engine.draft_checkpoint import default_target_layer_ids
from worker.engine.draft_vocab import save_ranking
from worker.engine.engine import LLMEngine
from worker.training.draft_data import (
    MANIFEST_NAME,
    DraftDataConfig,
    DraftDataset,
    build_draft_data,
)
from worker.training.draft_train import SUMMARY_NAME, DraftTrainConfig, dflash_variant, train_draft


@dataclass(frozen=True)
class DraftPipelineConfig:
    """Sizes of the drafter stages."""

    num_prompts: int = 1536
    """Train-split prefixes the target answers for the drafter's data."""
    prompt_tokens: int = 128
    """Tokens per prefix (cut at a line start)."""
    greedy_prompts: int = 3072
    """Further train-split prefixes (other ones) answered greedily: sampled answers alone leave
    the greedy path, where a small target falls into repetition loops, out of the drafter's
    data (measured: T = 0 tau 2.8 against 3.2 at T = 1 without them). 3,072 with the
    one-layer drafter measured no better than 1,536 (held-out T = 0 tau 3.807 against 3.81,
    T = 1 2.72 against 2.90); the shipped two-layer drafters use 3,072. 0: none."""
    num_feature_layers: int = 3
    """Target layers whose hidden states feed the drafter (spread below the last layer)."""
    data: dict = field(default_factory=dict)
    """`DraftDataConfig` overrides (layer ids are filled in here)."""
    train: DraftTrainConfig = DraftTrainConfig()
    """The DSpark drafter's training; the DFlash baseline is `dflash_variant` of it."""
    sts_prompts: int = 512
    """Held-out prefixes verified under `fixed` to fit STS."""
    sts_max_tokens: int = 96
    """Tokens generated per STS prompt."""


def corpus_prefixes(docs, tokenizer, count: int, num_tokens: int, seed: int) -> list[list[int]]:
    """`count` token-id prefixes of about `num_tokens`, each starting at a random line of a
    document drawn in turn from a seeded shuffle of `docs`."""
    rng = random.Random(seed)
    order = list(docs)
    rng.shuffle(order)
    prefixes: list[list[int]] = []
    attempts = 0
    while len(prefixes) < count and attempts < 20 * count:
        doc = order[attempts % len(order)]
        attempts += 1
        lines = doc.text.splitlines(keepends=True)
        start = rng.randrange(len(lines)) if lines else 0
        ids = tokenizer("".join(lines[start:start + 4 * num_tokens]),
                        add_special_tokens=False).input_ids[:num_tokens]
        if len(ids) >= num_tokens // 2:
            prefixes.append(ids)
    if len(prefixes) < count:
        raise ValueError(f"the corpus gave only {len(prefixes)} prefixes of >= {num_tokens // 2} "
                         f"tokens; {count} wanted")
    return prefixes


def _layer_ids(ctx) -> tuple[int, ...]:
    cfg = json.loads((ctx.out / "target" / "config.json").read_text())
    return tuple(default_target_layer_ids(cfg["num_hidden_layers"],
                                          ctx.config.draft.num_feature_layers))


def run_draft_data(ctx) -> dict:
    cfg = ctx.config.draft
    return _build_data(ctx, "draft_data", cfg.num_prompts, seed=1,
                       data_cfg=DraftDataConfig(target_layer_ids=_layer_ids(ctx), **cfg.data))


def run_draft_data_greedy(ctx) -> dict:
    cfg = ctx.config.draft
    return _build_data(ctx, "draft_data_greedy", cfg.greedy_prompts, seed=4,
                       data_cfg=DraftDataConfig(target_layer_ids=_layer_ids(ctx),
                                                **{**cfg.data, "temperature": 0.0}))


def _build_data(ctx, name: str, count: int, seed: int, data_cfg: DraftDataConfig) -> dict:
    prompts = corpus_prefixes(ctx.corpus.train, ctx.tokenizer, count,
                              ctx.config.draft.prompt_tokens, seed=seed)
    build_draft_data(ctx.out / "target", prompts, ctx.out / name, data_cfg)
    manifest = json.loads((ctx.out / name / MANIFEST_NAME).read_text())
    return {"prompts": len(prompts), "shards": len(manifest.get("shards", [])),
            "temperature": data_cfg.temperature}


def _data_dirs(ctx) -> list:
    dirs = [ctx.out / "draft_data"]
    return dirs + [ctx.out / "draft_data_greedy"] if ctx.config.draft.greedy_prompts else dirs


def _train(ctx, name: str, config: DraftTrainConfig) -> dict:
    mask_id = ctx.tokenizer.mask_token_id
    if config.mask_token_id is None:
        config = replace(config, mask_token_id=mask_id)
    vocab_size = json.loads((ctx.out / "target" / "config.json").read_text())["vocab_size"]
    write_token_ranking(_data_dirs(ctx), ctx.out / name, vocab_size)
    summary = train_draft(ctx.out / "target", _data_dirs(ctx), ctx.out / name,
                          ctx.out / f"{name}_train", config)
    return {k: v for k, v in summary.items() if k != "train_config"}


def write_token_ranking(data_dirs, out_dir, vocab_size: int) -> None:
    """The drafter's `draft_vocab.json`: tokens by how often the target wrote them in the
    answers it trains on (for serving with a reduced draft vocabulary)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_ranking(DraftDataset(data_dirs).answer_token_counts(vocab_size), out_dir)


def run_dspark(ctx) -> dict:
    return _train(ctx, "dspark", ctx.config.draft.train)


def run_dflash(ctx) -> dict:
    return _train(ctx, "dflash", dflash_variant(ctx.config.draft.train))


def run_sts(ctx) -> dict:
    """Fit the DSpark confidence temperatures on held-out prefixes (never trained on)."""
    cfg = ctx.config.draft
    prompts = corpus_prefixes(ctx.corpus.heldout, ctx.tokenizer, cfg.sts_prompts,
                              cfg.prompt_tokens, seed=2)
    engine = LLMEngine.from_pretrained(str(ctx.out / "target"), str(ctx.out / "dspark"),
                                       EngineConfig(policy="fixed", profile_sps=False,
                                                    record_confidence=True))
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=cfg.sts_max_tokens)
              for i in range(len(prompts))]
    metrics = calibrate_sts(engine, prompts, params, draft_dir=ctx.out / "dspark")
    return {k: metrics[k] for k in ("temperatures", "ece_before", "ece_after", "auc_before",
                                    "auc_after", "num_fit", "num_heldout")}


def draft_stages(stage_type) -> list:
    """The stages in pipeline order, as `build_pair.Stage`s."""
    def complete(name: str, marker: str):
        return lambda ctx: (ctx.out / name / marker).exists()

    return [
        stage_type("draft_data", run_draft_data, lambda ctx: _data_complete(ctx, "draft_data")),
        stage_type("draft_data_greedy", run_draft_data_greedy,
                   lambda ctx: (not ctx.config.draft.greedy_prompts
                                or _data_complete(ctx, "draft_data_greedy"))),
        stage_type("dspark", run_dspark, complete("dspark", SUMMARY_NAME)),
        stage_type("dflash", run_dflash, complete("dflash", SUMMARY_NAME)),
        stage_type("sts", run_sts, complete("dspark", "sts.json")),
    ]


def _data_complete(ctx, name: str) -> bool:
    path = ctx.out / name / MANIFEST_NAME
    if not path.exists():
        return False
    manifest = json.loads(path.read_text())
    return len(manifest["shards"]) == manifest["num_shards"]
