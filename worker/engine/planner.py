"""What one engine step runs: the step plan, and the planner that makes it.

`LLMEngine.step()` is three calls: `Planner.plan` (this module) -> the engine's run (draft
pass, one verify forward, verification; then the prefill of newcomers) -> the engine's commit
(tokens, statistics, outputs, releases). The plan is made before any forward: which running
requests decode, which of them keep a draft context and which draft this step (the
`DraftGate`), the cost table and the fixed seconds that the verify-length policy weighs, each
decoding request's random draws and anchor position, and which waiting requests are admitted
(their cache reserved) and prefilled. Only the verify lengths wait for the draft pass: they
depend on its confidence, so the run hands the proposal back (`Planner.verify_lengths`)
before the verify forward, and the plan then also lays out that forward's rows.

Knows: requests, the engine's budgets (`EngineConfig`), the cache allocators' reservations,
the policies (`spec_step.choose_lengths`, `draft_gate.DraftGate`). Does not know: models, logits,
sampling, verification, or how tokens are committed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from sparkgrid.costs import SPSTable
from worker.engine.draft_gate import DraftGate
from worker.engine.kv_cache import BlockAllocator
from worker.engine.model_runner import ForwardBatch
from worker.engine.regimes import FULL, PLAIN, Regimes
from worker.engine.request import Request, Status
from worker.engine.spec_step import DraftProposal, choose_lengths
from worker.engine.verify_policy import Policy, RowCostTable


@dataclass
class StepPlan:
    """One step, decided before its forwards (`verify_lengths` once the draft is in)."""

    decode: list[Request]
    """Running requests that decode this step: all of them (no preemption), in order."""
    keep_context: list[int]
    """Rows of `decode` that keep a draft context (`Request.keeps_context`: their policy
    drafts, and they are not dormant): the target's features at their committed positions
    extend their draft context, whether or not they draft this step."""
    drafting: list[int]
    """Rows of `decode` that draft this step (the draft gate's choice among `keep_context`)."""
    starts: list[int]
    """Each decoding row's anchor position: its tokens already cached (the anchor, its last
    committed token, is not yet)."""
    uniforms: torch.Tensor | None
    """[R, 2G+1] each decoding row's draws: G for the draft, G to verify, 1 for the bonus
    token (zeros for greedy rows); None without decoding rows."""
    cost: SPSTable | RowCostTable | None
    """The target's step cost that the `prefix` policy and the gate plan with (None: none
    profiled)."""
    fixed_seconds: float
    """Profiled seconds of this step besides its target forward, for its drafting rows (what
    `prefix` weighs each verified token against; `DraftGate.draft_seconds`, and
    `DraftGate.flush` for their deferred context)."""
    prefill: list[Request]
    """Waiting requests admitted this step (their caches reserved), prefilled in one forward
    after the decode."""
    prefill_uniforms: torch.Tensor | None
    """[P] each admitted request's draw for its first token; None without admissions."""
    dormant: list[str] = field(default_factory=list)
    """Requests that stop keeping a draft context from this step on (`Planner.dormant_after`):
    the engine drops what they hold."""
    lengths: list[int] = field(default_factory=list)
    """Draft tokens each decoding row verifies (0: none), set by `Planner.verify_lengths`."""
    regime: str | None = None
    """The regime (`regimes.GATE`, `PLAIN` or `FULL`) that `Planner.regimes` chose for this step, or
    None where it chose none (no `Regimes`, a sampled request, a row of another policy)."""
    demand: int = 0
    """Requests running and waiting when the step was planned (at most `max_num_seqs`): the
    load `Planner.regimes` keys its regimes by."""
    measured: bool = False
    """Whether the step's time may teach `Planner.regimes`: a regime chose it while every
    `prefix` row kept a draft context. A dormant row runs plain whatever the regime, so a
    step with one measures a mix (on a 2-core AVX2 CPU at 16 requests, a FULL window in which
    14 of 16 rows had gone dormant by the gate's bounds gave 950 tokens/s, where `fixed` ran
    at 1,255)."""

    @property
    def num_new(self) -> list[int]:
        """Tokens of each decoding row in the verify forward: its anchor and verified drafts."""
        return [1 + n for n in self.lengths]

    @property
    def verify_rows(self) -> list[int]:
        """Each decoding row's first packed row in the verify forward."""
        return _offsets(self.num_new)

    def verify_batch(self, draft_ids: torch.Tensor) -> ForwardBatch:
        """The verify forward: per decoding row its anchor and its first `lengths[r]` draft
        tokens (`draft_ids`: [R, G]), packed; logits at every row."""
        ids = [[r.last_token] + draft_ids[i, :self.lengths[i]].tolist()
               for i, r in enumerate(self.decode)]
        packed = torch.tensor([t for x in ids for t in x], device=draft_ids.device)
        return ForwardBatch([r.req_id for r in self.decode], self.starts, self.num_new, packed,
                            torch.arange(packed.numel(), device=draft_ids.device))

    @property
    def prefill_context(self) -> list[int]:
        """Rows of `prefill` that keep a draft context (their prompt becomes draft context)."""
        return [i for i, r in enumerate(self.prefill) if r.keeps_context]

    @property
    def prefill_rows(self) -> list[int]:
        """Each admitted request's first packed row in the prefill forward."""
        return _offsets([len(r.prompt_ids) for r in self.prefill])

    def prefill_batch(self, device: torch.device) -> ForwardBatch:
        """The prefill forward: every admitted prompt from position 0, packed; logits at each
        prompt's last row."""
        lengths = [len(r.prompt_ids) for r in self.prefill]
        ids = torch.tensor([t for r in self.prefill for t in r.prompt_ids], device=device)
        last_rows = torch.cumsum(torch.tensor(lengths, device=device), 0) - 1
        return ForwardBatch([r.req_id for r in self.prefill], [0] * len(lengths), lengths, ids,
                            last_rows)


@dataclass
class StepResult:
    """What a step's run hands its commit: the verification of every decoding row and the
    first token of every admitted request."""

    proposal: DraftProposal | None = None
    """The draft pass's proposal for `StepPlan.drafting`, or None (nobody drafted)."""
    draft_ids: torch.Tensor | None = None
    """[R, G] each decoding row's draft tokens (-1: none)."""
    accepted: list[int] = field(default_factory=list)
    """Draft tokens each decoding row accepted."""
    next_tokens: list[int] = field(default_factory=list)
    """Each decoding row's token after its accepted drafts (bonus, or correction)."""
    first_tokens: list[int] = field(default_factory=list)
    """Each admitted request's first generated token."""
    prefill_seconds: float = 0.0
    """Wall seconds of the newcomers' prefill (the step's other time is the decode's)."""


class Planner:
    """Makes each step's `StepPlan`; owns admission and the draft gate."""

    def __init__(self, config, gamma: int, sts: list[float] | None, kv: BlockAllocator,
                 draft_kv: BlockAllocator | None, device: torch.device):
        self.config, self.gamma, self.sts, self.device = config, gamma, sts, device
        self.kv, self.draft_kv = kv, draft_kv
        self.gate = DraftGate(gamma, sts, None, reweigh_steps=4, margin=1.1)
        """Skips drafting in `prefix` steps where it is not expected to pay (`DraftGate`);
        its costs are the profiler's (`profiler.profile_engine`)."""
        self.dormant_after = 32
        """Steps in a row in which the gate ruled drafting out by a bound (`DraftGate.ruled_out`:
        not even drafts always accepted, or not even requests as good as the best estimate
        held, could pay at the load) after which the `prefix` requests running stop keeping a
        draft context and will not draft again, and those admitted while it lasts keep none:
        under such a load the features, their deferral and the gate's planning cost 2-4% of
        a plain step for context no draft pass would read (64 requests on a 2-core CPU).
        Requests admitted after the load has eased keep a context again."""
        self._ruled_out_steps = 0
        self._streak_greedy: bool | None = None
        """Whether the steps `_ruled_out_steps` counts decoded greedily only (timing may
        steer those, and must not reach a sampled request's schedule) or not; None: none yet."""
        self.regimes: Regimes | None = None
        """Whether greedy `prefix` steps let the gate choose or nobody draft, by the
        throughput each has given at the load (`regimes.Regimes`); None: the gate always.
        Set it with `use_regimes`."""
        self._cost: SPSTable | RowCostTable | None = None

    def plan(self, running: list[Request], waiting: deque[Request],
             cost: SPSTable | RowCostTable | None) -> StepPlan:
        """The plan of the next step over `running`, admitting from `waiting` (FIFO, within
        `max_num_seqs`, `max_prefill_tokens` and the caches' budgets)."""
        self._cost = cost  # what `drafting_outlook` forecasts with
        decode = list(running)
        keep = [i for i, r in enumerate(decode) if r.keeps_context]
        greedy = all(r.params.temperature == 0 for r in decode)
        demand = self._joined_load(len(running) + len(waiting))
        regime = self._regime(decode, keep, cost, greedy, demand)
        if regime == PLAIN:
            drafting = self.gate.skip(decode, keep, cost)
        elif regime == FULL:  # all draft (their blocks still update the gate's estimates)
            drafting, self.gate.ruled_out = list(keep), False
        else:
            drafting = self.gate.rows(decode, keep, cost, self.config.max_batch_tokens,
                                      greedy=greedy)
        measured = regime is not None and all(r.keeps_context for r in decode
                                              if r.policy == Policy.PREFIX)
        dormant = self._dormancy(decode, keep, drafting, cost, len(waiting), greedy, regime)
        if dormant:
            keep = [i for i in keep if decode[i].keeps_context]
        admitted = self._admit(len(running), waiting, cost)
        return StepPlan(
            decode=decode, keep_context=keep, drafting=drafting,
            starts=[r.num_tokens - 1 for r in decode],
            uniforms=self._all_draws(decode, 2 * self.gamma + 1),
            cost=cost,
            fixed_seconds=(self.gate.draft_seconds(len(drafting), len(decode))
                           + self.gate.flush.seconds([decode[i].req_id for i in drafting])
                           if decode else 0.0),
            prefill=admitted, dormant=dormant, regime=regime, demand=demand, measured=measured,
            prefill_uniforms=(torch.stack([self._draws(r, 1) for r in admitted])[:, 0]
                              if admitted else None))

    def use_regimes(self, regimes: Regimes) -> None:
        """Steer greedy `prefix` steps by `regimes`, which new loads ask for this planner's
        forecast (`drafting_outlook`)."""
        regimes.forecast = self.drafting_outlook
        self.regimes = regimes

    def drafting_outlook(self, demand: int, tokens_per_row: float) -> float | None:
        """What the tables the last plan used forecast for a step of `demand` rows (at most
        `max_num_seqs`) all drafting and verifying whole blocks, each committing
        `tokens_per_row`: its tokens per second as a multiple of a plain step's, the gate's
        online factor for drafting steps at that load divided out; None without tables."""
        cost, gate = self._cost, self.gate
        if cost is None or gate.draft_cost is None or demand < 1:
            return None
        rows = self._joined_load(demand)
        at = gate.cost_at_rows(cost, rows)
        plain = 1.0 / at(rows) + gate.draft_seconds(0, rows)
        full = 1.0 / at(rows * (1 + self.gamma)) + gate.draft_seconds(rows, rows)
        factor = gate.online.drafting_factor(rows) if gate.online is not None else 1.0
        return tokens_per_row * plain / (full * factor)

    def _regime(self, decode: list[Request], keep: list[int], cost, greedy: bool,
                demand: int) -> str | None:
        """The step's regime from `regimes` at `demand`, where it steers: every decoding
        request greedy, some keeping a draft context, all of those `prefix`, and the gate
        able to weigh."""
        if (self.regimes is None or not greedy or not keep or cost is None
                or self.gate.draft_cost is None
                or any(decode[i].policy != Policy.PREFIX for i in keep)):
            return None
        return self.regimes.regime(demand)

    def verify_lengths(self, plan: StepPlan, proposal: DraftProposal | None) -> None:
        """Set `plan.lengths` from the draft pass's proposal, under each row's policy; the gate
        learns from the proposal's confidence."""
        plan.lengths = choose_lengths(plan.decode, plan.drafting, proposal, gamma=self.gamma,
                                      sps=self._step_cost(plan), threshold=self.config.threshold,
                                      sts=self.sts, max_batch_tokens=self.config.max_batch_tokens,
                                      draft_seconds=plan.fixed_seconds,
                                      whole_blocks=plan.regime == FULL)
        self.gate.observe(plan.decode, plan.drafting, proposal)

    def predicted_seconds(self, plan: StepPlan) -> float | None:
        """What the tables say the decode part of `plan` takes once its verify lengths are
        set: its fixed seconds and its target forward; None without decoding rows or a cost
        table."""
        if not plan.decode or plan.cost is None:
            return None
        return plan.fixed_seconds + 1.0 / self._step_cost(plan)(float(sum(plan.num_new)))

    def _step_cost(self, plan: StepPlan):
        """`plan.cost` at the step's rows (forwards per second by tokens), resolved once a
        load while the tables stay (an `SPSTable` is its own, whatever the rows); None
        without one."""
        return (self.gate.cost_at_rows(plan.cost, len(plan.decode))
                if plan.cost is not None and plan.decode else None)

    def _dormancy(self, decode: list[Request], keep: list[int], drafting: list[int], cost,
                  num_waiting: int, greedy: bool, regime: str | None) -> list[str]:
        """Count the steps in a row in which the gate's bounds ruled drafting out (with nobody
        keeping a context, the bounds at the load its rows and the waiting requests make), or
        greedy steps at a load where `regimes` has settled on plain decoding (drafting's
        windows there lost, and lost again when tried: 64 requests on a 2-core AMX CPU kept
        every context through the run, its windows and features costing 4-8%; the bounds,
        which assume drafts always accepted, did not rule drafting out).
        Once they reach `dormant_after` (at a settled load, at once), every `prefix` request
        of `keep` stops keeping a context (its id is returned, for the engine to drop what
        it holds), and so do newcomers while the count holds, where the bounds rule drafting
        out at the load they join, and greedy newcomers at a load settled on plain (`_admit`;
        an engine that idled and takes one request keeps its context). Dormant requests run
        no gate window, so a load settled on plain is not tried again while it lasts; those
        admitted once it eases keep a context again. Tables
        and estimates decide, and no token: verification is untouched. Greedy steps (all
        rows greedy) and the others count apart: a streak of one kind ends where a step of
        the other comes, so what timing made of greedy steps never reaches a sampled
        request's schedule (a seed's text repeats when the same requests come in order)."""
        if not decode:  # nothing decoded: nothing learned (a batch ended, or the engine idles)
            return []
        if greedy != self._streak_greedy:
            self._ruled_out_steps, self._streak_greedy = 0, greedy
        joined = self._joined_load(len(decode) + num_waiting)  # the load `regimes` keys by
        if keep:
            ruled = not drafting and (self.gate.ruled_out
                                      or (regime == PLAIN and self._settled_plain(joined)))
        else:
            ruled = cost is not None and (self.gate.rules_out(joined, cost)
                                          or (greedy and self._settled_plain(joined)))
        self._ruled_out_steps = self._ruled_out_steps + 1 if ruled else 0
        settled = bool(keep) and regime == PLAIN and self._settled_plain(joined)
        if self._ruled_out_steps < self.dormant_after and not settled:
            return []  # (the regimes' verdict rests on windows of steps already: no streak)
        gone = [decode[i] for i in keep if decode[i].policy == Policy.PREFIX]
        for req in gone:
            req.keeps_context = False
        return [r.req_id for r in gone]

    def _settled_plain(self, load: int) -> bool:
        """Whether `regimes` has settled on plain decoding at `load` (False without them)."""
        return self.regimes is not None and self.regimes.settled_plain(load)

    def _joined_load(self, requests: int) -> int:
        """The rows a step will run once `requests` (running, admitted, waiting) have seats."""
        return min(self.config.max_num_seqs, requests)

    def _admit(self, num_running: int, waiting: deque[Request], cost) -> list[Request]:
        admitted, prefill_tokens = [], 0
        while waiting and num_running + len(admitted) < self.config.max_num_seqs:
            req = waiting[0]
            total = len(req.prompt_ids) + req.params.max_tokens
            spec = req.policy != Policy.AR
            if admitted and prefill_tokens + len(req.prompt_ids) > self.config.max_prefill_tokens:
                break
            if not self.kv.can_reserve(total) or (spec and not self.draft_kv.can_reserve(total)):
                break  # FIFO: wait for budget rather than let later requests overtake
            self.kv.reserve(req.req_id, total)
            if spec:
                self.draft_kv.reserve(req.req_id, total)
            waiting.popleft()
            req.status = Status.RUNNING
            admitted.append(req)
            prefill_tokens += len(req.prompt_ids)
        joined = self._joined_load(num_running + len(admitted) + len(waiting))
        ruled = (bool(admitted) and cost is not None
                 and self._ruled_out_steps >= self.dormant_after
                 and self.gate.rules_out(joined, cost))
        settled = bool(admitted) and self._settled_plain(joined)
        for req in admitted:  # drafting is ruled out at the load they join: no context
            greedy = req.params.temperature == 0  # (greedy steps' findings steer greedy ones)
            if req.policy == Policy.PREFIX and (
                    (ruled and greedy == self._streak_greedy) or (settled and greedy)):
                req.keeps_context = False
        return admitted

    def _all_draws(self, reqs: list[Request], n: int) -> torch.Tensor | None:
        """[R, n] each request's draws (`_draws`), or None without requests."""
        if not reqs:
            return None
        if all(r.params.temperature == 0 for r in reqs):  # one tensor, not one a request
            return torch.zeros(len(reqs), n, device=self.device)
        return torch.stack([self._draws(r, n) for r in reqs])

    def _draws(self, req: Request, n: int) -> torch.Tensor:
        if req.params.temperature == 0:  # greedy: one-hot distributions ignore the draw
            return torch.zeros(n, device=self.device)
        return torch.rand(n, generator=req.generator, device=self.device)


def _offsets(counts: list[int]) -> list[int]:
    """Where each of consecutive runs of `counts` rows begins."""
    out, total = [], 0
    for n in counts:
        out.append(total)
        total += n
    return out
