"""Training a DSpark drafter, or its DFlash baseline, against a frozen target (docs/DSPARK.md 4).

The drafter starts as `random_dspark_checkpoint` with the target's embedding and `lm_head`
copied in; those two stay frozen and everything else trains. Each step takes `batch_size`
sequences of the target's own answers (`draft_data`) in a seeded epoch order and
`num_anchors` anchor blocks per sequence drawn from a generator seeded by (seed, step), so a
run's data position is its step. AdamW, linear warmup then cosine decay, gradient clipping,
float32. Checkpoints (`train_state`) let a rerun continue exactly as if never stopped. The
result is saved in the released format (`save_dspark_checkpoint`): it loads with
`DSparkDraft.from_pretrained`, serves with `LLMEngine.from_pretrained(target, out_dir)`, and
`calibrate_sts` writes its `sts.json` beside it.

The DFlash baseline (`dflash_variant`) is the same config with `markov_rank = 0`: same backbone,
data and steps, and a confidence head on `h_k` alone trained with the same BCE term. It can
then run under every verification policy, and the only difference from DSpark is the Markov
head (and what the confidence head reads).

Knows: the drafter, the optimiser, the loop. Does not know: how the data is made, the engine.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from worker.engine.draft_checkpoint import random_dspark_checkpoint, save_dspark_checkpoint
from worker.engine.draft_config import MARKOV_HEAD_TYPES
from worker.engine.drafter import DSparkDraft
from worker.engine.model_runner import load_target, load_tokenizer
from worker.training.draft_data import DraftDataset
from worker.training.draft_forward import (
    LossWeights,
    dspark_loss,
    sample_anchors,
    teacher_forced_blocks,
)
from worker.training.lm_data import epoch_order
from worker.training.target import lr_factor
from worker.training.train_state import JsonlLog, check_same_run, load_checkpoint, save_checkpoint

FROZEN = ("embed_tokens.weight", "lm_head.weight")
"""Copies of the target's, never trained (docs/DSPARK.md 4)."""
SUMMARY_NAME = "training.json"
"""Written into the output directory last: its presence means the drafter is complete."""


