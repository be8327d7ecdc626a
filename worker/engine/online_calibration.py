"""Online recalibration of the draft's confidence from the engine's own verification outcomes.

STS (`sts.json`) fits one temperature per draft position on one workload. Acceptance moves with
the workload and, most, with the sampling: measured on the shipped pair over held-out code, the
calibrated prefix survival a_7 was 0.29 where 0.49 of greedy blocks survived, and 0.036 where
0.022 of blocks sampled at T = 1 did. A survival that is too low makes `prefix` verify too
little (and too high, too much).

So the engine keeps, per draft position k and per regime (greedy requests, sampled requests),
a Platt map c'_k = sigmoid(w_k logit(c_k) + b_k) (w_k = 1, b_k = 0 at first). An offset alone
cannot follow what the engine sees: at 16 greedy requests on the shipped pair the blocks
`prefix` verified to the end survived at positions 5-7 0.69-0.74 of the time where an offset
learned on every block predicted 0.61-0.63, while over all blocks it was within 0.03; the
draft is confident too rarely at its last positions, more than it is wrong on average, so the
slope moves too. After each verification every position with a label (accepted, or the first
rejected one: those whose earlier positions were all accepted, which is what c_k is conditioned
on) enters one Newton step of logistic regression on (w_k, b_k): the step's gradient over the
running curvature of the labels seen, each older label weighing (1 - 1/`memory`) less per
newer one (so the map follows a workload that changes), plus a `prior` curvature that keeps
the first steps from jumping on a few labels. Unlike a fixed learning rate it settles in a few
hundred labels whatever the batch width (a first version moved the offset by 0.02 a label's
residual and still trailed the data after 1,400 blocks).

Lossless: the map a step uses is fixed before its draft pass (it comes from earlier steps'
outcomes), and c'_k is a fixed increasing function of c_k (w_k >= `min_scale` > 0), so Alg.
1's early-stopping scan still decides on x_{r,j} from a_{r,<=j} alone, as with STS.
Knows: confidences and acceptance counts. Does not know: models, requests or costs.
"""

from __future__ import annotations

import numpy as np
import torch

GREEDY, SAMPLED = 0, 1


class OnlineCalibration:
    """Per-position Platt maps of the confidence, for greedy and for sampled requests,
    learned online (a forgetting Newton step a verification)."""

    def __init__(self, gamma: int, *, memory: float = 2000.0, prior: float = 4.0,
                 limit: float = 4.0, min_scale: float = 0.1, max_scale: float = 10.0):
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"gamma: expected an integer >= 1, got {gamma!r}")
        if not memory >= 1:
            raise ValueError(f"memory: expected a number of labels >= 1, got {memory!r}")
        if not prior > 0:
            raise ValueError(f"prior: expected a curvature > 0, got {prior!r}")
        if not 0 < min_scale <= 1 <= max_scale:
            raise ValueError(f"min_scale, max_scale: expected 0 < min_scale <= 1 <= max_scale, "
                             f"got {min_scale!r}, {max_scale!r}")
        self.gamma, self.memory, self.prior, self.limit = gamma, memory, prior, limit
        self.min_scale, self.max_scale = min_scale, max_scale
        self.scales = torch.ones(2, gamma, dtype=torch.float64)  # [regime, k] w_k
        self.offsets = torch.zeros(2, gamma, dtype=torch.float64)  # [regime, k] b_k
        self.curvature = torch.zeros(2, gamma, 2, 2, dtype=torch.float64)  # forgetting sum
        # of p(1-p) x x^T over labels, x = (logit c_k, 1)
        self.labels = torch.zeros(2, gamma, dtype=torch.long)  # labels seen, for reports

    def apply(self, conf: torch.Tensor, greedy: list[bool]) -> torch.Tensor:
        """conf [S, G] calibrated c_k in (0, 1) -> c'_k [S, G] (float64, on the CPU)."""
        regime = torch.tensor([GREEDY if g else SAMPLED for g in greedy])
        return torch.sigmoid(self.scales[regime] * _logit(conf) + self.offsets[regime])

    def update(self, conf: torch.Tensor, used: torch.Tensor, greedy: list[bool],
               verified: list[int], accepted: list[int]) -> None:
        """After verification: `conf` [S, G], the c_k the step's map was applied to, and
        `used` [S, G], the c'_k it decided with; each row verified `verified[s]` draft
        tokens and accepted `accepted[s]` of them."""
        if used.shape[0] == 0:
            return
        # numpy on a few dozen numbers: a step's host time (torch's small ops cost ~10x)
        k = np.arange(self.gamma)[None, :]
        ver = np.asarray(verified)[:, None]
        acc = np.asarray(accepted)[:, None]
        # accepted positions, then the first rejected one
        labelled = ((k <= acc) & (k < ver)).astype(np.float64)
        p = used.detach().double().cpu().numpy()
        x = _logit(conf).numpy()  # [S, G]
        residual = ((k < acc) - p) * labelled  # [S, G] gradient weights
        weight = p * (1 - p) * labelled  # [S, G] curvature weights
        regimes = np.array([GREEDY if g else SAMPLED for g in greedy])
        for regime in np.unique(regimes):
            rows = regimes == regime
            count = labelled[rows].sum(0)  # [G]
            xr, r, w = x[rows], residual[rows], weight[rows]
            decay = (1.0 - 1.0 / self.memory) ** count  # [G]
            held = self.curvature[regime].numpy()  # [G, 2, 2], updated in place
            held *= decay[:, None, None]
            held[:, 0, 0] += (w * xr * xr).sum(0)
            cross = (w * xr).sum(0)
            held[:, 0, 1] += cross
            held[:, 1, 0] += cross
            held[:, 1, 1] += w.sum(0)
            # the Newton step (held + prior I)^-1 grad, the 2 x 2 inverse written out
            a, b = held[:, 0, 0] + self.prior, held[:, 0, 1]
            d = held[:, 1, 1] + self.prior
            g0, g1 = (r * xr).sum(0), r.sum(0)
            det = a * d - b * b  # > 0: held is positive semi-definite, the prior positive
            scales, offsets = self.scales[regime].numpy(), self.offsets[regime].numpy()
            scales += (d * g0 - b * g1) / det
            offsets += (a * g1 - b * g0) / det
            np.clip(scales, self.min_scale, self.max_scale, out=scales)
            np.clip(offsets, -self.limit, self.limit, out=offsets)
            self.labels[regime] += torch.from_numpy(count.astype(np.int64))


def _logit(conf: torch.Tensor) -> torch.Tensor:
    """logit(c) in float64 on the CPU, c kept inside (0, 1)."""
    return torch.logit(conf.detach().double().cpu().clamp(1e-6, 1 - 1e-6))
