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
    tally = _Tally()
    _loop(engine, list(enumerate(prompts)), concurrency, policy, max_tokens, tally)
    return tally.figures(max_tokens)


def serve_alternating(engine: LLMEngine, prompts: list[list[int]], *, orders: list[tuple],
                      max_tokens: int) -> dict[str, dict]:
    """One request at a time, every policy of `orders[i]` serving prompt i in that order
    before prompt i + 1 is served: policy -> the figures of its requests, as `serve` at one
    request gives them for its run. A slow second of the machine then hits every policy
    alike, not the one whose turn it was (runs of 16 prompts a policy at a time take
    1.5-3 s each on a 2-core CPU, and drift by 10% from one to the next)."""
    if len(orders) != len(prompts):
        raise ValueError(f"orders: one per prompt ({len(prompts)}), got {len(orders)}")
    tallies: dict[str, _Tally] = {}
    for i, (ids, order) in enumerate(zip(prompts, orders)):
        for policy in order:
            _loop(engine, [(i, ids)], 1, policy, max_tokens, tallies.setdefault(policy, _Tally()))
    return {policy: tally.figures(max_tokens) for policy, tally in tallies.items()}


@dataclasses.dataclass
class _Tally:
    """What one policy's requests gave over one or more closed loops."""

    wall: float = 0.0
    tokens: dict = dataclasses.field(default_factory=dict)  # request id -> its tokens
    latency: dict = dataclasses.field(default_factory=dict)
    stats: dict = dataclasses.field(default_factory=dict)
    index: dict = dataclasses.field(default_factory=dict)  # request id -> its prompt's index
    delta: dict = dataclasses.field(default_factory=dict)  # the engine's counters, increased

    def figures(self, max_tokens: int) -> dict:
        return serve_figures(self.wall, self.tokens, self.latency, self.stats, self.delta,
                             self.index, max_tokens)


def _loop(engine: LLMEngine, prompts: list[tuple[int, list[int]]], concurrency: int,
          policy: str, max_tokens: int, tally: _Tally) -> None:
    """Serve the (index, prompt) pairs in a closed loop, adding what they gave to `tally`."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    before = dataclasses.asdict(engine.counters)
    queue = deque(prompts)
    started, in_flight = {}, set()
    sync(engine.device)
    start = time.perf_counter()
    while queue or engine.has_unfinished():
        while queue and len(in_flight) < concurrency:
            i, ids = queue.popleft()
            rid = engine.add_request(ids, params, policy=policy)
            started[rid], tally.tokens[rid], tally.index[rid] = time.perf_counter(), [], i
            in_flight.add(rid)
        outs = engine.step()
        sync(engine.device)
        now = time.perf_counter()
        for out in outs:
            tally.tokens[out.req_id] += out.token_ids
            if out.finished:
                tally.latency[out.req_id] = now - started[out.req_id]
                tally.stats[out.req_id] = out.stats
                in_flight.discard(out.req_id)
    tally.wall += time.perf_counter() - start
    for k, v in dataclasses.asdict(engine.counters).items():
        tally.delta[k] = tally.delta.get(k, 0) + v - before[k]


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
