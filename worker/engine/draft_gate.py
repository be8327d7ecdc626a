"""Which requests draft in a `prefix` step: the draft gate.

`DraftGate.rows` is asked before every step (by `planner`), from what is known before any
draft token exists: each request's survival estimate from its earlier blocks, the profiled
cost tables (`profiler`: the target's step cost, the draft pass, `online_costs.StepOverhead`,
the cost of writing deferred draft context), and how the engine's real steps compare with
those tables (`online_costs.OnlineCosts`). So the choice never depends on the step's own
tokens, and verification stays lossless.

Knows: estimates, cost tables, the `prefix` policy's expected throughput
(`verify_policy.expected_throughputs`). Does not know: models, caches, sampling or tokens.
"""

from __future__ import annotations

import math

import numpy as np

from sparkgrid.costs import SPSTable
from worker.engine.online_costs import ContextFlush, OnlineCosts, StepOverhead
from worker.engine.spec_step import DraftProposal, proposal_survival, spec_caps, verify_caps
from worker.engine.verify_policy import (
    Policy,
    RowCostTable,
    expected_throughputs,
)


class DraftGate:
    """Chooses which requests draft in a step where the `prefix` policy is used.

    On a fast accelerator a draft pass costs little next to a verify forward; on a CPU, or a
    small GPU serving a big batch, it can cost more than the tokens it saves, and more so for
    requests in text the drafter finds hard. Before each step the gate picks the subset of
    requests whose drafting is expected to raise the step's throughput
    (`expected_throughputs`), from each request's survival estimate (a running mean of its
    calibrated a_{r,j} over its earlier blocks), the step cost (SPS(B), or the `RowCostTable`
    at the step's rows), the profiled seconds of a draft pass for that many rows
    (`draft_cost`; no gate without it), writing each request's deferred draft context first
    (`flush`, spread over the steps it will serve), and, in steps whose requests all
    decode greedily, how much longer than their tables drafting steps have really run
    (`online`). Requests are considered in order of their estimate's sum, the subsets tried
    being the best 0, 1, 2, 4, ... of them.

    Refreshes: a request without an estimate, or one that has not drafted for its refresh
    interval, drafts anyway, so estimates follow the text; the interval starts at
    `refresh_steps` and doubles (up to `max_refresh_steps`) each time a refreshed estimate
    still leaves the request out. Due requests force a draft pass only where their drafting,
    all their tokens accepted, could pay by itself; otherwise they draft beside those chosen
    (under load, refreshes falling due one after another would draft in most steps).

    Under load, where not even all requests' drafting could pay with every draft token
    accepted, nobody drafts; where not even requests as good as the best estimate held could
    pay, only refreshes draft; both answers are cached while nothing they rest on changes. A
    newcomer starts from the running requests' mean estimate (with nobody around, from that
    of the requests before it), not from a draft pass of its own. The choice uses no token
    of the current step, so verification stays lossless.
    """

    def __init__(self, gamma: int, sts: list[float] | None, draft_cost: SPSTable | None, *,
                 refresh_steps: int = 8, max_refresh_steps: int = 64, smoothing: float = 0.3,
                 reweigh_steps: int = 1, margin: float = 1.0):
        if isinstance(reweigh_steps, bool) or not isinstance(reweigh_steps, int) \
                or reweigh_steps < 1:
            raise ValueError(f"reweigh_steps: expected an integer >= 1, got {reweigh_steps!r}")
        if not (isinstance(margin, (int, float)) and 1.0 <= margin < math.inf):
            raise ValueError(f"margin: expected a number >= 1, got {margin!r}")
        self.margin = float(margin)
        """How many times plain decoding's expected throughput drafting must promise before a
        step drafts by choice (1: any gain). The tables and the online factor are estimates;
        near a break-even load their errors decide: at 32 requests on a 2-core AVX2 CPU the
        gate, with no margin, drafted in part of its steps (tau 2.0-2.8) and ran 7-13% below
        the better of `ar` and `fixed` in all four repeats."""
        self.gamma, self.sts, self.draft_cost = gamma, sts, draft_cost
        self.refresh_steps, self.max_refresh_steps = refresh_steps, max_refresh_steps
        self.smoothing = smoothing
        self.reweigh_steps = reweigh_steps
        """Steps a weighing of the subsets serves while the same requests run at the same
        load with the same caps and deferred context, though their estimates moved (1: every
        step the estimates move). Each estimate is already a running mean (`smoothing`) over
        blocks, so a weighing a few steps old chooses as well; at one request on a 2-core CPU
        weighing every step cost 0.2 ms of a 6 ms step."""
        self.overhead = StepOverhead()
        """What steps spend besides their target forward (`profiler.profile_engine`)."""
        self.flush = ContextFlush(gamma)
        """What writing a request's deferred draft context adds to a drafting step."""
        self.online: OnlineCosts | None = None
        """How drafting steps really run against their tables, relative to plain steps (the
        engine's timings, `OnlineCosts`); None: the tables alone."""
        # (numpy, not torch: for a few dozen numbers a torch op costs several numpy ones)
        self._estimate: dict[str, np.ndarray] = {}  # req_id -> [G] float64
        self._prior: dict[bool, np.ndarray] = {}  # greedy? -> [G] where newcomers begin
        self._greedy: dict[str, bool] = {}  # req_id -> whether it decodes greedily
        self._factor = 1.0  # the margin times the online factor of the step being planned
        self._skipped: dict[str, int] = {}  # req_id -> steps since its last draft
        self._interval: dict[str, int] = {}  # req_id -> skipped steps before a refresh
        self._refreshing: set[str] = set()  # drafted last step only to refresh the estimate
        self._version = 0  # bumped whenever an estimate changes
        self._memos: dict[str, tuple[tuple, dict]] = {}  # `_memo`: (tables, answers) a slot
        self._quiet: tuple | None = None  # after a step where nobody drafted: (ids, (version,
        # rows), factor, steps the answer still holds), for `rows`
        self.quiet_steps = 8
        """Steps at most that a step's finding that nobody drafts is taken again without a
        weighing, while nothing it rests on changed (a bound: a request whose deferred
        context reached `DraftRunner.max_deferred` is written out, which the gate does not
        see). Under load on a 2-core CPU the weighing cost 0.2 ms of a 16 ms step."""
        self.skipped_steps = 0
        """Steps in which the gate kept every drafting-capable request from drafting."""
        self.skipped_rows = 0
        """Request-steps that the gate kept from drafting."""
        self.ruled_out = False
        """Whether the last step's answer, nobody drafting, came from a bound rather than a
        weighing: not even drafts always accepted, or not even requests as good as the best
        estimate held, could pay at its load (the planner's `dormant_after` counts such
        steps)."""

    def rows(self, reqs, spec_idx: list[int], sps: SPSTable | RowCostTable | None,
             max_batch_tokens: int, *, greedy: bool = False) -> list[int]:
        """The subset of `spec_idx` that drafts this step, in `spec_idx` order. `greedy`:
        every request of the step decodes greedily, so timing may steer the choice (the
        `online` factor): it cannot change their tokens. A sampled request's tokens depend on
        the schedule of its draws, which stays a function of the tables and the requests,
        so a seed's text repeats when the same requests come in the same order."""
        self._factor = self.margin * (self.online.drafting_factor(len(reqs))
                                      if greedy and self.online is not None else 1.0)
        if (not spec_idx or sps is None or self.draft_cost is None
                or any(reqs[i].policy != Policy.PREFIX for i in spec_idx)):
            self.ruled_out = False
            return spec_idx
        ids = [reqs[i].req_id for i in spec_idx]
        quiet = self._quiet
        if (quiet is not None and quiet[0] == ids and quiet[1] == (self._version, len(reqs))
                and self._factor >= quiet[2] and quiet[3] > 0):
            # the last step found nothing worth drafting, and since then no estimate moved,
            # no request came or went or fell due for a refresh, and drafting only grew
            # dearer (deferred context, the factor): the same answer, without the weighing
            self._quiet = (ids, quiet[1], quiet[2], quiet[3] - 1)
            return self._keep_out(ids)  # `ruled_out` as the step it repeats
        self._quiet = None
        if not self._could_pay(len(reqs), len(ids), sps):
            # not even drafts that are always accepted would pay at this load: nobody drafts,
            # and no estimate needs refreshing until the load falls
            self.ruled_out = True
            return self._keep_out(ids)
        greedy = self._greedy
        for k, r in enumerate(ids):
            if r not in greedy:
                greedy[r] = _decodes_greedily(reqs[spec_idx[k]])
        newcomers = [r for r in ids if r not in self._estimate
                     and (self._estimate or self._greedy[r] in self._prior)]
        if newcomers:
            # they start from the others' mean (or, with nobody around, from that of the
            # requests before them), not from a draft pass
            mean = (np.stack(list(self._estimate.values())).mean(0) if self._estimate
                    else None)
            self._version += 1
            for r in newcomers:
                self._estimate[r] = (mean if mean is not None
                                     else self._prior[self._greedy[r]]).copy()
                self._skipped[r], self._interval[r] = 0, self.refresh_steps
        # requests due for a fresh estimate draft beside the chosen ones; they force a draft
        # pass of their own only where their drafting could pay by itself (under load, one
        # request's refresh after another would draft in most steps)
        due = [k for k, r in enumerate(ids)
               if r in self._estimate and self._skipped[r] >= self._interval[r]]
        # a refresh is charged its deferred context whole: a request due for one was left
        # out, and most likely will be again after this one draft pass
        whole = None
        if due:
            whole = np.zeros(len(ids))
            whole[due] = [self.flush.extra_tokens(ids[k]) for k in due]
        alone = (bool(due) and self._could_pay(len(reqs), len(due), sps)
                 and self._refresh_could_pay(reqs, spec_idx, ids, due, sps, max_batch_tokens,
                                             whole))
        forced = [k for k, r in enumerate(ids) if r not in self._estimate] + (due if alone else [])
        chosen = set(forced)
        optional = [k for k in range(len(ids)) if k not in chosen]
        # where not even requests as good as the best estimate held would pay, only
        # refreshes draft (the common case under load: then this is all of the planning;
        # for a few optional requests, weighing them costs about the same)
        hopeless = len(optional) > 4 and not self._best_could_pay(len(reqs), len(ids), sps)
        if optional and not hopeless:
            estimate = self._estimate.get
            spread = [self.flush.step_tokens(reqs[i], estimate(reqs[i].req_id))
                      for i in spec_idx]  # a list: compared with the last weighing's
            chosen |= self._best_subset(reqs, spec_idx, ids, sorted(forced), optional, sps,
                                        max_batch_tokens, spread)
        if chosen and not alone:  # a draft pass runs anyway: the due ones join it
            forced = sorted(set(forced) | set(due))
            chosen |= set(due)
        self._refreshing.update(ids[k] for k in forced if ids[k] in self._estimate)
        for k, r in enumerate(ids):
            if k in chosen:
                if k not in forced:  # drafting pays for it again
                    self._interval[r] = self.refresh_steps
                    self._refreshing.discard(r)
                continue
            if r in self._refreshing:  # refreshed, and drafting still does not pay
                self._interval[r] = min(2 * self._interval[r], self.max_refresh_steps)
                self._refreshing.discard(r)
            self._skipped[r] += 1
        self.skipped_rows += len(ids) - len(chosen)
        self.ruled_out = hopeless and not chosen
        if not chosen:
            self.skipped_steps += 1
            # steps before one not due this step falls due (its refresh might pay where
            # this did not)
            gaps = [self._interval[r] - self._skipped[r] for r in ids
                    if self._skipped[r] <= self._interval[r]]
            self._quiet = (ids, (self._version, len(reqs)), self._factor,
                           min(gaps + [self.quiet_steps]))
        return [spec_idx[k] for k in sorted(chosen)]

    def skip(self, reqs, spec_idx: list[int], sps) -> list[int]:
        """A step where nobody drafts by the `regimes` choice: the gate's state stays, and
        `ruled_out` says whether its bounds would rule drafting out anyway (for dormancy)."""
        self.ruled_out = (bool(spec_idx) and sps is not None and self.draft_cost is not None
                          and self.rules_out(len(reqs), sps))
        return []

    def rules_out(self, rows: int, sps) -> bool:
        """Whether the bounds alone rule drafting out at a load of `rows` (as `ruled_out`
        says of a step): not even drafts always accepted, or not even requests as good as the
        best estimate held, could pay there."""
        return (not self._could_pay(rows, rows, sps)
                or (bool(self._estimate) and not self._best_could_pay(rows, rows, sps)))

    def _keep_out(self, ids: list[str]) -> list[int]:
        """A step in which none of `ids` drafts, decided without weighing: their skipped
        steps and the counters move on."""
        skipped = self._skipped
        for r in ids:
            if r in skipped:
                skipped[r] += 1
        self.skipped_rows += len(ids)
        self.skipped_steps += 1
        return []

    def _estimates(self, ids, ks, caps: np.ndarray, base=None) -> np.ndarray:
        """[len(ks), G] the survival estimates of requests `ks` (or `base` for each; no
        estimate yet: count on nothing), zero past what each may verify this step (`caps`,
        `verify_caps` of `ks`)."""
        zeros = np.zeros(self.gamma)
        est = (np.tile(base, (len(ks), 1)) if base is not None else
               np.stack([self._estimate.get(ids[k], zeros) for k in ks]))
        est[np.arange(self.gamma)[None, :] >= caps[:, None]] = 0.0
        return est

    def _drafting_seconds(self, ks, rows: int, extra: np.ndarray) -> float:
        """Seconds besides the forward of a step of `rows` in which requests `ks` draft
        (`extra`: each request's deferred context tokens that this step is charged: beyond
        one block, and spread over later steps (`ContextFlush.step_tokens`) but for a
        refresh)."""
        return (self.draft_seconds(len(ks), rows)
                + self.flush.seconds_per_token() * float(extra[ks].sum()))

    def _refresh_could_pay(self, reqs, spec_idx, ids, due, sps, max_batch_tokens,
                           extra) -> bool:
        """Whether drafting for some of the `due` requests (1, 2, 4, ... of them, those with
        the least deferred context first) could pay by itself if all their draft tokens were
        accepted, their deferred context and the online factor included (`_could_pay` is the
        same bound without deferred context). Where not even that would pay, a refresh would cost
        a draft pass to learn what could not change the choice. The gain found is kept: while
        the same requests are due at the same load and their deferred context only grows, it
        can only fall, so a gain that did not beat the factor still does not, without a
        computation (under load the same requests stay due step after step)."""
        rows = len(reqs)
        key = (tuple(ids[k] for k in due), rows)
        memo = self._memo_values(sps)
        last = memo.get("last refresh")
        if (last is not None and last[0] == key and last[2] <= self._factor
                and (extra[due] >= last[1]).all()):
            return False
        order = sorted(due, key=lambda k: extra[k])
        caps = verify_caps(reqs, [spec_idx[k] for k in order], self.gamma, max_batch_tokens)
        est = self._estimates(ids, order, caps, base=np.ones(self.gamma))
        sizes = _powers_up_to(len(order))
        subsets = [est[:0]] + [est[:n] for n in sizes]
        seconds = [self.draft_seconds(0, rows)] + [
            self._drafting_seconds(order[:n], rows, extra) for n in sizes]
        values = expected_throughputs(subsets, self.cost_at_rows(sps, rows), seconds, rows)
        gain = max(values[1:]) / values[0]
        memo["last refresh"] = (key, extra[due].copy(), gain)
        return gain > self._factor

    def _best_subset(self, reqs, spec_idx, ids, forced, optional, sps,
                     max_batch_tokens, extra) -> set[int]:
        """The best 0, 1, 2, 4, ... (and all) of `optional` to draft alongside `forced`.
        The subsets' throughputs on the tables are kept while nothing they depend on changes
        (under load the gate keeps the same rows out step after step), and the choice among
        them is made again with each step's online factor, which moves a little every step."""
        caps = spec_caps(reqs, spec_idx, self.gamma, max_batch_tokens)
        key = (tuple(ids), tuple(forced), tuple(caps), len(reqs))
        memo = self._memo_values(sps)  # one last weighing, kept while the tables stay
        last = memo.get("last subset")
        if last is not None and last[0] == key:
            _, held, weighed, version, served = last
            same = version == self._version  # the estimates it weighed are still those held
            if held == extra and (same or served < self.reweigh_steps):
                memo["last subset"] = (key, held, weighed, version, served + 1)
                return _pick(*weighed, forced, self._factor)
            # deferred context only grows while a request is kept out, and with it the cost
            # of every subset that drafts: where no subset beat plain decoding, none does yet
            values = weighed[2]
            if same and not forced and all(e >= h for e, h in zip(extra, held)) and max(
                    values[1:]) <= values[0] * self._factor:
                return set()
        weighed = self._weigh_subsets(ids, forced, optional, sps, len(reqs), np.array(caps),
                                      np.array(extra))
        memo["last subset"] = (key, extra, weighed, self._version, 1)
        return _pick(*weighed, forced, self._factor)

    def _weigh_subsets(self, ids, forced, optional, sps, rows, caps,
                       extra) -> tuple[list[int], list[int], list[float]]:
        """Every candidate subset's expected throughput on the tables, for `_best_subset`
        (`extra`: each request's share of the deferred context drafting would write first,
        `ContextFlush.step_tokens`):
        the optional requests ranked by estimate, the subset sizes, and their throughputs."""
        est = self._estimates(ids, range(len(ids)), caps)
        sums = est.sum(axis=1)
        ranked = sorted(optional, key=lambda k: -sums[k])
        sizes = [0] + _powers_up_to(len(ranked))
        subsets = [est[forced + ranked[:size]] for size in sizes]
        seconds = [self._drafting_seconds(forced + ranked[:size], rows, extra)
                   for size in sizes]
        values = expected_throughputs(subsets, self.cost_at_rows(sps, rows), seconds, rows)
        return ranked, sizes, values

    def _could_pay(self, rows: int, candidates: int, sps) -> bool:
        """Whether drafting for some of `candidates` requests (the best 1, 2, 4, ... or all)
        in a step of `rows` could beat plain decoding if every draft token were accepted, the
        online factor included: an upper bound on what any estimate could show. (On the
        tables alone it is no bound where drafting steps have run relatively closer to their
        tables than plain ones, a factor below 1.)"""
        return self._memo(("could pay", rows, candidates), lambda: self._alike_rows_gain(
            rows, candidates, np.ones(self.gamma), sps), sps) > self._factor

    def _alike_rows_gain(self, rows: int, candidates: int, survival_row: np.ndarray,
                         sps) -> float:
        """How many times plain decoding's throughput the best of 1, 2, 4, ... or
        `candidates` requests that all survive as `survival_row` (no deferred context) would
        give by drafting, in a step of `rows`, on the tables."""
        sizes = _powers_up_to(candidates)
        subsets = [np.zeros((0, self.gamma))] + [np.tile(survival_row, (n, 1)) for n in sizes]
        seconds = [self.draft_seconds(n, rows) for n in [0] + sizes]
        values = expected_throughputs(subsets, self.cost_at_rows(sps, rows), seconds, rows)
        return max(values[1:]) / values[0]

    def _best_could_pay(self, rows: int, candidates: int, sps) -> bool:
        """Whether drafting for some of `candidates` requests (1, 2, 4, ... or all) in a step
        of `rows` could pay if each accepted as well as the best estimate now held of any
        request (element-wise; no deferred context; the online factor included). The gain is
        computed again only when an estimate or the load changes: under load, where nothing
        pays, this is the whole of a step's planning."""
        if not self._estimate:
            return True
        key = ("best could pay", rows, candidates, self._version)
        values = self._memo_values(sps)
        last = values.get("last best could pay")
        if last is None or last[0] != key:
            best = np.stack(list(self._estimate.values())).max(0)
            last = (key, self._alike_rows_gain(rows, candidates, best, sps))
            values["last best could pay"] = last
        return last[1] > self._factor

    def cost_at_rows(self, sps, rows: int):
        """`sps.at_rows(rows)`, once per row count (while the tables stay)."""
        return self._memo(("at rows", rows), lambda: sps.at_rows(rows), sps)

    def _memo(self, key, compute, sps=None):
        """compute() once per key while the cost tables stay the same objects (`_memo_values`):
        they are fixed once profiled, and a step asks the same questions again."""
        values = self._memo_values(sps)
        if key not in values:
            values[key] = compute()
        return values[key]

    def _memo_values(self, sps=None) -> dict:
        """The answers computed with the current cost tables (`sps` too, where given); emptied
        when any of them is replaced."""
        tables = (sps, self.draft_cost, self.overhead.plain, self.overhead.drafting,
                  self.flush.table)
        slot = "sps" if sps is not None else "own"
        held_tables, values = self._memos.get(slot, ((None,) * len(tables), {}))
        if any(a is not b for a, b in zip(tables, held_tables)):
            values = {}
            self._memos[slot] = (tables, values)
        return values

    def draft_seconds(self, drafting_rows: int, rows: int) -> float:
        """Seconds a step of `rows` spends besides its target forward when `drafting_rows` of
        them draft (0: none): the profiled `StepOverhead`, else the profiled draft pass."""
        def compute() -> float:
            profiled = (1.0 / self.draft_cost(drafting_rows)
                        if drafting_rows and self.draft_cost is not None else 0.0)
            return self.overhead.seconds(drafting_rows, rows, profiled)
        return self._memo(("seconds", drafting_rows, rows), compute)

    def observe(self, reqs, drafted: list[int], proposal: DraftProposal | None) -> None:
        """After a draft pass: each drafted request's new block updates its estimate."""
        if not drafted or proposal is None or proposal.conf_logits is None:
            return
        a = proposal_survival(proposal, self.sts).numpy().astype(np.float64)  # [D, G]
        self._version += 1
        for k, i in enumerate(drafted):
            rid = reqs[i].req_id
            old = self._estimate.get(rid)
            self._estimate[rid] = a[k] if old is None else old + self.smoothing * (a[k] - old)
            self._skipped[rid] = 0
            self._interval.setdefault(rid, self.refresh_steps)
            self._greedy.setdefault(rid, _decodes_greedily(reqs[i]))

    def forget(self, req_id: str) -> None:
        self._version += 1
        gone = self._estimate.pop(req_id, None)
        greedy = self._greedy.pop(req_id, True)
        if gone is not None:  # a running mean of the finished requests' estimates, per regime
            # (a sampled request's choices never depend on the timing that steers greedy ones)
            prior = self._prior.get(greedy)
            self._prior[greedy] = (gone.copy() if prior is None
                                   else prior + self.smoothing * (gone - prior))
        self._skipped.pop(req_id, None)
        self._interval.pop(req_id, None)
        self._refreshing.discard(req_id)


def _powers_up_to(n: int) -> list[int]:
    """1, 2, 4, ... below `n`, and `n` itself (n >= 1)."""
    sizes, k = [], 1
    while k < n:
        sizes.append(k)
        k *= 2
    return sizes + [n]


def _pick(ranked: list[int], sizes: list[int], values: list[float], forced: list[int],
          factor: float) -> set[int]:
    """The best of `_weigh_subsets`' subsets, drafting ones' throughput divided by `factor`
    (how much longer than its tables a drafting step runs): the first of equals, as the
    smallest subset."""
    scaled = [v / factor if forced or size else v for v, size in zip(values, sizes)]
    best = max(range(len(scaled)), key=scaled.__getitem__)  # the first of equals
    return set(ranked[:sizes[best]])


def _decodes_greedily(req) -> bool:
    """Whether `req` decodes greedily (a stand-in without sampling parameters counts so)."""
    params = getattr(req, "params", None)
    return params is None or params.temperature == 0
