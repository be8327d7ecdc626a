"""TOPLOC benchmark: do activation commitments (the `toploc` package) catch cheats that the
log-probability audit (`bench/audit.py`) misses, and what do they cost?

TOPLOC (Ong et al. 2025, "TOPLOC: A Locality Sensitive Hashing Scheme for Trustless Verifiable
Inference") has the worker commit, per chunk of `CHUNK` generated tokens, to the top-`TOPK`
entries of the last hidden states (the input of `lm_head`), encoded as a polynomial. A verifier
recomputes those hidden states in one teacher-forced forward of prompt + delivered tokens and
compares exponents and mantissas; a chunk passes within the limits below (those of the
package's reference validation: 90 of 128 exponents equal, mantissa error mean <= 10 and
median <= 8, in bfloat16 units; proofs are bfloat16 by format, so both sides are cast).

Here the worker commits to the hidden state from which each delivered token was chosen: the
engine (`Recording`) keeps, per request, the `lm_head` input of every row whose token it
committed (the prompt's last row, then the anchor and accepted drafts of each verify forward),
so an honest proof carries whatever its dtype, batch and policy did to the arithmetic. The
auditor is the float32 target.

Measured:
- honest: every configuration of `bench/audit.py` (bfloat16 and float32; 1, 8 or 32 requests
  at once; `ar`, `fixed`, `prefix`; greedy and sampled): chunks and jobs falsely rejected;
- cheats, each with the proof its worker can make without extra work (`naive`): `perturbed`
  and `shallow` commit to their own model's hidden states; `replay` delivers another prompt's
  output with that output's proof; `drafter` (`audit.DrafterAlone`) commits to the target's
  hidden states of its verify forwards, which it runs anyway for the drafter's context. And
  each with a `forged` proof: one teacher-forced forward of the real target (bfloat16) over
  what it delivers, whose cost is reported against the cheat's generation time. Beside each,
  the log-probability audit's verdicts on the same jobs (`audit.summary`), and the jobs only
  TOPLOC caught. Verdicts under the package's reference limits and under limits calibrated
  from the honest runs (`calibrated_limits`);
- cost: proof build seconds per token on the worker, the auditor's forward and verify
  seconds per job, against the log-probability audit's (`score_tokens`) on the same jobs.

Prints one JSON object and writes it to `--out`. Not a test: it asserts nothing. Needs the
`toploc` package, which the project does not depend on.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
import time
from pathlib import Path

import toploc
import torch
from audit import PAIR, SAMPLED, SPS_CACHE, DrafterAlone, cheat_models, summary  # beside this
from routing import load_prompts

from scheduler.audit import judge
from worker.engine.audit_score import score_tokens
from worker.engine.config import EngineConfig, SamplingParams
from worker.engine.engine import LLMEngine
from worker.engine.loader import load_models

TOPK, CHUNK = 128, 32
STATS = ("exp_mismatches", "mant_err_mean", "mant_err_median")
"""What a chunk's verification measures; it fails when any exceeds its limit."""
REFERENCE_LIMITS = {"exp_mismatches": 38, "mant_err_mean": 10.0, "mant_err_median": 8.0}
"""The package's reference limits: 90 of 128 exponents equal, mantissa error mean <= 10 and
median <= 8."""


def calibrated_limits(honest: list[dict]) -> dict:
    """Limits set from the honest runs, as `scheduler.audit.GAP_LIMIT` is: twice the largest
    value seen, plus one unit (so a maximum of 0 leaves room)."""
    return {s: 2 * max(v for h in honest for v in h[s]) + 1 for s in STATS}


class Recording(LLMEngine):
    """The engine, keeping per request the last hidden state (the `lm_head` input) of every
    position from which it committed a delivered token."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hidden: dict[str, list[torch.Tensor]] = {}
        self._forwards: list[torch.Tensor] = []
        self.runner.model.lm_head.register_forward_hook(
            lambda module, args, out: self._forwards.append(args[0]))

    def step(self):
        self._forwards = []
        return super().step()

    def _commit(self, plan, result):
        forwards = iter(self._forwards)  # the decode forward, then the prefill's
        if plan.decode:
            rows = next(forwards)
            for i, req in enumerate(plan.decode):  # the anchor and the accepted drafts
                start = plan.verify_rows[i]
                self.hidden[req.req_id].append(rows[start:start + result.accepted[i] + 1])
        if plan.prefill:
            rows = next(forwards)
            for j, req in enumerate(plan.prefill):  # the prompt's last row
                self.hidden[req.req_id] = [rows[j:j + 1]]
        return super()._commit(plan, result)


class RecordingDrafter(Recording, DrafterAlone):
    """The `drafter` cheat, keeping what its proofs are made of."""


def generate(models, dtype, policy, batch, prompts, max_tokens, temperature, seed,
             engine_class=Recording) -> tuple[list[dict], float]:
    """Per prompt: token ids and the hidden states [n, d] they were chosen from; seconds."""
    engine = engine_class.from_models(
        EngineConfig(dtype=dtype, policy=policy, max_num_seqs=batch,
                     profile_sps=policy == "prefix", sps_cache_dir=SPS_CACHE), models)
    start = time.perf_counter()
    ids = [engine.add_request(p, SamplingParams(
        temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=seed + i,
        **({"top_p": SAMPLED["top_p"]} if temperature else {}))) for i, p in enumerate(prompts)]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.req_id] += out.token_ids
    spent = time.perf_counter() - start
    return [{"token_ids": tokens[i], "hidden": torch.cat(engine.hidden[i])[:len(tokens[i])]}
            for i in ids], spent


def prove(outs) -> float:
    """Each output's proofs (in place), and the seconds spent building them."""
    start = time.perf_counter()
    for out in outs:
        rows = list(out["hidden"].to(torch.bfloat16))  # proofs hold bfloat16 values
        out["proofs"] = toploc.build_proofs_base64(rows, CHUNK, TOPK, skip_prefill=True)
    return time.perf_counter() - start