@dataclass(frozen=True)
class DraftTrainConfig:
    """The drafter and how it is trained. Fields above `log_every` shape the result."""

    num_layers: int = 2
    """Draft decoder layers (two: held-out T = 0 tau 4.11 against 3.81 with one, on the same
    data and steps)."""
    markov_rank: int = 256
    """Rank r of the Markov head; 0 = no head (the DFlash baseline)."""
    markov_head_type: str = "vanilla"
    """`vanilla`, `gated` or `rnn` (ignored at rank 0)."""
    confidence: bool = True
    """Train a confidence head (needed by the `threshold` and `prefix` policies)."""
    confidence_with_markov: bool = True
    """The confidence head reads [h_k ; W1[x_{k-1}]] (h_k alone at rank 0)."""
    gamma: int = 7
    """Block size: draft tokens per block."""
    mask_token_id: int | None = None
    """Filler of block slots 2..gamma; None = the target tokenizer's mask token."""
    batch_size: int = 8
    """Sequences per step."""
    num_anchors: int = 24
    """Anchor blocks per sequence per step (fewer when a sequence has fewer label positions)."""
    steps: int = 1600
    """Optimizer steps."""
    lr: float = 1e-3
    """Peak learning rate."""
    warmup_frac: float = 0.02
    """Fraction of the steps spent warming up linearly from zero."""
    final_lr_frac: float = 0.1
    """The cosine decay ends at this fraction of the peak rate."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay, on matrices only."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this."""
    loss: LossWeights = field(default_factory=LossWeights)
    """Loss coefficients and position decay."""
    seed: int = 0
    """Seeds the initial weights, the data order and the anchors."""
    log_every: int = 10
    """Write a log line (means over the interval) every this many steps."""
    checkpoint_every: int = 100
    """Write a checkpoint every this many steps (0: by time only)."""
    checkpoint_minutes: float = 5.0
    """Also write one when this much wall time has passed since the last."""
    stop_after_steps: int | None = None
    """Pause: checkpoint and return after this many steps in this call (a rerun resumes)."""

    def __post_init__(self):
        for name in ("num_layers", "gamma", "batch_size", "num_anchors", "steps", "log_every"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if self.markov_rank < 0 or self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise ValueError(f"expected markov_rank >= 0 and markov_head_type in "
                             f"{MARKOV_HEAD_TYPES}; got {self.markov_rank}, "
                             f"{self.markov_head_type!r}")
        if not (0 <= self.warmup_frac < 1 and 0 <= self.final_lr_frac <= 1 and self.lr > 0):
            raise ValueError(f"expected lr > 0, warmup_frac in [0, 1), final_lr_frac in [0, 1]; "
                             f"got {self.lr}, {self.warmup_frac}, {self.final_lr_frac}")

    def trajectory(self) -> dict:
        """The fields a resumed run must share with the checkpoint."""
        shaping = asdict(self)
        for name in ("log_every", "checkpoint_every", "checkpoint_minutes", "stop_after_steps"):
            shaping.pop(name)
        return shaping


def dflash_variant(config: DraftTrainConfig) -> DraftTrainConfig:
    """The DFlash baseline of `config`: no Markov head, confidence from h_k alone."""
    return replace(config, markov_rank=0, confidence_with_markov=False)


def train_draft(target_dir: str | Path, data_dir: str | Path | list, out_dir: str | Path,
                work_dir: str | Path, config: DraftTrainConfig = DraftTrainConfig()) -> dict:
    """Train (or resume) a drafter for the target; save it to `out_dir` when done.

    `data_dir` is one data directory or a list of them (combined). `work_dir` holds the initial
    draft (`init/`), `checkpoint.pt` and `log.jsonl`. Returns a summary dict; its `finished` is
    False when `config.stop_after_steps` paused the run.
    """
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    data = DraftDataset(data_dir)
    draft = _initial_draft(target_dir, data, work_dir / "init", config)
    optimizer, lr_schedule = _optimizer(draft, config)
    state = _restore(work_dir, draft, optimizer, lr_schedule, config, data)
    if state is None:
        state = {"step": 0, "elapsed_s": 0.0}
    log = JsonlLog(work_dir / "log.jsonl")
    finished = _run_steps(draft, optimizer, lr_schedule, data, config, state, log, work_dir)
    summary = {"finished": finished, "steps": state["step"],
               "elapsed_s": round(state["elapsed_s"], 1),
               "num_params": sum(p.numel() for p in draft.parameters()),
               "num_trained_params": sum(p.numel() for p in draft.parameters() if p.requires_grad),
               "num_sequences": len(data), "train_config": asdict(config)}
    if finished:
        config_dict = json.loads((work_dir / "init" / "config.json").read_text())
        config_dict["num_anchors"] = config.num_anchors
        save_dspark_checkpoint(draft, config_dict, out_dir)
        (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")  # last: complete
    return summary


def _initial_draft(target_dir, data: DraftDataset, init_dir: Path,
                   config: DraftTrainConfig) -> DSparkDraft:
    """A random draft fitted to the target (its embedding and lm_head copied in), in float32,
    with everything but the frozen copies trainable. Written to `init_dir` (the same every time)."""
    target = load_target(str(target_dir), device=torch.device("cpu"), dtype=torch.float32)
    data.check_fits(target.config)
    mask_token_id = config.mask_token_id
    if mask_token_id is None:
        mask_token_id = load_tokenizer(str(target_dir)).mask_token_id
        if mask_token_id is None:
            raise ValueError(f"{target_dir}: the tokenizer has no mask token; give mask_token_id")
    random_dspark_checkpoint(
        target.config, init_dir, num_layers=config.num_layers, head_type=config.markov_head_type,
        markov_rank=config.markov_rank, confidence=config.confidence,
        confidence_with_markov=config.confidence_with_markov and config.markov_rank > 0,
        target_layer_ids=list(data.target_layer_ids), gamma=config.gamma,
        mask_token_id=mask_token_id, seed=config.seed, target_model=target)
    draft = DSparkDraft.from_pretrained(init_dir, target.config, dtype=torch.float32).train()
    for name, p in draft.named_parameters():
        p.requires_grad_(name not in FROZEN)
    return draft


def _optimizer(draft: DSparkDraft, config: DraftTrainConfig):
    trained = [p for p in draft.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0}]  # gains, biases
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, config.steps, config.warmup_frac, config.final_lr_frac))
    return optimizer, lr_schedule


