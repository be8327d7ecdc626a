"""The shipped target: a small Qwen3 causal LM trained from scratch on standard-library source.

`target_config` gives the architecture (docs/DSPARK.md section 4: 6 layers, width 256, 4 query
and 2 key/value heads of 64, SwiGLU 768, untied embeddings; about 8.9M parameters with an 8k
vocabulary, 4.7M of them outside the embedding and output matrices). `train_target` trains it:
EOS-joined documents cut into fixed windows in a seeded order (`lm_data`), AdamW with a linear
warmup then a cosine decay to a tenth of the peak rate, gradient clipping, a held-out loss
(mean nats per predicted token) at the start, every `eval_every` steps and at the end,
checkpoints that let a rerun continue exactly as if never stopped, and finally
`save_pretrained` of the model and tokenizer.

Knows: the target's architecture and training loop. Does not know: the drafter, or which
stages run (see `build_pair`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import Qwen3Config, Qwen3ForCausalLM

from worker.training.corpus import Corpus
from worker.training.lm_data import batch_at, token_windows
from worker.training.train_state import JsonlLog, check_same_run, load_checkpoint, save_checkpoint

SUMMARY_NAME = "training.json"
"""Written into the output directory last: its presence means the target is complete."""
DEFAULT_TARGET_TOKENS = 3_200_000
"""About 42 minutes on an otherwise idle 2-core AVX2 CPU (the full config trains at ~1,300
tokens/s in float32 there, 8 x 512 windows), plus ~2 minutes of evaluation and checkpoints.
About 1.05 passes over the 3.05M-token train split."""


def target_config(vocab_size: int, eos_token_id: int, pad_token_id: int,
                  **overrides) -> Qwen3Config:
    """The shipped target's Qwen3 config; keyword `overrides` (e.g. tiny sizes for tests)
    replace defaults."""
    params = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, intermediate_size=768,
                  max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False)
    unknown = sorted(set(overrides) - set(Qwen3Config().to_dict()))
    if unknown:
        raise ValueError(f"unknown Qwen3Config fields {unknown}; "
                         f"expected names such as {sorted(params)}")
    params.update(overrides)
    return Qwen3Config(vocab_size=vocab_size, bos_token_id=None, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, **params)


@dataclass(frozen=True)
class TrainConfig:
    """How the target is trained. Fields above `eval_tokens` shape the result; a resume must
    keep them."""

    target_tokens: int = DEFAULT_TARGET_TOKENS
    """Token budget: the run takes target_tokens // (batch_size * seq_len) optimizer steps."""
    seq_len: int = 512
    """Tokens per training window."""
    batch_size: int = 8
    """Windows per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    warmup_frac: float = 0.02
    """Fraction of the steps spent warming up linearly from zero."""
    final_lr_frac: float = 0.1
    """The cosine decay ends at this fraction of the peak rate."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, on matrices only (not norm gains)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this."""
    seed: int = 0
    """Seeds the initial weights and the data order."""
    bf16_autocast: bool = False
    """Run matmuls in bfloat16 (weights, optimizer and loss stay float32): ~1.4x faster on CPUs
    with AVX512-BF16, with the same loss curve as float32 in our measurement, but over 10x slower
    on CPUs without it (bfloat16 is then emulated). Off by default: float32 runs everywhere."""
    eval_tokens: int = 65536
    """At most this many held-out tokens per evaluation (whole windows, always the same ones)."""
    eval_every: int = 250
    """Evaluate every this many steps (0: only at the start and the end)."""
    log_every: int = 10
    """Write a training log line every this many steps."""
    checkpoint_minutes: float = 5.0
    """Write a checkpoint when this much wall time has passed since the last one."""
    checkpoint_every: int = 0
    """Also write one every this many steps (0: by time only)."""
    stop_after_steps: int | None = None
    """Pause: checkpoint and return after this many steps in this call (a rerun resumes)."""

    def __post_init__(self):
        for name in ("target_tokens", "seq_len", "batch_size", "eval_tokens", "log_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if self.target_tokens < self.tokens_per_step:
            raise ValueError(f"target_tokens: expected at least one step of "
                             f"{self.tokens_per_step} tokens, got {self.target_tokens}")
        if not (0 <= self.warmup_frac < 1 and 0 <= self.final_lr_frac <= 1 and self.lr > 0):
            raise ValueError(f"expected lr > 0, warmup_frac in [0, 1), final_lr_frac in [0, 1]; "
                             f"got {self.lr}, {self.warmup_frac}, {self.final_lr_frac}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        return self.target_tokens // self.tokens_per_step

    def trajectory(self) -> dict:
        """The fields a resumed run must share with the checkpoint."""
        fields = ("target_tokens", "seq_len", "batch_size", "lr", "warmup_frac", "final_lr_frac",
                  "weight_decay", "grad_clip", "seed", "bf16_autocast")
        return {k: getattr(self, k) for k in fields}


def lr_factor(step: int, total_steps: int, warmup_frac: float, final_frac: float) -> float:
    """Multiplier of the peak rate for optimizer step `step` (0-based): linear warmup, cosine
    to `final_frac`."""
    warmup = max(1, round(total_steps * warmup_frac))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int) -> float:
    """Mean cross-entropy in nats per predicted token over `windows` ([num_windows, seq_len])."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size]  # [batch, seq_len]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]  # [batch, seq_len - 1, vocab]
        targets = ids[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                   targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return total / count


def heldout_windows(tokenizer, corpus: Corpus, seq_len: int, eval_tokens: int) -> torch.Tensor:
    """The first whole windows of the held-out stream, at most `eval_tokens` tokens.
    # [n, seq_len]"""
    windows = token_windows(tokenizer, corpus.heldout, seq_len)
    if windows.shape[0] == 0:
        raise ValueError(f"the held-out split has fewer than seq_len={seq_len} tokens; "
                         f"expected at least one window")
    return windows[: max(1, eval_tokens // seq_len)]


def train_target(corpus: Corpus, tokenizer, out_dir, work_dir, *, model_config: Qwen3Config,
                 train: TrainConfig = TrainConfig(), resume: bool = True) -> dict:
    """Train (or resume) the target; save it with the tokenizer to `out_dir` when done.

    `work_dir` holds `checkpoint.pt` and `log.jsonl`. Returns a summary dict; its `finished`
    is False when `train.stop_after_steps` paused the run.
    """
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    train_windows = token_windows(tokenizer, corpus.train, train.seq_len)  # [num_windows, seq_len]
    if train_windows.shape[0] < train.batch_size:
        raise ValueError(f"the train split has {train_windows.shape[0]} windows of "
                         f"{train.seq_len} tokens; expected at least batch_size={train.batch_size}")
    eval_windows = heldout_windows(tokenizer, corpus, train.seq_len, train.eval_tokens)
    model, optimizer, lr_schedule = _build(model_config, train)
    log = JsonlLog(work_dir / "log.jsonl")
    state = (_restore(work_dir, model, optimizer, lr_schedule, model_config, train)
             if resume else None)
    if state is None:
        state = {"step": 0, "position": 0, "elapsed_s": 0.0,
                 "initial_heldout_loss": evaluate(model, eval_windows, train.batch_size)}
        log.write(step=0, tokens=0, heldout_loss=state["initial_heldout_loss"], elapsed_s=0.0)
    finished = _Loop(model, optimizer, lr_schedule, train_windows, eval_windows, train, state, log,
                     work_dir).run()
    summary = {"finished": finished, "steps": state["step"],
               "tokens": state["step"] * train.tokens_per_step,
               "initial_heldout_loss": state["initial_heldout_loss"],
               "elapsed_s": round(state["elapsed_s"], 1),
               "num_params": sum(p.numel() for p in model.parameters()),
               "train_windows": train_windows.shape[0], "eval_tokens": eval_windows.numel(),
               "train_config": asdict(train)}
    if finished:
        summary["final_heldout_loss"] = evaluate(model, eval_windows, train.batch_size)
        log.write(step=state["step"], tokens=summary["tokens"],
                  heldout_loss=summary["final_heldout_loss"], elapsed_s=summary["elapsed_s"],
                  final=True)
        _save_final(model, tokenizer, out_dir, summary)
    return summary


def _build(model_config: Qwen3Config, train: TrainConfig):
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(train.seed)
        model = Qwen3ForCausalLM(model_config).float().train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # RMSNorm gains
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=train.lr, betas=(0.9, 0.95), eps=1e-8)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, train.total_steps, train.warmup_frac, train.final_lr_frac))
    return model, optimizer, lr_schedule


