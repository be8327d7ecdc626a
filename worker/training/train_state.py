"""Training bookkeeping on disk: atomic checkpoints and a JSON-lines log.

A checkpoint holds everything a run needs to continue exactly: model, optimizer and
learning-rate schedule states, RNG states, the step, the data position (windows consumed) and
the elapsed time, plus the settings that shaped the run so a resume with different ones is
refused. It is written to a temporary file and renamed into place, so a crash mid-write leaves
the previous one intact.

Knows: files. Does not know: what is being trained.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(work_dir: Path, state: dict) -> Path:
    """Write `state` plus the current RNG states to `work_dir/checkpoint.pt`, atomically."""
    path = Path(work_dir) / CHECKPOINT_NAME
    tmp = path.with_suffix(".pt.tmp")
    torch.save({**state, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(work_dir: Path) -> dict | None:
    """The saved state (RNG states restored as a side effect), or None when there is none."""
    path = Path(work_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, not a download
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state


def check_same_run(saved: dict, current: dict, what: str, work_dir: Path) -> None:
    """Refuse to resume when a setting that shapes the run changed since the checkpoint."""
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume from {Path(work_dir) / CHECKPOINT_NAME}: {what} changed "
                         f"({details}); use the original settings, or delete the checkpoint to "
                         "start over")


class JsonlLog:
    """Appends one JSON object per line and flushes, so the log survives a crash."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        record.setdefault("time", round(time.time(), 3))
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