def hidden_states(target, prompt_ids, token_ids) -> torch.Tensor:
    """The target's last hidden states [n, d] from which each of `token_ids` is chosen, in one
    teacher-forced forward (the verifier's, and the forger's)."""
    kept = []
    hook = target.lm_head.register_forward_hook(lambda m, args, out: kept.append(args[0]))
    try:
        with torch.inference_mode():
            target(input_ids=torch.tensor([prompt_ids + token_ids[:-1]]))
    finally:
        hook.remove()
    return kept[0][0, len(prompt_ids) - 1:]


def verify(auditor, tokenizer, prompts, outs, temperature) -> dict:
    """TOPLOC's verdict on each job (and the log-probability audit's, on the same jobs)."""
    jobs, chunk_counts, logprob = [], [], []
    forward_s = verify_s = logprob_s = 0.0
    for prompt, out in zip(prompts, outs):
        ids = tokenizer(prompt)["input_ids"]
        start = time.perf_counter()
        mine = hidden_states(auditor, ids, out["token_ids"]).to(torch.bfloat16)
        forward_s += time.perf_counter() - start
        start = time.perf_counter()
        chunks = toploc.verify_proofs_base64(mine, out["proofs"], CHUNK, TOPK,
                                             skip_prefill=True)
        verify_s += time.perf_counter() - start
        start = time.perf_counter()
        scores = score_tokens(auditor, ids, out["token_ids"], temperature)
        logprob_s += time.perf_counter() - start
        logprob.append((judge(scores.to_dict(), temperature), scores))
        jobs.append({s: max(getattr(c, s) for c in chunks) for s in STATS})
        chunk_counts.append(len(chunks))
    return {"jobs": len(jobs), "tokens": sum(len(o["token_ids"]) for o in outs),
            "chunks": sum(chunk_counts),
            **{s: [j[s] for j in jobs] for s in STATS},  # each job's worst chunk
            "logprob_flags": [v.passed is False for v, _ in logprob],
            "logprob_audit": summary(logprob),
            "seconds": {"forward": forward_s, "verify": verify_s, "logprob_audit": logprob_s}}


def verdicts(run: dict, limits: dict) -> dict:
    """TOPLOC's rejections of a run's jobs under `limits`, and those the log-probability
    audit let pass."""
    caught = [any(run[s][i] > limits[s] for s in STATS) for i in range(run["jobs"])]
    return {"rejected_jobs": sum(caught), "detection_rate": round(sum(caught) / run["jobs"], 4),
            "jobs_to_quarantine": next((i + 1 for i, c in enumerate(caught) if c), None),
            "caught_only_by_toploc": sum(c and not lp
                                         for c, lp in zip(caught, run["logprob_flags"]))}


def judged(run: dict, limits: dict) -> dict:
    """A run as reported: its verdicts under each set of limits, the range of each statistic
    over its jobs, and the log-probability audit's summary."""
    return {"jobs": run["jobs"], "tokens": run["tokens"], "chunks": run["chunks"],
            **{name: verdicts(run, lim) for name, lim in limits.items()},
            **{s: [min(run[s]), max(run[s])] for s in STATS},
            "logprob_audit": run["logprob_audit"]}


