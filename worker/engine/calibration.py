"""Fit Sequential Temperature Scaling (STS) of a draft's confidence head from the engine's own
verification logs, and write `sts.json` beside the draft.

Runs prompts with the `fixed` policy (every draft position is verified, so the acceptance labels
are complete: docs/DSPARK.md section 3), splits the drafted blocks into a fit half and a held-out
half, fits the per-position temperatures on the first and reports, on the second, the
calibration (ECE) and ranking quality (AUC) of the prefix survival a_k before and after.

Knows: the engine's public API and `sts`. Does not know: the command line, or how the
verify-length policy later uses the calibrated confidence (`verify_policy`).
"""

from __future__ import annotations

import math

import torch

from worker.engine.config import SamplingParams
from worker.engine.sts import (
    apply_sts,
    expected_calibration_error,
    fit_sts,
    roc_auc,
    save_sts,
    survival,
    survival_labels,
)


def calibrate_sts(engine, prompts: list, params: SamplingParams | list[SamplingParams], *,
                  draft_dir, holdout_fraction: float = 0.5, seed: int = 0) -> dict:
    """Generate `prompts` (with one `params`, or one each) under the `fixed` policy, fit STS
    and save it beside the draft; returns the metrics.

    The result holds `temperatures` and, per draft position k, the held-out `ece_before` /
    `ece_after` and `auc_before` / `auc_after` of a_k (None where a position has no known
    label of both classes), plus the record counts. The engine must be idle; it keeps its
    old temperatures, and a new engine loaded from `draft_dir` uses the new ones.
    """
    _check_engine(engine)
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction: expected a number in (0, 1), "
                         f"got {holdout_fraction!r}")
    if not prompts:
        raise ValueError("prompts: expected at least one prompt to calibrate on")
    first = len(engine.confidence_records)
    engine.generate(prompts, params, policy="fixed")
    conf_logits, accepted, num_capped = complete_blocks(engine.confidence_records[first:])
    fit_rows, held_rows = _split(conf_logits.shape[0], holdout_fraction, seed)
    temps = fit_sts(conf_logits[fit_rows], accepted[fit_rows])
    metrics = {
        "num_blocks": conf_logits.shape[0] + num_capped,
        "num_capped_blocks_dropped": num_capped,
        "num_fit": len(fit_rows),
        "num_heldout": len(held_rows),
        **position_metrics(conf_logits[held_rows], accepted[held_rows], temps),
    }
    save_sts(draft_dir, temps, metrics)
    return {"temperatures": temps, **metrics}


def position_metrics(conf_logits: torch.Tensor,  # [M, G] raw confidence logits
                     accepted: torch.Tensor,  # [M, G] int8 acceptance labels
                     temps: list[float] | None) -> dict:
    """Per position k: ECE and AUC of the survival a_k on known labels, raw ('before') and,
    when `temps` are given, with STS ('after')."""
    labels = survival_labels(accepted)  # [M, G]
    preds = {"before": survival(torch.sigmoid(conf_logits.float()))}  # [M, G]
    if temps is not None:
        preds["after"] = survival(apply_sts(conf_logits, temps))  # [M, G]
    out = {"num_known": [], "survival_rate": []}
    out |= {f"{m}_{when}": [] for when in preds for m in ("ece", "auc")}
    for k in range(labels.shape[1]):
        known = labels[:, k] >= 0
        y = labels[known, k]
        out["num_known"].append(int(known.sum()))
        out["survival_rate"].append(float(y.float().mean()) if y.numel() else None)
        for when, pred in preds.items():
            out[f"ece_{when}"].append(_none_if_nan(expected_calibration_error(pred[known, k], y)))
            out[f"auc_{when}"].append(_none_if_nan(roc_auc(pred[known, k], y)))
    return out


def _check_engine(engine) -> None:
    if engine.has_unfinished():  # their blocks would mix into the logs
        raise ValueError("calibration needs an idle engine; it has unfinished requests")
    if not engine.config.record_confidence:
        raise ValueError("calibration needs an engine created with "
                         "EngineConfig(record_confidence=True)")
    if engine.draft is None or not engine.draft.config.enable_confidence_head:
        raise ValueError("calibration needs a draft with a confidence head; this engine's "
                         "draft has none")


def complete_blocks(records) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the records, dropping blocks verified only in part without a rejection.

    Under `fixed` a block is cut short only by a cap (the request's last tokens, or its share
    of the batch), never by its draft tokens. Such a block's later labels are unknown, while a
    block rejected early has known zeros there: keeping it would bias the fit towards failure
    (see `fit_sts`). A capped block rejected before its cap cannot be told apart (the records
    do not carry the verified length) and is kept: a small bias, from at most a few final
    blocks per request.
    """
    if not records:
        raise ValueError("no drafted block was verified: give more prompts or a larger "
                         "max_tokens (each request needs at least two decoding steps)")
    conf_logits = torch.stack([r[0] for r in records]).float()  # [M, G]
    accepted = torch.stack([r[1] for r in records])  # [M, G] int8
    rejected = (accepted == 0).any(dim=1)
    complete = rejected | (accepted == 1).all(dim=1)
    if int(complete.sum()) < 2:
        raise ValueError(f"only {int(complete.sum())} fully verified block(s): give more "
                         "prompts or a larger max_tokens")
    return conf_logits[complete], accepted[complete], int((~complete).sum())


def _split(num_rows: int, holdout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation of the rows: (fit rows, held-out rows), both non-empty."""
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    num_held = min(num_rows - 1, max(1, round(num_rows * holdout_fraction)))
    return order[num_held:], order[:num_held]


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value
