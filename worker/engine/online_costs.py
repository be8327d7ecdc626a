"""How the steps this engine runs compare with the tables the draft gate plans with, online.

The draft gate weighs a step in which some requests draft against one in which nobody does,
with tables profiled at start on stand-in requests (`profiler`). Serving differs from the
profile in ways no table holds: caches are cold after the draft pass, contexts have other
lengths, a burst of deferred draft context is written before a pass. Measured on the shipped
pair at 64 requests on a 2-core CPU: drafting steps ran 12-16% longer than their tables said,
plain steps 0-8% shorter, and the gate drafted where it lost a quarter of the throughput.

So the engine times every decode step that the gate planned (one with a `prefix` row; the
whole step, less the newcomers' prefill) and keeps a running mean of log(measured / predicted
seconds) for drafting and for plain steps apart, per load (the step's rows, in powers of two:
the errors differ with the load). The gate multiplies the predicted time of every subset that
drafts by `drafting_factor(rows)` = exp(mean_drafting - mean_plain): the ratio only, so a
machine that runs faster or slower as a whole (a neighbour's load) changes nothing, and an
error both kinds of step share cancels. Times, not throughputs: which requests the gate lets
draft depends on their estimates, and their tokens would bias the mean (a refresh drafts the
requests whose estimates are worst). Steps of other policies teach it nothing: a `fixed` step
(every row drafting a block a step, so no deferred context to write) or an `ar` one (no draft
pass before it to cool the caches) runs in a regime the gate never chooses. Measured at 16
requests on a 2-core CPU, with `ar` and `fixed` runs before it: their steps set the factor to
0.73-0.80, and `prefix` then drafted in part of its steps and ran 4-11% below both. Until each
kind was seen `warmup` times at a load the factor is 1 there. One observation
moves a mean by at most `rate` x `clip`.

Lossless: the factor a step uses is fixed before its draft pass, from earlier steps, and only
picks which requests draft; verification never sees it. (Which requests draft does change the
schedule of a sampled request's random draws, as the gate's choices always did.)
Also here: `StepOverhead`, the profiled seconds a step spends besides its target forward,
which the gate adds to every step it weighs; and `ContextFlush`, what writing a request's
deferred draft context adds to the step in which it drafts again.
Knows: seconds (and the profiled tables of them), a request's remaining tokens. Does not know:
models or tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from sparkgrid.costs import SPSTable

PLAIN, DRAFTING = 0, 1


class OnlineCosts:
    """Running means of log(measured / predicted) step seconds, for plain and drafting steps
    at each load (rows 1, 2-3, 4-7, ...)."""

    def __init__(self, *, rate: float = 0.05, clip: float = 1.0, warmup: int = 8,
                 limit: float = 1.0):
        if not 0 < rate <= 1:
            raise ValueError(f"rate: expected a number in (0, 1], got {rate!r}")
        if not clip > 0 or not limit > 0:
            raise ValueError(f"clip and limit: expected numbers > 0, got {clip!r}, {limit!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup: expected an integer >= 1, got {warmup!r}")
        self.rate, self.clip, self.warmup, self.limit = rate, clip, warmup, limit
        self.log_ratio: dict[int, list[float]] = {}  # load -> [kind] mean log(measured/pred.)
        self.seen: dict[int, list[int]] = {}  # load -> [kind] steps observed

    def observe(self, rows: int, drafting: bool, predicted: float, measured: float) -> None:
        """One decode step of `rows`: `predicted` seconds by the tables, `measured` by the
        clock. Values that cannot be compared (not positive finite numbers) are ignored."""
        if not (0 < predicted < math.inf and 0 < measured < math.inf) or rows < 1:
            return
        load, kind = _load(rows), DRAFTING if drafting else PLAIN
        means = self.log_ratio.setdefault(load, [0.0, 0.0])
        seen = self.seen.setdefault(load, [0, 0])
        sample = max(-self.clip, min(self.clip, math.log(measured / predicted)))
        # the first observations average plainly, later ones move the mean by `rate`
        weight = max(self.rate, 1.0 / (seen[kind] + 1))
        means[kind] += weight * (sample - means[kind])
        seen[kind] += 1

    def drafting_factor(self, rows: int) -> float:
        """How much longer than its tables a drafting step of `rows` runs, relative to a plain
        one (1.0 until both kinds were seen `warmup` times at that load; within
        exp(+-limit))."""
        load = _load(rows)
        seen = self.seen.get(load, (0, 0))
        if min(seen) < self.warmup:
            return 1.0
        means = self.log_ratio[load]
        diff = means[DRAFTING] - means[PLAIN]
        return math.exp(max(-self.limit, min(self.limit, diff)))


def _load(rows: int) -> int:
    """The load bucket of a step of `rows`: floor(log2(rows))."""
    return max(rows, 1).bit_length() - 1


class StepOverhead:
    """Seconds a decode step spends besides its target forward (the draft pass, drafting
    bookkeeping, sampling, commit, detokenizing): `plain`, by the step's rows, for steps in
    which nobody drafts; `drafting`, by the drafting rows. Both are profiled (`SPSTable`s of
    such steps per second, cached like SPS(B)), so choices depend on the tables, not on the
    timing noise of the moment, and a seed's text repeats on the same schedule.

    Alg. 1 and the draft gate weigh verified tokens against the whole step's time; these
    seconds are the part of it that the forward's cost table does not hold."""

    def __init__(self, plain: SPSTable | None = None, drafting: SPSTable | None = None):
        self.plain, self.drafting = plain, drafting

    def seconds(self, drafting_rows: int, rows: int, default: float) -> float:
        """The profiled seconds for a step of `rows` with `drafting_rows` drafting, or
        `default` without a profile."""
        table = self.drafting if drafting_rows else self.plain
        if table is None:
            return default
        return 1.0 / table(drafting_rows or rows)


