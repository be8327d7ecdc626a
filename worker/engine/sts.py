"""Sequential Temperature Scaling (STS) of the confidence head, and its calibration metrics.

The raw confidence c_k = sigmoid(z_k) is over-confident. STS (docs/DSPARK.md section 3) fits one
temperature t_k per draft position, k = 1..G in turn, minimising the expected calibration error
of the prefix survival a_k = prod_{j<=k} sigmoid(z_j / t_j) with t_{<k} already fixed. A positive
temperature is monotone, so each position's ranking (and its AUC) is unchanged.

Labels come from verification logs: accepted[m, k] is 1 when draft token k was accepted given
1..k-1 were, 0 when it was rejected, -1 when unknown (not verified, or after a rejection).

Scope: fitting on held-out logs, applying, metrics, and the `sts.json` file.
Not here: collecting the logs (the engine) or using the calibrated values (verify_policy).
"""

import json
import math
from pathlib import Path

import torch

STS_FILE = "sts.json"
STS_VERSION = 1


def expected_calibration_error(
    pred: torch.Tensor,  # [N] probabilities
    label: torch.Tensor,  # [N] 0/1
    num_bins: int = 15,
) -> float:
    """ECE over equal-width bins of [0, 1], each bin weighted by its share of samples."""
    if pred.numel() == 0:
        return math.nan
    pred, label = pred.double().reshape(1, -1).cpu(), label.double().reshape(-1).cpu()
    return float(_ece_rows(pred, label, num_bins)[0])