def _restore(work_dir, model, optimizer, lr_schedule, model_config, train) -> dict | None:
    saved = load_checkpoint(work_dir)
    if saved is None:
        return None
    check_same_run(saved["model_config"], _comparable(model_config), "the model config", work_dir)
    check_same_run(saved["trajectory"], train.trajectory(), "the training settings", work_dir)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    lr_schedule.load_state_dict(saved["scheduler"])
    return saved["progress"]


def _checkpoint(work_dir, model, optimizer, lr_schedule, model_config, train, state) -> None:
    save_checkpoint(work_dir, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": lr_schedule.state_dict(), "progress": dict(state),
                               "model_config": _comparable(model_config),
                               "trajectory": train.trajectory()})


def _comparable(config: Qwen3Config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "transformers_version"}


class _Loop:
    """The step loop of one call: optimizer steps, plus logging, evaluation and checkpoints
    between them."""

    def __init__(self, model, optimizer, lr_schedule, windows, eval_windows, train: TrainConfig,
                 state: dict, log: JsonlLog, work_dir: Path):
        self.model, self.optimizer, self.lr_schedule = model, optimizer, lr_schedule
        self.windows, self.eval_windows = windows, eval_windows  # [num_windows, seq_len] each
        self.train, self.state, self.log, self.work_dir = train, state, log, work_dir
        self.start_step, self.start_elapsed, self.start_time = (state["step"], state["elapsed_s"],
                                                                time.monotonic())
        self.last_checkpoint = self.interval_start = time.monotonic()
        self.interval_losses: list[float] = []

    def run(self) -> bool:
        """Steps until the budget is spent (True) or `stop_after_steps` pauses the run (False)."""
        train, state = self.train, self.state
        with tqdm(total=train.total_steps, initial=state["step"], desc="target", unit="step",
                  mininterval=5.0) as bar:
            while state["step"] < train.total_steps:
                if (train.stop_after_steps is not None
                        and state["step"] - self.start_step >= train.stop_after_steps):
                    self.checkpoint()
                    return False
                self.interval_losses.append(self.step())
                bar.update(1)
                if state["step"] % train.log_every == 0 or state["step"] == train.total_steps:
                    bar.set_postfix_str(self.log_interval())
                if (train.eval_every and state["step"] % train.eval_every == 0
                        and state["step"] < train.total_steps):
                    self.log.write(step=state["step"], tokens=self.tokens(),
                                   elapsed_s=round(state["elapsed_s"], 1),
                                   heldout_loss=evaluate(self.model, self.eval_windows,
                                                         train.batch_size))
                    self.interval_start = time.monotonic()  # evaluation time is not training time
                if self.checkpoint_due():
                    self.checkpoint()
        return True

    def step(self) -> float:
        """One optimizer step on the next batch; returns its training loss."""
        train, state = self.train, self.state
        # [batch, seq_len]
        ids = batch_at(self.windows, state["position"], train.batch_size, train.seed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train.bf16_autocast):
            loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["position"] += train.batch_size
        state["elapsed_s"] = self.start_elapsed + time.monotonic() - self.start_time
        return loss.item()

    def tokens(self) -> int:
        return self.state["step"] * self.train.tokens_per_step

    def log_interval(self) -> str:
        now = time.monotonic()
        loss = sum(self.interval_losses) / len(self.interval_losses)
        speed = (len(self.interval_losses) * self.train.tokens_per_step
                 / max(1e-9, now - self.interval_start))
        self.log.write(step=self.state["step"], tokens=self.tokens(), loss=loss,
                       lr=self.lr_schedule.get_last_lr()[0], tokens_per_s=round(speed, 1),
                       elapsed_s=round(self.state["elapsed_s"], 1))
        self.interval_losses, self.interval_start = [], now
        return f"loss={loss:.3f} tok/s={speed:.0f}"

    def checkpoint_due(self) -> bool:
        step, train = self.state["step"], self.train
        return (step == train.total_steps
                or bool(train.checkpoint_every and step % train.checkpoint_every == 0)
                or time.monotonic() - self.last_checkpoint >= 60 * train.checkpoint_minutes)

    def checkpoint(self) -> None:
        _checkpoint(self.work_dir, self.model, self.optimizer, self.lr_schedule, self.model.config,
                    self.train, self.state)
        self.last_checkpoint = time.monotonic()


def _save_final(model, tokenizer, out_dir: Path, summary: dict) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # last: marks completion
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