def forge(target, tokenizer, prompts, outs) -> float:
    """A cheat's proofs made honestly for what it delivers: one forward of the real target
    (`target`: in bfloat16, as a cheat would run it) per job, in place; returns the seconds
    spent."""
    start = time.perf_counter()
    for prompt, out in zip(prompts, outs):
        out["hidden"] = hidden_states(target, tokenizer(prompt)["input_ids"], out["token_ids"])
    return time.perf_counter() - start + prove(outs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompts per configuration")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--policies", default="ar,fixed,prefix")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "toploc.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    pool = load_prompts()
    prompts = random.Random(args.seed).sample(pool, min(args.prompts, len(pool)))
    base = load_models(PAIR / "target", None, EngineConfig(dtype="float32"))
    auditor, tokenizer = base.target, base.tokenizer
    temperatures = (0.0, SAMPLED["temperature"])
    honest, gen_s, build_s, tokens = {}, 0.0, 0.0, 0
    for dtype in args.dtypes.split(","):
        models = load_models(PAIR / "target", PAIR / "dspark", EngineConfig(dtype=dtype))
        for policy in args.policies.split(","):
            for batch in map(int, args.batches.split(",")):
                for temperature in temperatures:
                    name = f"{dtype}/{policy}/B{batch}/T{temperature:g}"
                    outs, spent = generate(models, dtype, policy, batch, prompts,
                                           args.max_tokens, temperature, args.seed)
                    build_s += prove(outs)
                    gen_s += spent
                    tokens += sum(len(o["token_ids"]) for o in outs)
                    honest[name] = verify(auditor, tokenizer, prompts, outs, temperature)
                    print(name, json.dumps({k: honest[name][k] for k in STATS}),
                          file=sys.stderr, flush=True)
    proof_bytes = len(base64.b64decode(outs[0]["proofs"][0]))
    cheats: dict[str, dict] = {}
    forger = load_models(PAIR / "target", None, EngineConfig(dtype="bfloat16")).target

    def judge_cheat(name, outs, temperature, cheat_s):
        forged = [{"token_ids": o["token_ids"]} for o in outs]
        forge_s = forge(forger, tokenizer, prompts, forged)
        cheats[f"{name}/T{temperature:g}"] = {
            "naive": verify(auditor, tokenizer, prompts, outs, temperature),
            "forged": verify(auditor, tokenizer, prompts, forged, temperature),
            "forge_s_per_cheat_generation_s": round(forge_s / max(cheat_s, 1e-9), 4)}
        print(name, temperature, json.dumps({k: cheats[f"{name}/T{temperature:g}"]["naive"][k]
                                             for k in STATS}), file=sys.stderr, flush=True)

    for name, model in cheat_models(base.target).items():
        for temperature in temperatures:
            outs, spent = generate(type(base)(model, tokenizer), "float32", "ar", 8, prompts,
                                   args.max_tokens, temperature, args.seed + 1)
            prove(outs)
            judge_cheat(name, outs, temperature, spent)
    drafter = base.with_draft(PAIR / "dflash", EngineConfig(dtype="float32"))
    for temperature in temperatures:
        outs, spent = generate(base, "float32", "ar", 8, prompts, args.max_tokens, temperature,
                               args.seed + 2)
        prove(outs)
        judge_cheat("replay", outs[1:] + outs[:1], temperature, spent)
        outs, spent = generate(drafter, "float32", "fixed", 8, prompts, args.max_tokens,
                               temperature, args.seed + 3, engine_class=RecordingDrafter)
        prove(outs)
        judge_cheat("drafter", outs, temperature, spent)
    limits = {"reference": REFERENCE_LIMITS,
              "calibrated": calibrated_limits(list(honest.values()))}
    runs = [*honest.values(), *(c[k] for c in cheats.values() for k in ("naive", "forged"))]
    seconds = {k: sum(r["seconds"][k] for r in runs) for k in ("forward", "verify",
                                                               "logprob_audit")}
    jobs = sum(r["jobs"] for r in runs)
    shown = {name: judged(run, limits) for name, run in honest.items()}
    result = {
        "bench": "toploc", "pair": "stdlib-pair", "toploc": toploc.__version__,
        "torch_threads": torch.get_num_threads(), "topk": TOPK, "chunk_tokens": CHUNK,
        "limits": limits,
        "honest": {
            "configurations": shown, "jobs": sum(h["jobs"] for h in honest.values()),
            "tokens": tokens, "chunks": sum(h["chunks"] for h in honest.values()),
            **{f"false_rejected_jobs_{name}": sum(h[name]["rejected_jobs"]
                                                  for h in shown.values()) for name in limits},
            **{f"largest_{s}": max(h[s][1] for h in shown.values()) for s in STATS}},
        "cheats": {name: {"naive": judged(c["naive"], limits),
                          "forged": judged(c["forged"], limits),
                          "forge_s_per_cheat_generation_s": c["forge_s_per_cheat_generation_s"]}
                   for name, c in cheats.items()},
        "cost": {"build_s_per_token": round(build_s / tokens, 7),
                 "build_s_per_generation_s": round(build_s / gen_s, 5),
                 "auditor_forward_s_per_job": round(seconds["forward"] / jobs, 5),
                 "verify_s_per_job": round(seconds["verify"] / jobs, 5),
                 "logprob_audit_s_per_job": round(seconds["logprob_audit"] / jobs, 5),
                 "proof_bytes_per_chunk": proof_bytes},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "honest"}
                     | {"honest": {k: v for k, v in result["honest"].items()
                                   if k != "configurations"}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