class ContextFlush:
    """What writing deferred draft context adds to a drafting step (`DraftGate.flush`).

    A request the gate kept out holds its recent tokens' target features
    (`DraftRunner.defer_context`; a newcomer, its whole prompt); drafting writes them first,
    which no drafting step's profile holds (there each row writes one block's tokens a step).
    Measured on the shipped pair at 64 requests on a 2-core CPU: 8 ms of a 60 ms drafting step,
    which made drafting look worth it where it lost."""

    def __init__(self, gamma: int, horizon: int = 16):
        self.gamma = gamma
        self.table: SPSTable | None = None
        """Deferred context written per second by its tokens (`profiler.profile_engine`;
        None: not charged)."""
        self.tokens: Callable[[str], int] | None = None
        """A request's deferred context tokens (`DraftRunner.deferred_tokens`), or None."""
        self.horizon = horizon
        """Steps at most that writing a request's context is spread over (`step_tokens`; a
        request may end before its `max_tokens`)."""
        self._slope: tuple[SPSTable, float] | None = None

    def seconds(self, req_ids: list[str]) -> float:
        """Seconds that writing the deferred context of `req_ids` adds to a drafting step,
        beyond the block's tokens a row that drafts every step writes (already in the
        profiled step overhead)."""
        return self.seconds_per_token() * sum(map(self.extra_tokens, req_ids))

    def extra_tokens(self, req_id: str) -> int:
        """`req_id`'s deferred context tokens beyond one block (0 where nothing is charged)."""
        if self.tokens is None or self.table is None:
            return 0
        return max(0, self.tokens(req_id) - (self.gamma + 1))

    def step_tokens(self, req, estimate: np.ndarray | None) -> float:
        """`extra_tokens` of `req`, spread over the steps it is expected to go on drafting
        once they are written: its remaining tokens at 1 + sum(`estimate`) tokens a step, at
        most `horizon` steps. The context is written once and serves every later draft
        pass; charged whole to one step, it kept newcomers (their whole prompt deferred) from
        ever drafting where drafting paid 1.4x (4 requests on a 2-core AVX2 CPU)."""
        tokens = self.extra_tokens(req.req_id)
        if not tokens:
            return 0.0
        per_step = 1.0 + (float(estimate.sum()) if estimate is not None else 0.0)
        return tokens / min(max(1.0, req.remaining / per_step), self.horizon)

    def seconds_per_token(self) -> float:
        """The slope of `table` between its last two points (at least 0): what one more
        deferred token costs in a large write."""
        table = self.table
        if table is None or len(table.batch_tokens) < 2:
            return 0.0
        if self._slope is None or self._slope[0] is not table:
            first, last = table.batch_tokens[-2], table.batch_tokens[-1]
            self._slope = (table, max(0.0, (1.0 / table(last) - 1.0 / table(first))
                                      / (last - first)))
        return self._slope[1]
