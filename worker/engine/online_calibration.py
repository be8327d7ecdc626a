"""Online recalibration of the draft's confidence from the engine's own verification outcomes.

STS (`sts.json`) fits one temperature per draft position on one workload. Acceptance moves with
the workload and, most, with the sampling: measured on the shipped pair over held-out code, the
calibrated prefix survival a_7 was 0.29 where 0.49 of greedy blocks survived, and 0.036 where
0.022 of blocks sampled at T = 1 did. A survival that is too low makes `prefix` verify too
little (and too high, too much). So the engine keeps, per draft position k and per regime
(greedy requests, sampled requests), a logit offset b_k, and uses c'_k = sigmoid(logit(c_k) +
b_k). After each verification every position with a label (accepted, or the first rejected one:
those whose earlier positions were all accepted, which is what c_k is conditioned on) moves b_k
by one step of online logistic regression, b_k += rate x (label - c'_k) (a step sums at most
16 labels' worth per position, so a wide batch does not overshoot).

Lossless: the offsets a step uses are fixed before its draft pass (they come from earlier
steps' outcomes), and c'_k is a fixed increasing function of c_k, so Alg. 1's early-stopping
scan still decides on x_{r,j} from a_{r,<=j} alone, as with STS.
Knows: confidences and acceptance counts. Does not know: models, requests or costs.
"""

from __future__ import annotations

import torch

GREEDY, SAMPLED = 0, 1


class OnlineCalibration:
    """Per-position logit offsets for greedy and for sampled requests, learned online."""

    def __init__(self, gamma: int, *, rate: float = 0.02, limit: float = 4.0,
                 batch_labels: int = 16):
        if gamma < 1:
            raise ValueError(f"gamma: expected an integer >= 1, got {gamma!r}")
        if not 0 < rate <= 1:
            raise ValueError(f"rate: expected a number in (0, 1], got {rate!r}")
        self.gamma, self.rate, self.limit = gamma, rate, limit
        self.batch_labels = batch_labels
        self.offsets = torch.zeros(2, gamma, dtype=torch.float64)  # [regime, k]
        self.labels = torch.zeros(2, gamma, dtype=torch.long)  # labels seen, for reports

    def apply(self, conf: torch.Tensor, greedy: list[bool]) -> torch.Tensor:
        """conf [S, G] calibrated c_k in (0, 1) -> c'_k [S, G] (float64, on the CPU)."""
        c = conf.detach().double().cpu().clamp(1e-6, 1 - 1e-6)
        regime = torch.tensor([GREEDY if g else SAMPLED for g in greedy])
        return torch.sigmoid(torch.logit(c) + self.offsets[regime])

    def update(self, used: torch.Tensor, greedy: list[bool], verified: list[int],
               accepted: list[int]) -> None:
        """After verification: `used` [S, G], the c'_k the step decided with; each row
        verified `verified[s]` draft tokens and accepted `accepted[s]` of them."""
        if used.shape[0] == 0:
            return
        k = torch.arange(self.gamma)[None, :]
        ver = torch.tensor(verified)[:, None]
        acc = torch.tensor(accepted)[:, None]
        labelled = (k <= acc) & (k < ver)  # accepted positions, then the first rejected one
        residual = ((k < acc).double() - used.double().cpu()) * labelled  # [S, G]
        for g in (True, False):
            rows = torch.tensor([x == g for x in greedy])
            if not rows.any():
                continue
            regime = GREEDY if g else SAMPLED
            count = labelled[rows].sum(0)  # [G]
            # one SGD step per label, at most `batch_labels` labels' worth per step and position
            scale = torch.clamp(count.double() / self.batch_labels, min=1.0)
            step = self.rate * residual[rows].sum(0) / scale
            self.offsets[regime] = (self.offsets[regime] + step).clamp(-self.limit, self.limit)
            self.labels[regime] += count