def _restore(work_dir, draft, optimizer, lr_schedule, config, data) -> dict | None:
    saved = load_checkpoint(work_dir)
    if saved is None:
        return None
    check_same_run(saved["trajectory"], config.trajectory(), "the training settings", work_dir)
    check_same_run(saved["data"], _data_identity(data), "the training data", work_dir)
    draft.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    lr_schedule.load_state_dict(saved["scheduler"])
    return saved["progress"]


def _checkpoint(work_dir, draft, optimizer, lr_schedule, config, data, state) -> None:
    save_checkpoint(work_dir, {"model": draft.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": lr_schedule.state_dict(), "progress": dict(state),
                               "trajectory": config.trajectory(), "data": _data_identity(data)})


def _data_identity(data: DraftDataset) -> dict:
    ids = [{"prompts_sha256": m["prompts_sha256"], "config": m["config"], "target": m["target"]}
           for m in data.manifests]
    return ids[0] if len(ids) == 1 else {"combined": ids}


def train_step(draft: DSparkDraft, optimizer, lr_schedule, data: DraftDataset,
               config: DraftTrainConfig, step: int) -> dict:
    """One optimizer step at data position `step`; returns its metrics."""
    batch = data.batch(_sequence_indices(len(data), step, config.batch_size, config.seed))
    generator = torch.Generator().manual_seed((1 << 40) + (config.seed << 24) + step)
    anchors, anchor_valid = sample_anchors(batch, config.num_anchors, generator)
    loss, metrics = dspark_loss(teacher_forced_blocks(draft, batch, anchors, anchor_valid),
                                config.loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trained = [p for p in draft.parameters() if p.requires_grad]
    metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trained, config.grad_clip))
    optimizer.step()
    lr_schedule.step()
    return metrics


def _sequence_indices(num_seqs: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The sequences of step `step`: positions step*B .. step*B+B-1 of the seeded epoch orders."""
    orders = {}
    indices = []
    for p in range(step * batch_size, (step + 1) * batch_size):
        epoch = p // num_seqs
        if epoch not in orders:
            orders[epoch] = epoch_order(num_seqs, seed, epoch)
        indices.append(int(orders[epoch][p % num_seqs]))
    return indices


def _run_steps(draft, optimizer, lr_schedule, data, config: DraftTrainConfig, state: dict,
               log: JsonlLog, work_dir: Path) -> bool:
    """Steps until the budget is spent (True) or `stop_after_steps` pauses the run (False)."""
    start_time, start_elapsed, start_step = time.monotonic(), state["elapsed_s"], state["step"]
    last_ckpt = interval_start = time.monotonic()
    interval: list[dict] = []
    save = lambda: _checkpoint(work_dir, draft, optimizer, lr_schedule, config, data, state)  # noqa: E731
    bar = tqdm(total=config.steps, initial=state["step"], desc="draft", unit="step",
               mininterval=5.0)
    while state["step"] < config.steps:
        if (config.stop_after_steps is not None
                and state["step"] - start_step >= config.stop_after_steps):
            save()
            bar.close()
            return False
        interval.append(train_step(draft, optimizer, lr_schedule, data, config, state["step"]))
        state["step"] += 1
        state["elapsed_s"] = start_elapsed + time.monotonic() - start_time
        bar.update(1)
        step = state["step"]
        if step % config.log_every == 0 or step == config.steps:
            step_s = (time.monotonic() - interval_start) / len(interval)
            means = _mean_metrics(interval)
            log.write(step=step, **means, lr=lr_schedule.get_last_lr()[0], step_s=round(step_s, 4),
                      elapsed_s=round(state["elapsed_s"], 1))
            bar.set_postfix(loss=f"{means['loss']:.3f}", step_s=f"{step_s:.2f}")
            interval, interval_start = [], time.monotonic()
        if ((config.checkpoint_every and step % config.checkpoint_every == 0)
                or time.monotonic() - last_ckpt >= 60 * config.checkpoint_minutes
                or step == config.steps):
            save()
            last_ckpt = time.monotonic()
    bar.close()
    return True


def _mean_metrics(records: list[dict]) -> dict:
    """Means over an interval, elementwise for per-position lists."""
    out = {}
    for key, first in records[0].items():
        if isinstance(first, list):
            out[key] = [round(sum(r[key][k] for r in records) / len(records), 4)
                        for k in range(len(first))]
        else:
            out[key] = sum(r[key] for r in records) / len(records)
    return out
