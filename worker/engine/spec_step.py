"""How many draft tokens each request of a step verifies, under its policy, and which
requests draft at all.

The step-level side of the verify-length policy (its pure rules are `verify_policy`'s):
`choose_lengths` applies each request's policy under caps, `DraftGate` decides before a step
which requests draft, from the profiled costs (`StepOverhead` among them). The planner
(`planner`) calls both.

Knows: the policies (`ar`, `fixed`, `threshold`, `prefix`), STS calibration, and the caps
every request obeys. Does not know: models, caches or sampling.

Losslessness rule for caps: a cap may depend on anything known *before* drafting (the
request's remaining budget, the number of requests) but never on a policy's result, which
depends on draft tokens. Trimming a chosen length after the fact would let the decision to
verify x_j depend on x_j itself (DSpark Appendix A), so caps are applied as upper bounds
that no draft token can move.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparkgrid.costs import SPSTable
from worker.engine.sts import apply_sts, survival
from worker.engine.verify_policy import (
    Policy,
    RowCostTable,
    expected_throughput,
    expected_throughputs,
    prefix_lengths,
    threshold_lengths,
)


@dataclass
class DraftProposal:
    """What the drafter proposed for the drafting requests of one step."""

    ids: torch.Tensor                  # [S, G] draft tokens
    probs: torch.Tensor | None         # [S, G, V] distributions they were drawn from;
                                       # None when all are greedy (ids suffice)
    conf_logits: torch.Tensor | None   # [S, G] raw confidence logits, None without a head
    conf: torch.Tensor | None = None   # [S, G] the c_k this step decides with (STS, then the
                                       # engine's online calibration); None: from conf_logits


def proposal_confidence(proposal: DraftProposal, sts: list[float] | None) -> torch.Tensor:
    """[S, G] c_k of a proposal's rows, on the CPU."""
    if proposal.conf is not None:
        return proposal.conf.cpu()
    return confidence(proposal.conf_logits, sts).cpu()


def confidence(conf_logits: torch.Tensor, sts: list[float] | None) -> torch.Tensor:
    """c_k, calibrated by Sequential Temperature Scaling when the draft ships temperatures."""
    return apply_sts(conf_logits, sts) if sts is not None else torch.sigmoid(conf_logits.float())


def choose_lengths(reqs, spec_idx: list[int], proposal: DraftProposal | None, *, gamma: int,
                   sps: SPSTable | RowCostTable | None, threshold: float, sts: list[float] | None,
                   max_batch_tokens: int, draft_seconds: float = 0.0) -> list[int]:
    """Verify lengths l_r in [0, gamma] for every request of the step (0 for `ar`);
    `draft_seconds`, the profiled time of the step's draft pass, is part of what `prefix`
    weighs each verified token against (`prefix_lengths`' fixed seconds)."""
    lengths = [0] * len(reqs)
    if not spec_idx:
        return lengths
    caps_t = verify_caps(reqs, spec_idx, gamma, max_batch_tokens)
    caps = caps_t.tolist()  # per-row work in Python ints: a step's host time counts
    conf = proposal_confidence(proposal, sts) if proposal.conf_logits is not None else None
    policies = [reqs[i].policy for i in spec_idx]
    prefix_rows = [k for k, p in enumerate(policies) if p == Policy.PREFIX]
    chosen = [0] * len(spec_idx)
    for k, pol in enumerate(policies):
        if pol == Policy.FIXED:
            chosen[k] = min(gamma, caps[k])
        elif pol == Policy.THRESHOLD:
            chosen[k] = min(int(threshold_lengths(conf[k:k + 1], threshold)[0]), caps[k])
    if prefix_rows:
        others = [k for k in range(len(spec_idx)) if k not in prefix_rows]
        extra_tokens = len(reqs) - len(spec_idx) + sum(1 + chosen[k] for k in others)
        extra_tau = len(reqs) - len(spec_idx) + sum(
            1 + float(survival(conf[k])[:chosen[k]].sum()) if conf is not None else 1.0
            for k in others)
        a = survival(conf[prefix_rows])  # [P, G]
        beyond_cap = torch.arange(gamma)[None, :] >= caps_t[prefix_rows][:, None]
        a = a.masked_fill(beyond_cap, 0.0)  # never worth verifying: the walk stops there
        got = prefix_lengths(a, sps.at_rows(len(reqs)), extra_tokens=extra_tokens,
                             extra_tau=extra_tau, fixed_seconds=draft_seconds).tolist()
        for k, n in zip(prefix_rows, got):
            chosen[k] = min(n, caps[k])
    for k, i in enumerate(spec_idx):
        lengths[i] = chosen[k]
    return lengths


