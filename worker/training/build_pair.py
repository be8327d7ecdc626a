"""The one command that builds the shipped model pair from local data:

    python -m worker.training.build_pair --out DIR [--smoke] [--stages corpus,tokenizer,...]

Stages run in order; each is skipped when its output in DIR is complete, so rerunning the same
command after an interruption resumes (the target's training continues from its last
checkpoint). Outputs: `DIR/corpus.json` (split summary and module lists), `DIR/tokenizer/`,
`DIR/target/` (Hugging Face model + tokenizer + `training.json`), `DIR/target_train/`
(checkpoint and training log), then the drafter stages' outputs (`draft_stages.py`: the
target's answers, the DSpark and DFlash drafters, STS), and `DIR/log.jsonl` (stage events).
The `package` stage stores the finished pair in float16 under `worker/models/stdlib-pair/`,
where the installed package ships it (a smoke build packages into `DIR/package/` instead).

`--smoke` builds a tiny pair from a capped corpus in well under a minute: it checks the
pipeline, not the model. A directory remembers which mode built it and refuses the other.

Knows: the stage order and where outputs live. Does not know: how each stage works inside.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from worker.engine.model_runner import load_tokenizer
from worker.models import PAIR_DIR
from worker.training.corpus import Corpus, load_corpus
from worker.training.draft_stages import DraftPipelineConfig, draft_stages
from worker.training.draft_train import DraftTrainConfig
from worker.training.package import is_packaged, package_pair
from worker.training.target import SUMMARY_NAME, TrainConfig, target_config, train_target
from worker.training.tokenizer import train_tokenizer
from worker.training.train_state import JsonlLog


@dataclass(frozen=True)
class PipelineConfig:
    """Sizes of everything the pipeline builds."""

    smoke: bool
    """True for the tiny end-to-end check."""
    vocab_size: int
    """Tokenizer entries, special tokens included."""
    target_overrides: dict = field(default_factory=dict)
    """`target_config` keyword overrides (empty: the shipped architecture)."""
    train: TrainConfig = TrainConfig()
    """How the target is trained."""
    max_corpus_bytes: tuple[int, int] | None = None
    """(train, held-out) byte caps on the corpus; None: all of it."""
    draft: DraftPipelineConfig = DraftPipelineConfig()
    """Sizes of the drafter stages."""
    torch_threads: int | None = None
    """Intra-op threads; None keeps torch's default (one per core). Tiny models run faster on one,
    most of all when another process shares the cores."""


FULL = PipelineConfig(smoke=False, vocab_size=8192)
SMOKE = PipelineConfig(
    smoke=True, vocab_size=512, max_corpus_bytes=(400_000, 40_000), torch_threads=1,
    target_overrides=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=128),
    train=TrainConfig(target_tokens=300 * 8 * 64, seq_len=64, batch_size=8, eval_tokens=4096,
                      eval_every=100, log_every=50, checkpoint_every=100),
    draft=DraftPipelineConfig(
        num_prompts=16, greedy_prompts=8, prompt_tokens=24, num_feature_layers=1, sts_prompts=12,
        sts_max_tokens=24,
        data=dict(max_new_tokens=24, seqs_per_shard=8, gen_batch_size=8),
        train=DraftTrainConfig(markov_rank=16, gamma=4, batch_size=4, num_anchors=8, steps=20,
                               log_every=10, checkpoint_every=10)),
)


class Context:
    """What stages share: the output directory, the sizes, the log, and lazily loaded inputs."""

    def __init__(self, out: Path, config: PipelineConfig):
        self.out, self.config = out, config
        self.log = JsonlLog(out / "log.jsonl")

    @cached_property
    def corpus(self) -> Corpus:
        """The corpus, checked against the one the `corpus` stage recorded."""
        corpus = load_corpus()
        if self.config.max_corpus_bytes:
            corpus = corpus.capped(*self.config.max_corpus_bytes)
        recorded = _read_json(self.out / "corpus.json", "run the corpus stage first")
        if recorded["modules"] != _module_lists(corpus):
            raise ValueError(f"{self.out} was built from a different standard library (Python "
                             f"{recorded['python']}, this is {platform.python_version()}); "
                             "use that Python or a new --out directory")
        return corpus

    @cached_property
    def tokenizer(self):
        if not (self.out / "tokenizer").is_dir():
            raise FileNotFoundError(f"{self.out / 'tokenizer'} is missing; "
                                    "run the tokenizer stage first")
        return load_tokenizer(str(self.out / "tokenizer"))


def run_corpus(ctx: Context) -> dict:
    corpus = load_corpus()
    if ctx.config.max_corpus_bytes:
        corpus = corpus.capped(*ctx.config.max_corpus_bytes)
    record = {"python": platform.python_version(), **corpus.summary(),
              "modules": _module_lists(corpus)}
    _write_json(ctx.out / "corpus.json", record)
    return corpus.summary()


def run_tokenizer(ctx: Context) -> dict:
    final, tmp = ctx.out / "tokenizer", ctx.out / "tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = train_tokenizer(ctx.corpus, tmp, vocab_size=ctx.config.vocab_size)
    os.replace(tmp, final)  # the directory appears only once complete
    heldout = tokenizer([d.text for d in ctx.corpus.heldout], add_special_tokens=False)["input_ids"]
    return {"vocab_size": len(tokenizer), "heldout_tokens": sum(map(len, heldout))}


def run_target(ctx: Context) -> dict:
    tok = ctx.tokenizer
    model_config = target_config(len(tok), tok.eos_token_id, tok.pad_token_id,
                                 **ctx.config.target_overrides)
    summary = train_target(ctx.corpus, tok, ctx.out / "target", ctx.out / "target_train",
                           model_config=model_config, train=ctx.config.train)
    return {k: v for k, v in summary.items() if k != "train_config"}


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], dict]
    """Builds the stage's output; returns a summary for the log."""
    done: Callable[[Context], bool]
    """True when the output is complete (the stage is then skipped)."""


