"""The DSpark engine: continuous batching of many requests on one device.

One `step()` = admit and prefill newcomers (one batched forward), then for every decoding
request together: one draft backbone forward, the sequential Markov stage, the choice of
how many draft tokens each request verifies, ONE target forward over all verify tokens
(ragged), speculative sampling, commit and cache rollback.

Knows: where the parts meet. Does not know: Ray, gRPC, or which worker runs a job.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from worker.engine.attention import attention_meta, implementation_id, paged_attention
from worker.engine.config import EngineConfig, Resume, SamplingParams
from worker.engine.detokenizer import IncrementalDetokenizer
from worker.engine.draft_vocab import RANKING_NAME, DraftVocab, load_ranking
from worker.engine.drafter import DSparkDraft
from worker.engine.kv_cache import BlockAllocator, PagedKV
from worker.engine.model_runner import ForwardBatch, TargetRunner, load_target, packed_index
from worker.engine.prefix_scheduler import Policy, parse_policy
from worker.engine.profiler import (device_name, load_or_profile, load_or_profile_draft,
                                    load_or_profile_overhead, load_or_profile_rows,
                                    best_seconds, sync)
from worker.engine.rejection import verify, verify_greedy
from worker.engine.request import Request, RequestOutput, SpecStats, Status
from worker.engine.sampling import sample, warp_probs
from worker.engine.online_calibration import OnlineCalibration
from worker.engine.spec_step import (DraftGate, DraftProposal, StepOverhead, choose_lengths,
                                     confidence, pad_rows)
from worker.engine.sts import load_sts


# Bumped when the engine's own step work changes in cost (the draft and overhead profiles
# cached on disk are keyed by it): 2 = greedy draft argmax in float32; 3 = best-of-N timings.
_ENGINE_COST_VERSION = 3


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
        self.draft_vocab = self._draft_vocab(draft, draft_ranking, config.draft_vocab_size)
        """The tokens a draft pass may propose (`DraftVocab`); None: the whole vocabulary."""
        self.gamma = draft.gamma if draft is not None else 0
        self.sts = sts_temperatures
        self.device, self.dtype = config.torch_device, config.torch_dtype
        tcfg = target.config
        self.max_context = getattr(tcfg, "max_position_embeddings", 1 << 30)
        self.vocab_size = tcfg.vocab_size
        self.kv = self._make_kv(config.kv_budget_tokens, "target kv cache", tcfg)
        self.runner = TargetRunner(target, self.kv, list(draft.target_layer_ids) if draft else [])
        self.draft_kv = (self._make_kv(config.draft_kv_budget_tokens, "draft kv cache", draft.config)
                         if draft is not None else None)
        self.eos_ids = self._eos_ids(target, tokenizer, config)
        self.sps = None
        """SPS(B), the target's forwards per second by tokens per forward (the prefix policy's
        cost model): profiled at start when `config.profile_sps`, or set by the owner."""
        if config.profile_sps and draft is not None:
            self.sps = load_or_profile(self.runner, dtype=self.dtype, max_tokens=config.max_batch_tokens,
                                       ctx_len=config.sps_context_len, gamma=self.gamma,
                                       cache_dir=config.sps_cache_dir)
        self.step_cost = None
        """The target's step cost by sequences and tokens (`RowCostTable`), which the `prefix`
        policy plans with; profiled with SPS(B), or set by the owner."""
        if self.sps is not None:
            self.step_cost = load_or_profile_rows(
                self.runner, dtype=self.dtype, max_rows=config.max_num_seqs,
                ctx_len=config.sps_context_len, gamma=self.gamma, cache_dir=config.sps_cache_dir)
        self._check_policy(parse_policy(config.policy), "policy")
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
        draft_cost, fit = None, 1
        if self.sps is not None:
            alloc = self.draft_kv.allocator  # a small cache cannot profile many rows
            fit = (alloc.num_blocks - alloc.num_reserved_blocks) // alloc.blocks_for(1 + self.gamma)
            draft_ident = {"device": device_name(self.device), "torch": torch.__version__,
                           "dtype": str(self.dtype), "ctx_len": config.sps_context_len,
                           "target": tcfg.to_json_string(use_diff=False),
                           "draft": repr(draft.config),
                           "draft_vocab_size": config.draft_vocab_size,
                           "attention": implementation_id(self.runner.backend),
                           "engine": _ENGINE_COST_VERSION}
            draft_cost = load_or_profile_draft(
                self._time_draft, max_rows=max(1, min(config.max_num_seqs, fit)),
                cache_dir=config.sps_cache_dir, ident=draft_ident)
        self.gate = DraftGate(self.gamma, self.sts, draft_cost)
        """Skips drafting in `prefix` steps where it is not expected to pay (`DraftGate`)."""
        self._overhead_sink: list[float] | None = None
        """Collects steps' non-forward seconds while `_time_overhead` profiles them."""
        if draft_cost is not None:
            self.gate.overhead = StepOverhead(*load_or_profile_overhead(
                self._time_overhead, max_rows=max(1, min(config.max_num_seqs, fit)),
                cache_dir=config.sps_cache_dir, ident=draft_ident))

    @classmethod
    def from_pretrained(cls, target: str, draft: str | None = None,
                        config: EngineConfig | None = None) -> "LLMEngine":
        """Load a Qwen3/Llama target (local dir or hub id) and a DSpark draft checkpoint."""
        config = config or EngineConfig()
        model = load_target(target, device=config.torch_device, dtype=config.torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(target)
        drafter, sts, ranking = None, None, None
        if draft is not None:
            drafter = DSparkDraft.from_pretrained(draft, model.config, device=config.torch_device,
                                                  dtype=config.torch_dtype)
            if Path(draft).is_dir():
                sts = load_sts(draft)
                ranking = load_ranking(draft, drafter.config.vocab_size)
        return cls(config, model, tokenizer, drafter, sts, ranking)

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
                             f"({params.max_tokens}) exceeds the model context of {self.max_context}")
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
        self.counters.steps += 1
        decoding = list(self.running)
        if decoding:
            self._decode(decoding)
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
            self.running += admitted
        outputs = [r.take_output() for r in decoding + admitted]
        for req in decoding + admitted:
            if req.finished:
                self._release(req)
        return outputs

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams],
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

    # -- admission and prefill -------------------------------------------------------------
    def _admit(self) -> list[Request]:
        admitted, prefill_tokens = [], 0
        while self.waiting and len(self.running) + len(admitted) < self.config.max_num_seqs:
            req = self.waiting[0]
            total = len(req.prompt_ids) + req.params.max_tokens
            spec = req.policy != Policy.AR
            if admitted and prefill_tokens + len(req.prompt_ids) > self.config.max_prefill_tokens:
                break
            if not self.kv.allocator.can_reserve(total) or (
                    spec and not self.draft_kv.allocator.can_reserve(total)):
                break  # FIFO: wait for budget rather than let later requests overtake
            self.kv.allocator.reserve(req.req_id, total)
            if spec:
                self.draft_kv.allocator.reserve(req.req_id, total)
            self.waiting.popleft()
            req.status = Status.RUNNING
            admitted.append(req)
            prefill_tokens += len(req.prompt_ids)
        return admitted

    def _prefill(self, reqs: list[Request]) -> None:
        lengths = [len(r.prompt_ids) for r in reqs]
        ids = torch.tensor([t for r in reqs for t in r.prompt_ids], device=self.device)
        last_rows = torch.cumsum(torch.tensor(lengths, device=self.device), 0) - 1
        spec = [i for i, r in enumerate(reqs) if r.policy != Policy.AR]
        batch = ForwardBatch([r.req_id for r in reqs], [0] * len(reqs), lengths, ids, last_rows)
        logits, feats = self.runner.forward(batch, want_features=bool(spec))
        self.counters.prefill_forwards += 1
        self.counters.prompt_tokens += sum(lengths)
        uniforms = torch.stack([self._uniforms(r, 1) for r in reqs])[:, 0]
        first = self._next_tokens(reqs, logits, [1] * len(reqs), uniforms).tolist()
        if spec:
            starts = [int(last_rows[i]) - lengths[i] + 1 for i in spec]
            self._extend_draft_context([reqs[i] for i in spec], feats, starts,
                                       [lengths[i] for i in spec], [0] * len(spec))
        for req, tok in zip(reqs, first):
            req.commit([tok])
        self.counters.generated_tokens += len(reqs)

    # -- decoding ----------------------------------------------------------------------------
    def _decode(self, reqs: list[Request]) -> None:
        started = time.perf_counter()
        forward = self._decode_step(reqs)
        if self._overhead_sink is not None:  # profiling `StepOverhead`
            sync(self.device)
            self._overhead_sink.append(time.perf_counter() - started - forward)

    def _decode_step(self, reqs: list[Request]) -> float:
        """One decode step; returns the seconds its target forward took (CPU wall time)."""
        spec_idx = [i for i, r in enumerate(reqs) if r.policy != Policy.AR]  # keep draft context
        gamma = self.gamma
        uniforms = torch.stack([self._uniforms(r, 2 * gamma + 1) for r in reqs])  # [R, 2G+1]
        cost = self.step_cost or self.sps
        draft_idx = self.gate.rows(reqs, spec_idx, cost, self.config.max_batch_tokens)
        proposal = self._propose([reqs[i] for i in draft_idx], uniforms[draft_idx, :gamma]) \
            if draft_idx else None
        lengths = choose_lengths(reqs, draft_idx, proposal, gamma=gamma, sps=cost,
                                 threshold=self.config.threshold, sts=self.sts,
                                 max_batch_tokens=self.config.max_batch_tokens,
                                 draft_seconds=self.gate.draft_seconds(len(draft_idx),
                                                                       len(reqs)))
        self.gate.observe(reqs, draft_idx, proposal)
        draft_ids = pad_rows(proposal.ids if proposal else None, draft_idx, len(reqs), gamma,
                             self.device)
        inputs = [[r.last_token] + draft_ids[i, :lengths[i]].tolist() for i, r in enumerate(reqs)]
        num_new = [len(x) for x in inputs]
        starts = [r.num_tokens - 1 for r in reqs]  # the anchor is committed, not yet cached
        ids = torch.tensor([t for x in inputs for t in x], device=self.device)
        batch = ForwardBatch([r.req_id for r in reqs], starts, num_new, ids,
                             torch.arange(ids.numel(), device=self.device))
        if self._overhead_sink is not None:
            sync(self.device)
        forward_started = time.perf_counter()
        logits, feats = self.runner.forward(batch, want_features=bool(spec_idx))
        if self._overhead_sink is not None:
            sync(self.device)
        forward = time.perf_counter() - forward_started
        self.counters.verify_forwards += 1
        self.counters.verify_tokens += ids.numel()
        if not draft_idx:  # plain decoding: sample the next token directly
            nxt = self._next_tokens(reqs, logits, num_new, uniforms[:, 2 * gamma])
            self._commit(reqs, spec_idx, draft_ids, lengths, [0] * len(reqs), nxt.tolist(),
                         feats, starts, num_new)
            return forward
        num_verify = torch.tensor(lengths, device=self.device)
        if all(r.params.temperature == 0 for r in reqs):  # ids decide (`verify_greedy`)
            n_acc, nxt = verify_greedy(self._padded(logits.argmax(dim=-1), num_new, gamma, -1),
                                       draft_ids, num_verify)
        else:
            target_probs = self._padded(
                warp_probs(logits, *self._sampling_tensors(reqs, num_new)), num_new, gamma, 0)
            q = proposal.probs  # None when the drafting requests are all greedy: one-hot
            if q is None:
                q = torch.nn.functional.one_hot(proposal.ids, self.vocab_size).float()
            draft_probs = pad_rows(q, draft_idx, len(reqs), gamma, self.device, self.vocab_size)
            n_acc, nxt = verify(target_probs, draft_probs, draft_ids.clamp(min=0), num_verify,
                                uniforms[:, gamma:2 * gamma], uniforms[:, 2 * gamma])
        self._commit(reqs, spec_idx, draft_ids, lengths, n_acc.tolist(), nxt.tolist(), feats,
                     starts, num_new)
        if self.calibration is not None and proposal.conf is not None:
            self.calibration.update(proposal.conf, [reqs[i].params.temperature == 0
                                                    for i in draft_idx],
                                    [lengths[i] for i in draft_idx],
                                    [int(n_acc[i]) for i in draft_idx])
        if self.config.record_confidence and proposal.conf_logits is not None:
            self._record_confidence(proposal.conf_logits, [lengths[i] for i in draft_idx],
                                    [int(n_acc[i]) for i in draft_idx])
        return forward

    def _propose(self, reqs: list[Request], uniforms: torch.Tensor) -> DraftProposal:
        """One draft backbone forward for all drafting requests, then the Markov stage."""
        anchors = torch.tensor([r.last_token for r in reqs], device=self.device)
        ctx_lens = [r.num_tokens - 1 for r in reqs]  # the anchor's position: context before it
        anchor_pos = torch.tensor(ctx_lens, device=self.device)
        meta = attention_meta(self.draft_kv.block_tables([r.req_id for r in reqs]),
                              [self.gamma] * len(reqs),  # every block row sees all the context
                              [n for n in ctx_lens for _ in range(self.gamma)],
                              self.draft_kv.allocator.block_size, self.runner.backend)
        scale = self.draft.config.head_dim ** -0.5

        def context_attention(layer: int, q: torch.Tensor):
            return paged_attention(q, self.draft_kv.k[layer], self.draft_kv.v[layer], meta, scale)

        h = self.draft.backbone_paged(anchors, anchor_pos, context_attention)
        self.counters.draft_forwards += 1
        temps, top_k, top_p = self._sampling_tensors(reqs, [1] * len(reqs))
        greedy = all(r.params.temperature == 0 for r in reqs)

        def sample_fn(k: int, logits: torch.Tensor):
            if greedy:  # what `sample` draws from warp_probs' one-hot rows; no q needed
                # in float32: exact for bfloat16 logits, and torch's CPU argmax is 5x
                # faster there (16 x 2048: 26 against 121 us)
                return logits.float().argmax(dim=-1), None
            probs = warp_probs(logits, temps, top_k, top_p)
            return sample(probs, uniforms[:, k - 1]), probs

        ids, probs, conf_logits = self.draft.draft_block(h, anchors, sample_fn, self.draft_vocab)
        for r in reqs:
            r.stats.draft_tokens_proposed += self.gamma
        conf = None
        if conf_logits is not None and self.calibration is not None:
            conf = self.calibration.apply(confidence(conf_logits, self.sts),
                                          [r.params.temperature == 0 for r in reqs])
        return DraftProposal(ids, probs, conf_logits, conf)

    def _commit(self, reqs, spec_idx, draft_ids, lengths, n_acc, nxt, feats, starts, num_new):
        spec = set(spec_idx)
        row_starts = [sum(num_new[:i]) for i in range(len(reqs))]
        for i, req in enumerate(reqs):
            # roll back the target cache to the anchor plus the accepted draft tokens
            self.kv.allocator.truncate(req.req_id, starts[i] + n_acc[i] + 1)
        if spec_idx:  # the target's features at committed positions become draft context
            self._extend_draft_context([reqs[i] for i in spec_idx], feats,
                                       [row_starts[i] for i in spec_idx],
                                       [n_acc[i] + 1 for i in spec_idx],
                                       [starts[i] for i in spec_idx])
        for i, req in enumerate(reqs):
            if i in spec:
                req.stats.record(lengths[i], n_acc[i], self.gamma)
                self.counters.draft_tokens_verified += lengths[i]
                self.counters.draft_tokens_accepted += n_acc[i]
            before = len(req.output_ids)
            req.commit(draft_ids[i, :n_acc[i]].tolist() + [nxt[i]])
            self.counters.generated_tokens += len(req.output_ids) - before

    def _extend_draft_context(self, reqs, feats, rows, counts, positions) -> None:
        """Write draft-context keys/values for `counts[i]` tokens from packed feature rows."""
        dev = self.device
        seq_of, offset = packed_index(torch.tensor(counts, device=dev))
        src = torch.tensor(rows, device=dev)[seq_of] + offset
        pos = torch.tensor(positions, device=dev)[seq_of] + offset
        seq_ids = [r.req_id for r in reqs]
        for sid, p, c in zip(seq_ids, positions, counts):
            self.draft_kv.allocator.grow(sid, p + c)
        slots = self.draft_kv.packed_slots(seq_ids, seq_of, pos)
        ctx = self.draft.project_context(feats[src])
        for layer in range(self.draft.config.num_hidden_layers):
            k, v = self.draft.context_kv(layer, ctx, pos)
            self.draft_kv.write(layer, slots, k, v)

    def _record_confidence(self, conf_logits, lengths, n_acc) -> None:
        for row, verified, accepted in zip(conf_logits.float().cpu(), lengths, n_acc):
            labels = torch.full((self.gamma,), -1, dtype=torch.int8)
            labels[:accepted] = 1
            if accepted < verified:
                labels[accepted] = 0
            self.confidence_records.append((row, labels))

    # -- helpers -----------------------------------------------------------------------------
    @torch.inference_mode()
    def _time_draft(self, rows: int, repeats: int = 5) -> float:
        """Best seconds of one greedy draft pass for `rows` requests on a profiling context."""
        alloc = self.draft_kv.allocator
        free = alloc.num_blocks - alloc.num_reserved_blocks
        ctx_len = max(1, min(self.config.sps_context_len,
                             free // rows * alloc.block_size - self.gamma))
        stand_ins = [_DraftProfileRow(f"__draft_profile_{i}", ctx_len) for i in range(rows)]
        try:
            for row in stand_ins:
                alloc.reserve(row.req_id, ctx_len + self.gamma)
                alloc.grow(row.req_id, ctx_len)
            uniforms = torch.zeros(rows, self.gamma, device=self.device)
            forwards = self.counters.draft_forwards
            seconds = best_seconds(lambda: self._propose(stand_ins, uniforms), self.device,
                                     repeats)
            self.counters.draft_forwards = forwards  # profiling is not work done
        finally:
            for row in stand_ins:
                alloc.free(row.req_id)
        return seconds

    @torch.inference_mode()
    def _time_overhead(self, rows: int, drafting: bool, steps: int = 6) -> float:
        """Shortest seconds that a decode step of `rows` greedy stand-in requests spends besides
        its target forward, all drafting (`fixed`) or none (`ar`); the engine must be idle."""
        if self.requests:
            raise RuntimeError("the engine must be idle to profile its step overhead")
        ctx = max(1, min(self.config.sps_context_len, 64))
        budget = ctx + steps * (self.gamma + 1) + 1
        alloc = self.kv.allocator
        rows = max(1, min(rows, alloc.num_blocks // alloc.blocks_for(budget)))
        params = SamplingParams(temperature=0, max_tokens=budget - ctx, ignore_eos=True)
        prompt = [t % self.vocab_size for t in range(2, 2 + ctx)]
        counters, calibration = self.counters, self.calibration
        self.counters = Counters()
        self.calibration = None  # stand-ins teach the real requests nothing
        ids = [self.add_request(prompt, params, req_id=f"__overhead_{i}",
                                policy="fixed" if drafting else "ar") for i in range(rows)]
        sink: list[float] = []
        try:
            while self.waiting:  # admit and prefill all of them
                self.step()
            self._overhead_sink = sink
            for _ in range(steps):
                self.step()
        finally:
            self._overhead_sink = None
            for rid in ids:
                self.abort(rid)
            self.counters, self.calibration = counters, calibration
        return min(sink) if sink else 0.0

    def _uniforms(self, req: Request, n: int) -> torch.Tensor:
        if req.params.temperature == 0:  # greedy: one-hot distributions ignore the draw
            return torch.zeros(n, device=self.device)
        return torch.rand(n, generator=req.generator, device=self.device)

    def _next_tokens(self, reqs, logits, repeats, uniforms) -> torch.Tensor:
        """One token per logits row, drawn from the request's warped distribution."""
        if all(r.params.temperature == 0 for r in reqs):
            return logits.argmax(dim=-1)  # what warp_probs' one-hot rows would give
        return sample(warp_probs(logits, *self._sampling_tensors(reqs, repeats)), uniforms)

    def _sampling_tensors(self, reqs: list[Request], repeats: list[int]):
        rep = torch.tensor(repeats, device=self.device)
        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=self.device).repeat_interleave(rep)
        return (col([r.params.temperature for r in reqs], torch.float32),
                col([r.params.top_k for r in reqs], torch.long),
                col([r.params.top_p for r in reqs], torch.float32))

    def _padded(self, packed: torch.Tensor, num_new, gamma: int, fill) -> torch.Tensor:
        """Packed per-token rows `[N, ...]` -> `[R, gamma + 1, ...]`, padded with `fill`."""
        out = packed.new_full((len(num_new), gamma + 1, *packed.shape[1:]), fill)
        seq_of, offset = packed_index(torch.tensor(num_new, device=self.device))
        out[seq_of, offset] = packed
        return out

    def _release(self, req: Request) -> None:
        was_waiting = req.req_id in self.kv.allocator
        self.kv.allocator.free(req.req_id)
        if self.draft_kv is not None:
            self.draft_kv.allocator.free(req.req_id)
        self.requests.pop(req.req_id, None)
        self.gate.forget(req.req_id)
        if was_waiting:
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
            raise ValueError(f"{field}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def _check_policy(self, policy: Policy, field: str) -> None:
        if policy is Policy.AR:
            return
        if self.draft is None:
            raise ValueError(f"{field}: {policy.value!r} needs a draft model; this engine has none "
                             "(use 'ar')")
        needs_conf = policy in (Policy.PREFIX, Policy.THRESHOLD)
        if needs_conf and not self.draft.config.enable_confidence_head:
            raise ValueError(f"{field}: {policy.value!r} needs a draft with a confidence head; "
                             "this draft has none (use 'fixed' or 'ar')")
        if policy is Policy.PREFIX and self.sps is None:
            raise ValueError(f"{field}: 'prefix' needs the SPS profile (profile_sps=True)")

    def _make_kv(self, budget: int, name: str, cfg) -> PagedKV:
        bs = self.config.kv_block_size
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        alloc = BlockAllocator(-(-budget // bs), bs, name)
        return PagedKV(alloc, cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim,
                       device=self.device, dtype=self.dtype)

    @staticmethod
    def _draft_vocab(draft, ranking: list[int] | None, size: int) -> DraftVocab | None:
        if not size or draft is None:
            return None
        if ranking is None:
            raise ValueError("draft_vocab_size: a reduced draft vocabulary needs the draft's "
                             f"token ranking ({RANKING_NAME} beside its weights); this draft "
                             "has none (use 0, the full vocabulary)")
        return DraftVocab.build(draft, ranking, size)

    @staticmethod
    def _eos_ids(target, tokenizer, config: EngineConfig) -> frozenset[int]:
        ids = set(config.extra_eos_token_ids)
        gen_eos = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, target.config.eos_token_id, tokenizer.eos_token_id):
            if value is not None:
                ids.update(value if isinstance(value, (list, tuple)) else [value])
        return frozenset(ids)


def share_frozen_copies(draft: DSparkDraft, target) -> list[str]:
    """Point the drafter's embedding and ``lm_head`` at the target's when they hold the same
    values (DSPARK.md 2: the released drafters ship frozen copies of them). A copy costs memory
    (about 0.8 GB for Qwen3-4B in bf16) and, on a CPU, cache room on every step. Returns the
    names of the shared tensors; a drafter trained with its own ones keeps them."""
    pairs = (("embed_tokens", target.get_input_embeddings()),
             ("lm_head", target.get_output_embeddings()))
    shared = []
    for name, target_module in pairs:
        mine = getattr(draft, name).weight
        theirs = getattr(target_module, "weight", None)
        if (theirs is not None and mine.shape == theirs.shape and mine.dtype == theirs.dtype
                and mine.device == theirs.device and torch.equal(mine, theirs)):
            getattr(draft, name).weight = theirs
            shared.append(name)
    return shared


class _DraftProfileRow:
    """What `_propose` reads of a request, for timing a draft pass with no real request."""

    def __init__(self, req_id: str, ctx_len: int):
        self.req_id, self.last_token, self.num_tokens = req_id, 0, ctx_len + 1
        self.params, self.stats = SamplingParams(temperature=0), SpecStats()
