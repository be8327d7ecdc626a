"""The vLLM side of `bench/peers.py`: run in vLLM's own virtualenv, never imported by sparkgrid.

Started once for a whole benchmark run, so that its arms interleave with the engine's (a slow
minute of the machine then hits both sides alike, and their ratios can be taken repeat by
repeat). argv[1]: a JSON spec (target directory, dtype, the requests of each concurrency as
token ids, max tokens, the single-request prompts); argv[2]: the number of a file descriptor
the results go to, one JSON line each: first {"version"}, then one line per command. Commands
come on stdin, one JSON line each: {"c": c} runs the arm of concurrency c once. Each c gets its
own `LLM(max_num_seqs=c)`, made and warmed up at its first command and kept (about 2.6 GB
resident each with the 2 GiB cache), which keeps at most c requests in flight over the whole
list: a closed loop, as the engine's arms. Every request decodes greedily exactly `max_tokens`
tokens (`ignore_eos`). vLLM's own logging goes to stdout and stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    spec = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.get("kv_cache_gib", 2)))
    import vllm  # after the environment is set

    results = os.fdopen(int(sys.argv[2]), "w", buffering=1)
    results.write(json.dumps({"version": vllm.__version__}) + "\n")
    llms: dict = {}
    for line in sys.stdin:
        c = int(json.loads(line)["c"])
        if c not in llms:
            llms[c] = vllm.LLM(model=spec["target"], dtype=spec["dtype"], max_num_seqs=c,
                               enforce_eager=True, seed=0)
            _warm_up(llms[c], spec, c)
        results.write(json.dumps(_run(llms[c], spec, c)) + "\n")
    return 0


def _params(spec: dict, c: int):
    from vllm import SamplingParams

    tokens = spec["single_max_tokens"] if c == 1 else spec["max_tokens"]
    return SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)


def _prompts(spec: dict, c: int) -> list[dict]:
    ids = spec["single_prompts"] if c == 1 else spec["prompts_by_c"][str(c)]
    return [{"prompt_token_ids": p} for p in ids]


def _warm_up(llm, spec: dict, c: int) -> None:
    llm.generate(_prompts(spec, c)[:c], _params(spec, c), use_tqdm=False)


def _run(llm, spec: dict, c: int) -> dict:
    params, prompts = _params(spec, c), _prompts(spec, c)
    if c == 1:  # one request at a time: per-request speed
        latencies, tokens = [], 0
        start = time.perf_counter()
        for prompt in prompts:
            t0 = time.perf_counter()
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            latencies.append(time.perf_counter() - t0)
            tokens += len(out.outputs[0].token_ids)
        wall = time.perf_counter() - start
        per_request = [params.max_tokens / t for t in latencies]
        outputs = None
    else:
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
