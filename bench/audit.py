"""Audit benchmark: how often an audit flags an honest worker, how often it catches a cheat, and
what audits cost, on the shipped pair.

Honest workers: the DSpark engine generates completions of code prompts in every configuration
an honest worker may run (bfloat16 and float32; at most 1, 8 or 32 requests decoded at once;
the `ar`, `fixed` and `prefix` policies), greedy and sampled (temperature 0.8, top-p 0.95).
The auditor, a float32 copy of the target, scores each job's delivered tokens in one
teacher-forced forward (`worker/engine/audit_score.py`) and `scheduler/audit.py` judges it.
Reported: audited tokens and jobs, flags (must be 0), the largest greedy gap seen (the tolerance
`GAP_LIMIT` must sit above it, with margin) and the lowest sampled z.

Cheats, each judged the same way:
- `perturbed`: the target with Gaussian noise of 30% of each weight tensor's spread;
- `shallow`: a cheaper model, the target with its upper half of layers removed;
- `replay`: another prompt's honest output delivered for this prompt;
- `shuffled`: the honest tokens of the job in another order (same counts, wrong text);
- `drafter`: the drafter alone, DFlash's (the shipped baseline drafter): the engine under the
  `fixed` policy with verification skipped (`DrafterAlone`), so every drafted token is
  delivered; the token after each block is still the target's, whose forward over the block the
  drafter needs anyway (its context is the target's features), so 1 token in gamma + 1 is
  honest. The engine itself is unchanged: the cheat replaces its verify step only inside the
  subclass's own decode.
For each: the share of jobs flagged (detection rate), and jobs until the first flag when every
job of a new worker is audited (jobs-to-quarantine; quarantine follows the first failed audit).
Budget cheats (more tokens than `max_tokens`, ids outside the vocabulary, inflated counts) never
reach an audit: the scheduler refuses them as they stream (`tests/integration/test_impostor.py`).

Cost: seconds of one audit forward against seconds the worker spent generating the job, as a
share of platform time at the audit rates `--rates` (the steady rate, e.g. 2%), and for a new
worker's first 20 jobs audited in full.

Prints one JSON object and writes it to `--out`. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from routing import load_prompts  # bench/routing.py, beside this

import worker.engine.engine as engine_module
from scheduler.audit import GAP_LIMIT, MIN_TOKENS, POOLED_Z_LIMIT, Z_LIMIT, Pool, judge
from worker.engine.audit_score import score_tokens
from worker.engine.config import EngineConfig, SamplingParams
from worker.engine.engine import LLMEngine
from worker.engine.loader import load_models
from worker.engine.verifier import next_tokens

PAIR = Path(__file__).resolve().parent.parent / "worker" / "models" / "stdlib-pair"
SAMPLED = dict(temperature=0.8, top_p=0.95)
SPS_CACHE = str(Path(tempfile.gettempdir()) / "sparkgrid-audit-sps")
"""Where the `prefix` policy's throughput profile is kept between configurations."""


def accept_drafts(plan, logits, draft_ids, proposal, *, gamma, vocab_size, device):
    """The `drafter` cheat's stand-in for `verifier.verify_step`: every verified draft token is
    accepted unchecked, and the token after them is drawn from the target's logits at the
    block's last row (the bonus an honest worker would draw when all were accepted)."""
    last = [row + n for row, n in zip(plan.verify_rows, plan.lengths)]
    nxt = next_tokens(plan.decode, logits[torch.tensor(last, device=device)], [1] * len(last),
                      plan.uniforms[:, 2 * gamma], device)
    return list(plan.lengths), nxt.tolist()


class DrafterAlone(LLMEngine):
    """The engine that delivers its drafter's blocks without verifying them (the `drafter`
    cheat). Only this subclass's decode sees the replaced verify step."""

    def _decode(self, plan):
        honest = engine_module.verify_step
        engine_module.verify_step = accept_drafts
        try:
            return super()._decode(plan)
        finally:
            engine_module.verify_step = honest


