"""Serving a benchmark's requests, and the figures of a run: the engine in a closed loop (at
most c requests in flight, a new one admitted as one finishes, as a server with a queue), and
transformers `generate` one request after another (the baseline).

Knows: `LLMEngine`'s request API and counters, timing. Does not know: which arms a benchmark
runs, its prompts, or how it reports (bench/engine.py and bench/peers.py decide).
Not a test: it asserts only that every request made its tokens.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import deque

import torch

from worker.engine.config import SamplingParams
from worker.engine.engine import LLMEngine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def hf_serial(model, prompts: list[list[int]], max_tokens: int, pad_id) -> dict:
    """transformers `generate`, one request after another; every request makes `max_tokens`."""
    device = model.device
    latencies, outputs = [], []
    sync(device)
    start = time.perf_counter()
    for ids in prompts:
        x = torch.tensor([ids], device=device)
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=pad_id)
        sync(device)
        latencies.append(time.perf_counter() - t0)
        outputs.append(out[0, x.shape[1]:].tolist())
    wall = time.perf_counter() - start
    assert all(len(o) == max_tokens for o in outputs), "generate stopped early"
    return {"aggregate_tps": len(prompts) * max_tokens / wall, "wall_s": wall,
            "per_request_tps": [max_tokens / t for t in latencies], "outputs": outputs}


def serve(engine: LLMEngine, prompts: list[list[int]], *, concurrency: int, policy: str,
          max_tokens: int) -> dict:
    """Serve `prompts` keeping at most `concurrency` in flight (a closed loop)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    before = dataclasses.asdict(engine.counters)
    queue = deque(enumerate(prompts))
    started, latency, tokens, stats, index = {}, {}, {}, {}, {}
    sync(engine.device)
    start = time.perf_counter()
    while queue or engine.has_unfinished():
        while queue and len(started) - len(latency) < concurrency:
            i, ids = queue.popleft()
            rid = engine.add_request(ids, params, policy=policy)
            started[rid], tokens[rid], index[rid] = time.perf_counter(), [], i
        outs = engine.step()
        sync(engine.device)
        now = time.perf_counter()
        for out in outs:
            tokens[out.req_id] += out.token_ids
            if out.finished:
                latency[out.req_id], stats[out.req_id] = now - started[out.req_id], out.stats
    wall = time.perf_counter() - start
    delta = {k: v - before[k] for k, v in dataclasses.asdict(engine.counters).items()}
    return serve_figures(wall, tokens, latency, stats, delta, index, max_tokens)


def serve_figures(wall, tokens, latency, stats, delta, index, max_tokens) -> dict:
    generated = sum(len(t) for t in tokens.values())
    assert generated == len(tokens) * max_tokens, "a request did not make max_tokens tokens"
    accept = [n for s in stats.values() for n in s.accept_lengths]
    anchors = delta["verify_tokens"] - delta["draft_tokens_verified"]  # one per request-step
    verified = delta["draft_tokens_verified"]
    return {
        "aggregate_tps": generated / wall,
        "per_request_tps": statistics.mean(len(tokens[r]) / latency[r] for r in tokens),
        # tau counts the bonus token; plain decoding commits exactly one token per step
        "mean_accept_length": statistics.mean(accept) if accept else 1.0,
        "acceptance_rate": delta["draft_tokens_accepted"] / verified if verified else None,
        "verify_tokens_per_step": delta["verify_tokens"] / max(1, delta["verify_forwards"]),
        "verify_tokens_per_request_step": delta["verify_tokens"] / max(1, anchors),
        "steps": delta["steps"],
        # decode steps in which no draft pass ran (plain decoding, or the draft gate's choice)
        "steps_without_draft": delta["verify_forwards"] - delta["draft_forwards"],
        "wall_s": wall,
        "outputs": [tokens[r] for r in sorted(tokens, key=index.get)],
    }


def median_figures(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:  # a figure can be None in some runs (no draft token verified)
        values = [r[key] for r in runs if isinstance(r[key], (int, float))]
        if values:
            out[key] = statistics.median(values)
    out["aggregate_tps_runs"] = [round(r["aggregate_tps"], 2) for r in runs]
    return out