def roc_auc(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U); tied scores share their average
    rank. NaN when the labels hold only one class."""
    pred, label = pred.double().reshape(-1).cpu(), label.reshape(-1).cpu().bool()
    num_pos = int(label.sum())
    num_neg = label.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        return math.nan
    values, inverse, counts = torch.unique(pred, return_inverse=True, return_counts=True)
    first_rank = torch.cumsum(counts, 0) - counts + 1  # 1-based rank where each value starts
    avg_rank = first_rank.double() + (counts.double() - 1) / 2  # [num_unique]
    pos_rank_sum = float(avg_rank[inverse][label].sum())
    return (pos_rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def survival_labels(accepted: torch.Tensor) -> torch.Tensor:  # [M, G] int8 -> [M, G] int8
    """Prefix-survival label of each position: did tokens 1..k all survive?

    Look at the first entry among 1..k that is not 1: none -> 1 (all accepted); a 0 -> 0 (an
    earlier or this position was rejected, so the prefix through k cannot survive, whatever
    follows); a -1 -> -1 (unknown: verification stopped before deciding).
    """
    acc = accepted.long()
    not_accepted = acc != 1  # [M, G]
    seen_other = torch.cumsum(not_accepted.long(), dim=1) > 0  # [M, G]
    first_pos = torch.argmax(not_accepted.long(), dim=1)  # [M] first non-1 (0 when none)
    first_val = acc.gather(1, first_pos[:, None])  # [M, 1]
    labels = torch.where(seen_other, first_val.expand_as(acc), torch.ones_like(acc))
    return labels.to(torch.int8)


def default_grid() -> torch.Tensor:  # [301]
    """Temperatures 0.25..8, geometric, 60 points per octave (1.0 is on the grid)."""
    return 2.0 ** torch.linspace(-2.0, 3.0, 301, dtype=torch.float64)


def fit_sts(
    conf_logits: torch.Tensor,  # [M, G] raw confidence logits z
    accepted: torch.Tensor,  # [M, G] int8: 1 accepted, 0 rejected, -1 unknown
    grid: "torch.Tensor | None" = None,  # [T] candidate temperatures, all > 0
) -> list[float]:
    """Per-position temperatures t_1..t_G, fitted left to right (DSpark STS).

    Position k uses only rows whose prefix-survival label through k is known; with none, t_k
    stays 1.0. Among equally good temperatures the first in the grid wins.

    The logs must come from verifying every draft position (fixed policy), so that -1 only
    follows a rejection. If a row stops verifying early without a rejection, its later labels
    are unknown while rows rejected early stay known zeros: the known rows then over-represent
    failures and the fit comes out under-confident.
    """
    if conf_logits.shape != accepted.shape or conf_logits.dim() != 2:
        raise ValueError(
            f"conf_logits and accepted must both be [M, G]; got {tuple(conf_logits.shape)} "
            f"and {tuple(accepted.shape)}"
        )
    grid = (default_grid() if grid is None else grid.double().reshape(-1)).cpu()
    if grid.numel() == 0 or not bool((grid > 0).all()):
        raise ValueError("STS grid must be non-empty with positive temperatures")
    logits = conf_logits.detach().double().cpu()
    labels = survival_labels(accepted.cpu())
    temperatures: list[float] = []
    prefix = torch.ones(logits.shape[0], dtype=torch.float64)  # [M] a_{k-1}
    for k in range(logits.shape[1]):
        known = labels[:, k] >= 0  # [M]
        best_t = 1.0
        if bool(known.any()):
            cand = prefix[known][None, :] * torch.sigmoid(logits[known, k][None, :] / grid[:, None])
            ece = _ece_rows(cand, labels[known, k].double())  # [T]
            best_t = float(grid[int(torch.argmin(ece))])
        temperatures.append(best_t)
        prefix = prefix * torch.sigmoid(logits[:, k] / best_t)
    return temperatures


def apply_sts(conf_logits: torch.Tensor, temperatures: list[float]) -> torch.Tensor:
    """Calibrated confidence c_k = sigmoid(z_k / t_k); [..., G] -> [..., G] float32."""
    temps = torch.tensor(temperatures, dtype=torch.float32, device=conf_logits.device)
    if conf_logits.shape[-1] != temps.numel():
        raise ValueError(
            f"{temps.numel()} STS temperatures for {conf_logits.shape[-1]} draft positions"
        )
    return torch.sigmoid(conf_logits.float() / temps)


def survival(confidence: torch.Tensor) -> torch.Tensor:
    """Prefix survival a_k = c_1 * ... * c_k along the last dimension."""
    return torch.cumprod(confidence, dim=-1)


def save_sts(path_dir: "str | Path", temperatures: list[float], metrics: dict) -> Path:
    """Write `sts.json` into `path_dir`; non-finite metric values are stored as null."""
    temps = [float(t) for t in temperatures]
    if not all(math.isfinite(t) and t > 0 for t in temps):
        raise ValueError(f"STS temperatures must be finite and positive; got {temps}")
    path = Path(path_dir) / STS_FILE
    data = {"version": STS_VERSION, "temperatures": temps, "metrics": _finite_or_none(metrics)}
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    return path


def load_sts(path_dir: "str | Path") -> "list[float] | None":
    """Temperatures from `path_dir/sts.json`; None when there is no such file."""
    path = Path(path_dir) / STS_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("version") != STS_VERSION:
        raise ValueError(f"{path}: expected an object with \"version\": {STS_VERSION}")
    temps = data.get("temperatures")
    if (not isinstance(temps, list) or not temps
            or not all(_is_number(t) and math.isfinite(t) and t > 0 for t in temps)):
        raise ValueError(f"{path}: \"temperatures\" must be a non-empty list of positive numbers")
    if not isinstance(data.get("metrics", {}), dict):
        raise ValueError(f"{path}: \"metrics\" must be an object")
    return [float(t) for t in temps]


def _ece_rows(
    pred: torch.Tensor,  # [T, N] float64, each row one set of predictions
    label: torch.Tensor,  # [N] float64 0/1
    num_bins: int = 15,
    max_elements: int = 1 << 22,
) -> torch.Tensor:  # [T] float64
    """ECE of every row of `pred` against the same labels, in chunks of rows."""
    num_rows, n = pred.shape
    chunk = max(1, max_elements // max(n, 1))
    out = []
    for start in range(0, num_rows, chunk):
        p = pred[start:start + chunk]  # [C, N]
        c = p.shape[0]
        bins = (p * num_bins).long().clamp(0, num_bins - 1)  # [C, N]
        flat = (bins + num_bins * torch.arange(c)[:, None]).reshape(-1)  # [C*N]
        size = c * num_bins
        conf_sum = torch.zeros(size, dtype=torch.float64).index_add_(0, flat, p.reshape(-1))
        label_sum = torch.zeros(size, dtype=torch.float64).index_add_(
            0, flat, label.expand(c, n).reshape(-1))
        # sum_b (n_b / N) |mean_b(pred) - mean_b(label)| = sum_b |sum_b(pred - label)| / N
        out.append(((conf_sum - label_sum).abs().reshape(c, num_bins).sum(1)) / n)
    return torch.cat(out)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_or_none(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