def generate(models, dtype: str, policy: str, batch: int, prompts: list[str], max_tokens: int,
             temperature: float, seed: int,
             engine_class: type[LLMEngine] = LLMEngine) -> tuple[list[dict], float]:
    """Each prompt's completion from an engine of that configuration, and the seconds taken."""
    config = EngineConfig(dtype=dtype, policy=policy, max_num_seqs=batch,
                          profile_sps=policy == "prefix", sps_cache_dir=SPS_CACHE)
    engine = engine_class.from_models(config, models)
    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True,
                             seed=seed + i, **({"top_p": SAMPLED["top_p"]} if temperature else {}))
              for i in range(len(prompts))]
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    return out, time.perf_counter() - start


def audit(auditor, tokenizer, prompts, outputs, temperature) -> tuple[list, float]:
    """(verdict, scores) per job, and the seconds the audit forwards took."""
    results, spent = [], 0.0
    for prompt, out in zip(prompts, outputs):
        ids = tokenizer(prompt)["input_ids"]
        start = time.perf_counter()
        scores = score_tokens(auditor, ids, out["token_ids"], temperature)
        spent += time.perf_counter() - start
        results.append((judge(scores.to_dict(), temperature), scores))
    return results, spent


def summary(results) -> dict:
    """Per-job verdicts, and the worker-level test: the jobs' sampled evidence pooled in the
    order audited (`scheduler.audit.Pool`), and after how many jobs it first fails."""
    pooled, pooled_at = Pool(), None
    for i, (_, scores) in enumerate(results):
        if scores.logprob and pooled.add(scores.to_dict()) is False and pooled_at is None:
            pooled_at = i + 1
    judged = [v for v, _ in results if v.passed is not None]
    flagged = [v for v in judged if v.passed is False]
    first = next((i + 1 for i, (v, _) in enumerate(results) if v.passed is False), None)
    return {"jobs": len(results), "judged": len(judged), "flagged": len(flagged),
            "detection_rate": round(len(flagged) / len(judged), 4) if judged else None,
            "jobs_to_quarantine": first if pooled_at is None else min(first or pooled_at,
                                                                       pooled_at),
            "pooled_z": round(pooled.z, 3) if pooled.var else None,
            "pooled_flag_after_jobs": pooled_at,
            "tokens": sum(len(s.gap) for _, s in results),
            "statistic_min": min((v.statistic for v in judged), default=None),
            "statistic_max": max((v.statistic for v in judged), default=None)}


