"""The DSpark engine: continuous batching of many requests on one device.

One `step()` is three calls. `Planner.plan` (`planner`) decides the step: which running
requests decode and which of them draft, the costs the verify-length policy weighs, and which
waiting requests are admitted. `_run` does its tensor work: for every decoding request
together, one draft pass (`DraftRunner`: backbone forward, sequential Markov stage), the
verify lengths (`Planner.verify_lengths`), ONE target forward over all verify tokens (ragged,
`TargetRunner`), speculative sampling (`verifier`), cache rollback and the draft context of
the committed positions; then one batched prefill of the newcomers. `_commit` appends the
tokens and hands back every request's increment. Loading is `loader`'s, the cost profiles
`profiler`'s.

Knows: where the parts meet. Does not know: Ray, gRPC, or which worker runs a job.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass

import torch

from sparkgrid.detokenizer import IncrementalDetokenizer
from worker.engine.config import EngineConfig, Resume, SamplingParams
from worker.engine.draft_gate import DraftGate
from worker.engine.draft_runner import DraftRunner
from worker.engine.drafter import DSparkDraft
from worker.engine.host_memory import keep_freed_memory
from worker.engine.kv_cache import BlockAllocator, PagedKV
from worker.engine.linear import pack_linears
from worker.engine.loader import (
    EngineModels,
    draft_vocab,
    eos_ids,
    load_models,
    share_frozen_copies,
)
from worker.engine.model_runner import TargetRunner
from worker.engine.online_calibration import OnlineCalibration
from worker.engine.online_costs import OnlineCosts
from worker.engine.planner import Planner, StepPlan, StepResult
from worker.engine.profiler import EngineCosts, profile_engine
from worker.engine.regimes import Regimes
from worker.engine.request import Request, RequestOutput
from worker.engine.sampling import argmax_rows, sample, warp_probs
from worker.engine.spec_step import DraftProposal, pad_rows, stated_confidence
from worker.engine.verifier import next_tokens, sampling_columns, verify_step
from worker.engine.verify_policy import Policy, parse_policy


@dataclass
class Counters:
    """Cumulative work done, so tests and metrics can see what ran."""

    steps: int = 0
    prefill_forwards: int = 0
    verify_forwards: int = 0
    draft_forwards: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    verify_tokens: int = 0
    """Tokens of all verify forwards (anchors + draft tokens)."""
    draft_tokens_verified: int = 0
    draft_tokens_accepted: int = 0


class LLMEngine:
    """Serves requests on one target (and optionally one DSpark drafter) on one device."""

    def __init__(self, config: EngineConfig, target, tokenizer, draft: DSparkDraft | None = None,
                 sts_temperatures: list[float] | None = None,
                 draft_ranking: list[int] | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.draft = draft
        self.shared_with_target = share_frozen_copies(draft, target) if draft is not None else []
        """The drafter's tensors that now point at the target's (equal frozen copies)."""
        self.draft_vocab = draft_vocab(draft, draft_ranking, config.draft_vocab_size)
        """The tokens a draft pass may propose (`DraftVocab`); None: the whole vocabulary."""
        self.gamma = draft.gamma if draft is not None else 0
        self.sts = sts_temperatures
        self.device, self.dtype = config.torch_device, config.torch_dtype
        if self.device.type == "cpu" and config.keep_freed_memory:
            keep_freed_memory()  # a forward's temporaries reuse freed pages (`host_memory`)
        tcfg = target.config
        self.max_context = getattr(tcfg, "max_position_embeddings", 1 << 30)
        self.vocab_size = tcfg.vocab_size
        self.kv = self._make_kv(config.kv_budget_tokens, "target kv cache", tcfg)
        self.runner = TargetRunner(target, self.kv, list(draft.target_layer_ids) if draft else [])
        drafter_packed = 0
        if draft is not None and self.runner.backend == "native":  # linear.py: oneDNN layouts
            drafter_packed = pack_linears(draft, skip=("lm_head",))  # the lm_head: the target's
            if "lm_head" in self.shared_with_target and self.runner.lm_head.bias is None:
                # the target's packed (or widened) copy serves the draft's base logits too
                draft.serving_lm_head = self.runner.lm_head
            draft.use_native_ops()
            if self.draft_vocab is not None:
                self.draft_vocab = self.draft_vocab.packed()
                drafter_packed += self.draft_vocab.lm_head.packed_bytes
        self.packed_weight_bytes = self.runner.packed_bytes + drafter_packed
        """Weight bytes held a second time, laid out for oneDNN or widened to float32
        (`linear.py`); 0 off the native half-precision path."""
        self.draft_kv = (self._make_kv(config.draft_kv_budget_tokens, "draft kv cache",
                                       draft.config) if draft is not None else None)
        self.draft_runner = (DraftRunner(draft, self.draft_kv, self.device, self.draft_vocab)
                             if draft is not None else None)
        self.eos_ids = eos_ids(target, tokenizer, config)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.counters = Counters()
        self.confidence_records: list[tuple[torch.Tensor, torch.Tensor]] = []
        """(raw confidence logits [G], acceptance [G] int8: 1 accepted, 0 rejected, -1 not
        verified) per drafted block, when `config.record_confidence` is on."""
        self.calibration = (OnlineCalibration(self.gamma)
                            if draft is not None and config.online_calibration else None)
        """Per-position corrections of the confidence from this engine's own verifications
        (`OnlineCalibration`), or None."""
        self.planner = Planner(config, self.gamma, self.sts, self.kv.allocator,
                               self.draft_kv.allocator if draft is not None else None, self.device)
        self.sps = None
        """SPS(B), the target's forwards per second by tokens per forward (the verify-length
        policy's cost model): profiled at start when `config.profile_sps`, or set by the owner."""
        self.step_cost = None
        """The target's step cost by sequences and tokens (`RowCostTable`), which the `prefix`
        policy plans with; profiled with SPS(B), or set by the owner."""
        profiled = config.profile_sps and draft is not None
        self._check_policy(parse_policy(config.policy), "policy", will_profile=profiled)
        if profiled:
            self.costs = profile_engine(self)
        if self.draft_runner is not None:
            self.gate.flush.tokens = self.draft_runner.deferred_tokens
            if config.online_costs:
                self.gate.online = OnlineCosts()
            if config.online_regimes:
                self.planner.use_regimes(Regimes())

    @property
    def costs(self) -> EngineCosts:
        """Every cost table the engine plans with; setting it replaces them all (an owner
        that needs two engines to choose alike gives one the other's: a table read back from
        the cache is measured again where its spot check finds it slowed)."""
        return EngineCosts(self.sps, self.step_cost, self.gate.draft_cost, self.gate.overhead,
                           self.gate.flush.table)

    @costs.setter
    def costs(self, costs: EngineCosts) -> None:
        self.sps, self.step_cost = costs.sps, costs.step_cost
        self.gate.draft_cost, self.gate.overhead = costs.draft_cost, costs.overhead
        self.gate.flush.table = costs.flush_cost

    @property
    def gate(self) -> DraftGate:
        """Skips drafting in `prefix` steps where it is not expected to pay (the planner's)."""
        return self.planner.gate

    @classmethod
    def from_pretrained(cls, target: str, draft: str | None = None,
                        config: EngineConfig | None = None) -> "LLMEngine":
        """Load a Qwen3/Llama target (local dir or hub id) and a DSpark draft checkpoint."""
        config = config or EngineConfig()
        return cls.from_models(config, load_models(target, draft, config))

    @classmethod
    def from_models(cls, config: EngineConfig, models: EngineModels) -> "LLMEngine":
        """An engine over models already loaded (`loader.load_models`)."""
        return cls(config, models.target, models.tokenizer, models.draft, models.sts,
                   models.ranking)

    # -- requests --------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, *,
                    req_id: str | None = None, policy: str | None = None,
                    resume: Resume | None = None) -> str:
        """Queue a request; raises ValueError naming the field when the input is bad.
        `resume` continues a request that another engine began (failover): its tokens extend
        the prompt, and only text the client has not seen is streamed."""
        params = params or SamplingParams()
        pol = parse_policy(policy or self.config.policy, field="policy")
        self._check_policy(pol, "policy")
        req_id = req_id or secrets.token_hex(8)
        if req_id in self.requests:
            raise ValueError(f"req_id: {req_id!r} is already in the engine")
        ids = self._prompt_ids(prompt)
        resume = resume or Resume()
        context = ids + self._prompt_ids(resume.token_ids, "resume.token_ids", allow_empty=True)
        total = len(context) + params.max_tokens
        if total > self.max_context:
            raise ValueError(f"max_tokens: prompt ({len(context)} tokens) + max_tokens "
                             f"({params.max_tokens}) exceeds the model context of "
                             f"{self.max_context}")
        self.kv.allocator.check_fits_ever(total)
        if self.draft_kv is not None and pol is not Policy.AR:
            self.draft_kv.allocator.check_fits_ever(total)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        detok = IncrementalDetokenizer(self.tokenizer, ids)
        req = Request(req_id, context, params, pol.value, detok, self.eos_ids, seed, self.device)
        req.resume(resume)
        self.requests[req_id] = req
        self.waiting.append(req)
        return req_id

    def abort(self, req_id: str) -> RequestOutput | None:
        """Remove a request now (between steps) and free its cache; None if unknown."""
        req = self.requests.get(req_id)
        if req is None:
            return None
        req.finish("abort")
        out = req.take_output()
        self._release(req)
        return out

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns the increments of every request that moved."""
        started = time.perf_counter()
        plan = self.planner.plan(self.running, self.waiting, self.step_cost or self.sps)
        result = self._run(plan)
        generated = self.counters.generated_tokens
        outputs = self._commit(plan, result)
        decode_seconds = time.perf_counter() - started - result.prefill_seconds
        if plan.measured:  # the decode's tokens and time (the prefill's are not)
            self.planner.regimes.observe(
                plan.demand, plan.regime,
                self.counters.generated_tokens - generated - len(plan.prefill), decode_seconds,
                drafted=bool(plan.drafting), rows=len(plan.decode))
        # the gate learns from the steps it plans: those with a `prefix` row keeping a context
        # (a `fixed` or `ar` step runs another regime, all rows drafting or none, which it never
        # chooses between plain and partial steps, and must not steer it)
        planned = self.gate.online is not None and any(
            plan.decode[i].policy == Policy.PREFIX for i in plan.keep_context)
        predicted = self.planner.predicted_seconds(plan) if planned else None
        if predicted is not None:  # the whole step's time but the newcomers' prefill
            self.gate.online.observe(len(plan.decode), bool(plan.drafting), predicted,
                                     decode_seconds)
        return outputs

    def generate(self, prompts: list[str | list[int]],
                 params: SamplingParams | list[SamplingParams],
                 policy: str | None = None) -> list[dict]:
        """Run prompts to completion; returns per prompt its token ids, text, reason, stats."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp, policy=policy) for p, sp in zip(prompts, plist)]
        results = {i: {"token_ids": [], "text": ""} for i in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.req_id in results:
                    res = results[out.req_id]
                    res["token_ids"] += out.token_ids
                    res["text"] += out.text
                    if out.finished:
                        res.update(finish_reason=out.finish_reason, stats=out.stats.as_dict())
        return [results[i] for i in ids]

    # -- run: the step's forwards ------------------------------------------------------------
    def _run(self, plan: StepPlan) -> StepResult:
        """The decode (draft pass, verify forward, verification, cache upkeep), then the
        prefill of the newcomers."""
        result = self._decode(plan) if plan.decode else StepResult()
        if plan.prefill:
            started = time.perf_counter()
            result.first_tokens = self._prefill(plan)
            result.prefill_seconds = time.perf_counter() - started
        return result

    def _decode(self, plan: StepPlan) -> StepResult:
        """Draft, fix the verify lengths, verify every decoding row in one forward."""
        reqs, rows, gamma = plan.decode, plan.drafting, self.gamma
        for req_id in plan.dormant:  # they will not draft again: their context goes
            self.draft_runner.forget(req_id)
        if rows:  # the drafting requests' context, as far as it was deferred
            self.draft_runner.flush_context([reqs[i].req_id for i in rows])
        proposal = self.draft_pass([reqs[i] for i in rows], plan.uniforms[rows, :gamma]) \
            if rows else None
        self.planner.verify_lengths(plan, proposal)
        draft_ids = pad_rows(proposal.ids if proposal else None, rows, len(reqs), gamma,
                             self.device)
        batch = plan.verify_batch(draft_ids)
        logits, feats = self.runner.forward(batch, want_features=bool(plan.keep_context))
        self.counters.verify_forwards += 1
        self.counters.verify_tokens += batch.input_ids.numel()
        n_acc, nxt = verify_step(plan, logits, draft_ids, proposal, gamma=gamma,
                                 vocab_size=self.vocab_size, device=self.device)
        for i, req in enumerate(reqs):
            # roll back the target cache to the anchor plus the accepted draft tokens
            self.kv.allocator.truncate(req.req_id, plan.starts[i] + n_acc[i] + 1)
        if plan.keep_context:  # the target's features at committed positions: draft context
            keep, row_starts = plan.keep_context, plan.verify_rows
            self.draft_runner.defer_context([reqs[i].req_id for i in keep], feats,
                                             [row_starts[i] for i in keep],
                                             [n_acc[i] + 1 for i in keep],
                                             [plan.starts[i] for i in keep])
        return StepResult(proposal, draft_ids, n_acc, nxt)

    def _prefill(self, plan: StepPlan) -> list[int]:
        """One forward over every admitted prompt; returns each request's first token."""
        reqs, batch, keep = plan.prefill, plan.prefill_batch(self.device), plan.prefill_context
        logits, feats = self.runner.forward(batch, want_features=bool(keep))
        self.counters.prefill_forwards += 1
        self.counters.prompt_tokens += sum(batch.num_new)
        first = next_tokens(reqs, logits, [1] * len(reqs), plan.prefill_uniforms,
                            self.device).tolist()
        if keep:
            rows = plan.prefill_rows
            self.draft_runner.defer_context([reqs[i].req_id for i in keep], feats,
                                             [rows[i] for i in keep],
                                             [batch.num_new[i] for i in keep], [0] * len(keep),
                                             copy=True)
        return first

    def draft_pass(self, reqs: list[Request], uniforms: torch.Tensor) -> DraftProposal:
        """One draft backbone forward for all drafting requests, then the Markov stage
        (`uniforms`: [S, G] their draws). The profiler times it on stand-in rows."""
        temps, top_k, top_p = sampling_columns(reqs, [1] * len(reqs), self.device)
        greedy = all(r.params.temperature == 0 for r in reqs)

        def sample_fn(k: int, logits: torch.Tensor):
            if greedy:  # what `sample` draws from warp_probs' one-hot rows; no q needed
                # in float32: exact for bfloat16 logits, and the CPU argmax is faster there
                return argmax_rows(logits.float()), None
            probs = warp_probs(logits, temps, top_k, top_p)
            return sample(probs, uniforms[:, k - 1]), probs

        ids, probs, conf_logits = self.draft_runner.propose(
            [r.req_id for r in reqs], [r.last_token for r in reqs],
            [r.num_tokens - 1 for r in reqs], sample_fn, self.runner.backend)
        self.counters.draft_forwards += 1
        for r in reqs:
            r.stats.draft_tokens_proposed += self.gamma
        proposal = DraftProposal(ids, probs, conf_logits)
        if conf_logits is not None and self.calibration is not None:
            proposal.conf = self.calibration.apply(stated_confidence(proposal, self.sts),
                                                   [r.params.temperature == 0 for r in reqs])
        return proposal

    # -- commit: tokens, statistics, outputs ---------------------------------------------------
    def _commit(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        """Append every decoding row's accepted drafts and next token and every newcomer's
        first token, learn from the drafted blocks, release the finished; returns the
        increments of every request that moved."""
        self.counters.steps += 1
        for i, req in enumerate(plan.decode):
            n_acc = result.accepted[i]
            if req.policy != Policy.AR:  # a dormant one's plain steps too (`keeps_context`)
                req.stats.record(plan.lengths[i], n_acc, self.gamma)
                self.counters.draft_tokens_verified += plan.lengths[i]
                self.counters.draft_tokens_accepted += n_acc
            before = len(req.output_ids)
            req.commit(result.draft_ids[i, :n_acc].tolist() + [result.next_tokens[i]])
            self.counters.generated_tokens += len(req.output_ids) - before
        if result.proposal is not None:
            self._learn(plan, result)
        for req, tok in zip(plan.prefill, result.first_tokens):
            req.commit([tok])
        self.counters.generated_tokens += len(plan.prefill)
        self.running += plan.prefill
        moved = plan.decode + plan.prefill
        outputs = [r.take_output() for r in moved]
        for req in moved:
            if req.finished:
                self._release(req)
        return outputs

    def _learn(self, plan: StepPlan, result: StepResult) -> None:
        """The drafted blocks' outcomes: online calibration, and the confidence records."""
        proposal, rows = result.proposal, plan.drafting
        lengths = [plan.lengths[i] for i in rows]
        n_acc = [result.accepted[i] for i in rows]
        if self.calibration is not None and proposal.conf is not None:
            self.calibration.update(stated_confidence(proposal, self.sts), proposal.conf,
                                    [plan.decode[i].params.temperature == 0 for i in rows],
                                    lengths, n_acc)
        if self.config.record_confidence and proposal.conf_logits is not None:
            for row, verified, accepted in zip(proposal.conf_logits.float().cpu(), lengths, n_acc):
                labels = torch.full((self.gamma,), -1, dtype=torch.int8)
                labels[:accepted] = 1
                if accepted < verified:
                    labels[accepted] = 0
                self.confidence_records.append((row, labels))

    # -- helpers -----------------------------------------------------------------------------
    def _release(self, req: Request) -> None:
        admitted = req.req_id in self.kv.allocator
        self.kv.allocator.free(req.req_id)
        if self.draft_kv is not None:
            self.draft_kv.allocator.free(req.req_id)
            self.draft_runner.forget(req.req_id)
        self.requests.pop(req.req_id, None)
        self.gate.forget(req.req_id)
        if admitted:
            self.running.remove(req)
        else:  # never admitted (aborted while queued)
            self.waiting.remove(req)

    def _prompt_ids(self, prompt, field: str = "prompt", allow_empty: bool = False) -> list[int]:
        if isinstance(prompt, str) and field == "prompt":
            ids = self.tokenizer(prompt).input_ids
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError(f"{field}: expected a string or a list of token ids")
        if not ids and not allow_empty:
            raise ValueError(f"{field}: must not be empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{field}: token id {bad[0]} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        return ids

    def _check_policy(self, policy: Policy, field: str, will_profile: bool = False) -> None:
        if policy is Policy.AR:
            return
        if self.draft is None:
            raise ValueError(f"{field}: {policy.value!r} needs a draft model; this engine has none "
                             "(use 'ar')")
        needs_conf = policy in (Policy.PREFIX, Policy.THRESHOLD)
        if needs_conf and not self.draft.config.enable_confidence_head:
            raise ValueError(f"{field}: {policy.value!r} needs a draft with a confidence head; "
                             "this draft has none (use 'fixed' or 'ar')")
        if policy is Policy.PREFIX and self.sps is None and not will_profile:
            raise ValueError(f"{field}: 'prefix' needs the SPS profile (profile_sps=True)")

    def _make_kv(self, budget: int, name: str, cfg) -> PagedKV:
        bs = self.config.kv_block_size
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        alloc = BlockAllocator(-(-budget // bs), bs, name)
        return PagedKV(alloc, cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim,
                       device=self.device, dtype=self.dtype)
