"""The model pair sparkgrid ships: a small Qwen3 code model trained on the Python standard
library, its DSpark drafter and a DFlash-style baseline, in the released checkpoint format.

Built by `python -m worker.training.build_pair` (its `package` stage writes here). Until that
has been run and committed, `shipped_pair()` is None and callers fall back to other models.
"""

from __future__ import annotations

from pathlib import Path

PAIR_DIR = Path(__file__).parent / "stdlib-pair"


def shipped_pair(drafter: str = "dspark") -> tuple[Path, Path] | None:
    """(target dir, draft dir) of the shipped pair, `drafter` `dspark` or `dflash`; None when
    the pair has not been packaged into this installation."""
    if drafter not in ("dspark", "dflash"):
        raise ValueError(f"drafter: expected 'dspark' or 'dflash', got {drafter!r}")
    target, draft = PAIR_DIR / "target", PAIR_DIR / drafter
    if (target / "config.json").is_file() and (draft / "config.json").is_file():
        return target, draft
    return None