def cheat_models(target) -> dict:
    gen = torch.Generator().manual_seed(7)
    perturbed = copy.deepcopy(target)
    with torch.no_grad():
        for p in perturbed.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=gen) * 0.30 * p.float().std().item())
    shallow = copy.deepcopy(target)
    layers = shallow.model.layers
    shallow.model.layers = torch.nn.ModuleList(list(layers)[: max(1, len(layers) // 2)])
    shallow.config.num_hidden_layers = len(shallow.model.layers)
    if getattr(shallow.config, "layer_types", None):
        shallow.config.layer_types = shallow.config.layer_types[: len(shallow.model.layers)]
    return {"perturbed": perturbed, "shallow": shallow}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32, help="prompts per configuration")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--policies", default="ar,fixed,prefix")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--rates", default="0.02,0.05")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "audit.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    pool = load_prompts()
    prompts = random.Random(args.seed).sample(pool, min(args.prompts, len(pool)))
    auditor_models = load_models(PAIR / "target", None, EngineConfig(dtype="float32"))
    auditor, tokenizer = auditor_models.target, auditor_models.tokenizer
    honest: dict[str, dict] = {}
    gen_s = tokens = 0.0
    audit_s = 0.0
    for dtype in args.dtypes.split(","):
        models = load_models(PAIR / "target", PAIR / "dspark", EngineConfig(dtype=dtype))
        for policy in args.policies.split(","):
            for batch in map(int, args.batches.split(",")):
                for temperature in (0.0, SAMPLED["temperature"]):
                    name = f"{dtype}/{policy}/B{batch}/T{temperature:g}"
                    outs, spent = generate(models, dtype, policy, batch, prompts, args.max_tokens,
                                           temperature, args.seed)
                    results, a_spent = audit(auditor, tokenizer, prompts, outs, temperature)
                    gen_s, audit_s = gen_s + spent, audit_s + a_spent
                    tokens += sum(len(o["token_ids"]) for o in outs)
                    honest[name] = summary(results)
                    print(name, json.dumps(honest[name]), file=sys.stderr, flush=True)
    greedy = [h for n, h in honest.items() if n.endswith("/T0")]
    sampled = [h for n, h in honest.items() if not n.endswith("/T0")]
    cheats: dict[str, dict] = {}
    base = load_models(PAIR / "target", None, EngineConfig(dtype="float32"))
    for name, model in cheat_models(base.target).items():
        models = type(base)(model, base.tokenizer)
        for temperature in (0.0, SAMPLED["temperature"]):
            outs, _ = generate(models, "float32", "ar", 8, prompts, args.max_tokens, temperature,
                               args.seed + 1)
            cheats[f"{name}/T{temperature:g}"] = summary(
                audit(auditor, tokenizer, prompts, outs, temperature)[0])
    for temperature in (0.0, SAMPLED["temperature"]):
        outs, _ = generate(base, "float32", "ar", 8, prompts, args.max_tokens, temperature,
                           args.seed + 2)
        rng = random.Random(args.seed)
        replay = outs[1:] + outs[:1]  # each prompt gets the next prompt's output
        shuffled = [{**o, "token_ids": rng.sample(o["token_ids"], len(o["token_ids"]))}
                    for o in outs]
        for name, fake in (("replay", replay), ("shuffled", shuffled)):
            cheats[f"{name}/T{temperature:g}"] = summary(
                audit(auditor, tokenizer, prompts, fake, temperature)[0])
    drafter = base.with_draft(PAIR / "dflash", EngineConfig(dtype="float32"))
    for temperature in (0.0, SAMPLED["temperature"]):
        outs, _ = generate(drafter, "float32", "fixed", 8, prompts, args.max_tokens, temperature,
                           args.seed + 3, engine_class=DrafterAlone)
        cheats[f"drafter/T{temperature:g}"] = summary(
            audit(auditor, tokenizer, prompts, outs, temperature)[0])
    for name, figures in cheats.items():
        print(name, json.dumps(figures), file=sys.stderr, flush=True)
    per_job = audit_s / max(gen_s, 1e-9)
    result = {
        "bench": "audit", "pair": "stdlib-pair", "torch_threads": torch.get_num_threads(),
        "thresholds": {"gap_limit": GAP_LIMIT, "z_limit": Z_LIMIT, "min_tokens": MIN_TOKENS,
                       "pooled_z_limit": POOLED_Z_LIMIT},
        "honest": {
            "configurations": honest,
            "audited_tokens": sum(h["tokens"] for h in honest.values()),
            "audited_jobs": sum(h["judged"] for h in honest.values()),
            "false_flags": sum(h["flagged"] for h in honest.values()),
            "largest_greedy_gap": max(h["statistic_max"] or 0.0 for h in greedy),
            "lowest_sampled_z": min(h["statistic_min"] for h in sampled
                                    if h["statistic_min"] is not None),
            "median_sampled_z_min": statistics.median(
                h["statistic_min"] for h in sampled if h["statistic_min"] is not None)},
        "cheats": cheats,
        "cost": {"audit_s_per_generation_s": round(per_job, 4),
                 "generated_tokens": int(tokens),
                 "share_of_platform_time": {r: round(float(r) * per_job, 5)
                                            for r in args.rates.split(",")},
                 "first_20_jobs_in_full": round(per_job, 4)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "honest"} |
                     {"honest": {k: v for k, v in result["honest"].items()
                                 if k != "configurations"}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