STAGES = [
    Stage("corpus", run_corpus, lambda ctx: (ctx.out / "corpus.json").exists()),
    Stage("tokenizer", run_tokenizer, lambda ctx: (ctx.out / "tokenizer").is_dir()),
    Stage("target", run_target, lambda ctx: (ctx.out / "target" / SUMMARY_NAME).exists()),
    *draft_stages(Stage),  # draft_data, draft_data_greedy, dspark, dflash, sts
    Stage("package", lambda ctx: package_pair(ctx.out, _package_dir(ctx)),
          lambda ctx: is_packaged(ctx.out, _package_dir(ctx))),
]


def _package_dir(ctx: Context) -> Path:
    """Where the finished pair goes: into the package (shipped), or beside a smoke build."""
    return ctx.out / "package" if ctx.config.smoke else PAIR_DIR


def build_pair(out, config: PipelineConfig = FULL, stages: list[str] | None = None) -> None:
    """Run `stages` (default: all) of the pipeline in order into `out`, skipping complete ones."""
    names = [s.name for s in STAGES]
    unknown = sorted(set(stages or []) - set(names))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; expected some of {names}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_mode(out, config)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    ctx = Context(out, config)
    for stage in STAGES:
        if stages is not None and stage.name not in stages:
            continue
        if stage.done(ctx):
            ctx.log.write(stage=stage.name, event="skipped")
            print(f"[{stage.name}] complete, skipped", file=sys.stderr)
            continue
        print(f"[{stage.name}] running", file=sys.stderr)
        ctx.log.write(stage=stage.name, event="start")
        start = time.monotonic()
        summary = stage.run(ctx)
        ctx.log.write(stage=stage.name, event="done", elapsed_s=round(time.monotonic() - start, 1),
                      summary=summary)
        print(f"[{stage.name}] done in {time.monotonic() - start:.1f} s: {json.dumps(summary)}",
              file=sys.stderr)


def _check_mode(out: Path, config: PipelineConfig) -> None:
    path = out / "pipeline.json"
    if path.exists():
        built_smoke = _read_json(path, "")["smoke"]
        if built_smoke != config.smoke:
            raise ValueError(f"{out} holds a {'smoke' if built_smoke else 'full'} build; rerun "
                             f"{'with' if built_smoke else 'without'} --smoke "
                             "or use a new --out directory")
    else:
        _write_json(path, {"smoke": config.smoke})


def _module_lists(corpus: Corpus) -> dict:
    return {"train": [d.module for d in corpus.train],
            "heldout": [d.module for d in corpus.heldout]}


def _read_json(path: Path, hint: str) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; {hint}")
    return json.loads(path.read_text())


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.training.build_pair",
                                     description="Build the shipped model pair from local data.")
    parser.add_argument("--out", required=True, help="output directory (created; rerun to resume)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes: an end-to-end check in under a minute")
    parser.add_argument("--stages",
                        help=f"comma-separated subset of {','.join(s.name for s in STAGES)}")
    parser.add_argument("--target-tokens", type=int, help="target training token budget "
                        f"(default {FULL.train.target_tokens:,}; "
                        f"smoke {SMOKE.train.target_tokens:,})")
    parser.add_argument("--eval-tokens", type=int, help="held-out tokens per evaluation")
    args = parser.parse_args(argv)
    config = SMOKE if args.smoke else FULL
    overrides = {k: v for k, v in (("target_tokens", args.target_tokens),
                                   ("eval_tokens", args.eval_tokens))
                 if v is not None}
    try:
        config = replace(config, train=replace(config.train, **overrides))
        build_pair(args.out, config, args.stages.split(",") if args.stages else None)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