def verify_caps(reqs, spec_idx: list[int], gamma: int, max_batch_tokens: int) -> torch.Tensor:
    """[S] the most draft tokens each request of `spec_idx` may verify, known before drafting:
    gamma, the tokens it has left to generate, and a fair share of the batch."""
    share = max(0, max_batch_tokens // len(reqs) - 1)
    return torch.tensor([min(gamma, reqs[i].remaining - 1, share) for i in spec_idx])


def pad_rows(values: torch.Tensor | None, rows: list[int], num_rows: int, gamma: int,
             device: torch.device, vocab: int | None = None) -> torch.Tensor:
    """Scatter per-drafting-request rows into a full-batch tensor (ids pad with -1, probs 0)."""
    if vocab is None:
        out = torch.full((num_rows, gamma), -1, dtype=torch.long, device=device)
    else:
        dtype = values.dtype if values is not None else torch.float32
        out = torch.zeros(num_rows, gamma, vocab, dtype=dtype, device=device)
    if values is not None:
        out[torch.tensor(rows, device=device)] = values
    return out


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


class DraftGate:
    """Chooses which requests draft in a step where the `prefix` policy is used.

    On a fast accelerator a draft pass costs little next to a verify forward; on a CPU, or a
    small GPU serving a big batch, it can cost more than the tokens it saves, and more so for
    requests in text the drafter finds hard. Before each step the gate picks the subset of
    requests whose drafting is expected to raise the step's throughput (`expected_throughput`),
    from each request's survival estimate (a running mean of its calibrated a_{r,j} over its
    earlier blocks), the step cost (SPS(B), or the `RowCostTable` at the step's rows) and the
    profiled seconds of a draft pass for that many rows (`draft_cost`, draft passes per second
    by rows; no gate without it). Requests are considered in order of their estimate's sum,
    the subsets tried being the best 0, 1, 2, 4, ... of them. A request without an estimate,
    or one that has not drafted for its refresh interval, drafts anyway, so estimates follow
    the text; the interval starts at `refresh_steps` and doubles (up to `max_refresh_steps`)
    each time a refreshed estimate still leaves the request out. The requests due for a
    refresh force a draft pass only where their drafting, all their tokens accepted, could pay
    by itself; otherwise they draft beside those chosen, when some are: under load (64
    requests on a CPU) one request's refresh would cost a draft pass for nothing, and
    refreshes falling due one after another would draft in most steps. Where not even all
    requests' drafting could pay, nobody drafts. A request that arrives while
    others have estimates starts from their mean (a request churn would otherwise force a
    draft pass for a few newcomers in step after step, in exactly the regime where drafting
    does not pay). The choice uses no token of
    the current step, so verification stays lossless.
    """

    def __init__(self, gamma: int, sts: list[float] | None, draft_cost: SPSTable | None, *,
                 refresh_steps: int = 8, max_refresh_steps: int = 64, smoothing: float = 0.3):
        self.gamma, self.sts, self.draft_cost = gamma, sts, draft_cost
        self.refresh_steps, self.max_refresh_steps = refresh_steps, max_refresh_steps
        self.smoothing = smoothing
        self.overhead = StepOverhead()
        """What steps spend besides their target forward (`profiler.profile_engine`)."""
        self._estimate: dict[str, torch.Tensor] = {}  # req_id -> [G] float64
        self._skipped: dict[str, int] = {}  # req_id -> steps since its last draft
        self._interval: dict[str, int] = {}  # req_id -> skipped steps before a refresh
        self._refreshing: set[str] = set()  # drafted last step only to refresh the estimate
        self._version = 0  # bumped whenever an estimate changes
        self._memos: dict[str, tuple[tuple, dict]] = {}  # `_memo`: (tables, answers) a slot
        self.skipped_steps = 0
        """Steps in which the gate kept every drafting-capable request from drafting."""
        self.skipped_rows = 0
        """Request-steps that the gate kept from drafting."""

    def rows(self, reqs, spec_idx: list[int], sps: SPSTable | RowCostTable | None,
             max_batch_tokens: int) -> list[int]:
        """The subset of `spec_idx` that drafts this step, in `spec_idx` order."""
        if (not spec_idx or sps is None or self.draft_cost is None
                or any(reqs[i].policy != Policy.PREFIX for i in spec_idx)):
            return spec_idx
        ids = [reqs[i].req_id for i in spec_idx]
        if not self._could_pay(len(reqs), len(ids), sps):
            # not even drafts that are always accepted would pay at this load: nobody drafts,
            # and no estimate needs refreshing until the load falls
            for r in ids:
                if r in self._skipped:
                    self._skipped[r] += 1
            self.skipped_rows += len(ids)
            self.skipped_steps += 1
            return []
        newcomers = [r for r in ids if r not in self._estimate]
        if newcomers and self._estimate:  # they start from the others' mean, not a draft
            prior = torch.stack(list(self._estimate.values())).mean(0)
            self._version += 1
            for r in newcomers:
                self._estimate[r] = prior.clone()
                self._skipped[r], self._interval[r] = 0, self.refresh_steps
        # requests due for a fresh estimate draft beside the chosen ones; they force a draft
        # pass of their own only where their drafting could pay by itself (under load, one
        # request's refresh after another would draft in most steps)
        due = [k for k, r in enumerate(ids)
               if r in self._estimate and self._skipped[r] >= self._interval[r]]
        alone = bool(due) and self._could_pay(len(reqs), len(due), sps)
        forced = [k for k, r in enumerate(ids) if r not in self._estimate] + (due if alone else [])
        chosen = set(forced)
        optional = [k for k in range(len(ids)) if k not in chosen]
        if optional:
            chosen |= self._best_subset(reqs, spec_idx, ids, sorted(forced), optional, sps,
                                        max_batch_tokens)
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
        if not chosen:
            self.skipped_steps += 1
        return [spec_idx[k] for k in sorted(chosen)]

    def _best_subset(self, reqs, spec_idx, ids, forced, optional, sps,
                     max_batch_tokens) -> set[int]:
        """The best 0, 1, 2, 4, ... (and all) of `optional` to draft alongside `forced`;
        the last answer again while nothing it depends on changed (under load the gate keeps
        the same rows out step after step)."""
        caps = verify_caps(reqs, spec_idx, self.gamma, max_batch_tokens).numpy()
        key = (tuple(ids), tuple(forced), tuple(caps.tolist()), len(reqs), self._version)
        memo = self._memo_values(sps)  # one last answer, kept while the tables stay
        last = memo.get("last subset")
        if last is not None and last[0] == key:
            return set(last[1])
        chosen = self._weigh_subsets(ids, forced, optional, sps, len(reqs), caps)
        memo["last subset"] = (key, frozenset(chosen))
        return chosen

    def _weigh_subsets(self, ids, forced, optional, sps, rows, caps) -> set[int]:
        """`_best_subset` computed: every candidate subset's expected throughput."""
        zeros = torch.zeros(self.gamma, dtype=torch.float64)  # no estimate yet: count on nothing
        est = torch.stack([self._estimate.get(r, zeros) for r in ids]).numpy().copy()
        est[np.arange(self.gamma)[None, :] >= caps[:, None]] = 0.0
        sums = est.sum(axis=1)
        ranked = sorted(optional, key=lambda k: -sums[k])
        sizes, n = {0, len(ranked)}, 1
        while n < len(ranked):
            sizes.add(n)
            n *= 2
        sizes = sorted(sizes)
        subsets = [est[forced + ranked[:size]] for size in sizes]
        seconds = [self.draft_seconds(len(forced) + size, rows) for size in sizes]
        values = expected_throughputs(subsets, self._at_rows(sps, rows), seconds, rows)
        best = int(np.argmax(values))  # the first of equals, as the smallest subset
        return set(ranked[:sizes[best]])

    def _could_pay(self, rows: int, candidates: int, sps) -> bool:
        """Whether drafting for some of `candidates` requests (the best 1, 2, 4, ... or all)
        in a step of `rows` could beat plain decoding if every draft token were accepted: an
        upper bound on what any estimate could show."""
        def compute() -> bool:
            cost = self._at_rows(sps, rows)
            ones = torch.ones(candidates, self.gamma, dtype=torch.float64)
            plain = expected_throughput(ones[:0], cost, draft_seconds=self.draft_seconds(0, rows),
                                        other_rows=rows)
            sizes, n = {candidates}, 1
            while n < candidates:
                sizes.add(n)
                n *= 2
            return any(expected_throughput(ones[:n], cost, other_rows=rows - n,
                                           draft_seconds=self.draft_seconds(n, rows)) > plain
                       for n in sorted(sizes))
        return self._memo(("could pay", rows, candidates), compute, sps)

    def _at_rows(self, sps, rows: int):
        """`sps.at_rows(rows)`, once per row count."""
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
        tables = (sps, self.draft_cost, self.overhead.plain, self.overhead.drafting)
        slot = "sps" if sps is not None else "own"
        held_tables, values = self._memos.get(slot, ((None,) * 4, {}))
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
        a = survival(proposal_confidence(proposal, self.sts)).double()  # [D, G]
        self._version += 1
        for k, i in enumerate(drafted):
            rid = reqs[i].req_id
            old = self._estimate.get(rid)
            self._estimate[rid] = a[k] if old is None else old + self.smoothing * (a[k] - old)
            self._skipped[rid] = 0
            self._interval.setdefault(rid, self.refresh_steps)

    def forget(self, req_id: str) -> None:
        self._version += 1
        self._estimate.pop(req_id, None)
        self._skipped.pop(req_id, None)
        self._interval.pop(req_id, None)
        self._refreshing.discard(req_id)
