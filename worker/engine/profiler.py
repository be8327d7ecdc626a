"""What the engine plans with, profiled once at start: `profile_engine` -> `EngineCosts`.

SPS(B), the target's forward steps per second for a forward of B new tokens; the cost by
sequences and tokens (`RowCostTable`); the seconds of a draft pass by rows; and what a decode
step spends besides its target forward (`StepOverhead`). DSpark Alg. 1 weighs expected
accepted tokens against these tables, and the draft gate decides with them. They are measured
with the engine's own runner, caches and step (verify-shaped batches: sequences of gamma + 1
new tokens on a fixed context; stand-in requests that the profiler adds and removes itself),
and cached on disk per device, model, dtype, attention code and grid, so a restart reads them
back (`profile_cache`: each checked against a fresh timing of its cheapest point, and measured
again where the cached one ran slowed).

Knows: timing (best of N), the cache files, the engine's public parts. Does not know: how a
step is planned or verified, sampling or policies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from sparkgrid.costs import SPSTable, json_object
from worker.engine.attention import implementation_id
from worker.engine.config import SamplingParams
from worker.engine.model_runner import ForwardBatch, TargetRunner
from worker.engine.online_costs import StepOverhead
from worker.engine.profile_cache import cached_table
from worker.engine.request import SpecStats
from worker.engine.verify_policy import RowCostTable

# Bumped when the engine's own step work changes in cost (the draft and overhead profiles
# cached on disk are keyed by it): 2 = greedy draft argmax in float32; 3 = best-of-N timings;
# 4 = step overheads timed at the profiling context length (was at most 64 positions);
# 5 = the drafter's linear layers packed for oneDNN where the target's are (`linear.py`);
# 6 = the drafter's RMSNorm and RoPE on the fused ops, its confidence head once a block.
ENGINE_COST_VERSION = 6
FLUSH_TOKENS = [1, 64, 512]
"""Deferred context tokens the flush profile writes (the gate charges the last slope)."""
FLUSH_ROWS = 8
"""Stand-in requests they are spread over."""


@dataclass
class EngineCosts:
    """The cost tables an engine plans with (all None: not profiled)."""

    sps: SPSTable | None = None
    """SPS(B): target forwards per second by the tokens of the forward."""
    step_cost: RowCostTable | None = None
    """The target's step cost by sequences and tokens."""
    draft_cost: SPSTable | None = None
    """Draft passes per second by drafting rows (an `SPSTable` over rows)."""
    overhead: StepOverhead = field(default_factory=StepOverhead)
    """What a decode step spends besides its target forward."""
    flush_cost: SPSTable | None = None
    """Deferred draft context written per second, by its tokens (an `SPSTable` over tokens)."""

    def to_json(self) -> str:
        return json.dumps({name: None if table is None else json.loads(table.to_json())
                           for name, table in self._tables().items()})

    @classmethod
    def from_json(cls, text: str) -> EngineCosts:
        """The tables `to_json` wrote; a ValueError naming the table that is not one."""
        data = json_object(text, "EngineCosts", tuple(cls()._tables()))
        tables = {}
        for name, value in data.items():
            try:
                tables[name] = None if value is None else (
                    RowCostTable if name == "step_cost" else SPSTable).from_json(json.dumps(value))
            except ValueError as err:
                raise ValueError(f"EngineCosts {name}: {err}") from None
        return cls(tables["sps"], tables["step_cost"], tables["draft_cost"],
                   StepOverhead(tables["overhead_plain"], tables["overhead_drafting"]),
                   tables["flush_cost"])

    def _tables(self) -> dict:
        return {"sps": self.sps, "step_cost": self.step_cost, "draft_cost": self.draft_cost,
                "overhead_plain": self.overhead.plain,
                "overhead_drafting": self.overhead.drafting, "flush_cost": self.flush_cost}


def profile_engine(engine) -> EngineCosts:
    """Every table of `EngineCosts` for `engine` (an `LLMEngine` with a drafter and no
    request), each read from the cache under `config.sps_cache_dir` or measured and cached."""
    cfg, gamma, runner = engine.config, engine.gamma, engine.runner
    sps = load_or_profile(runner, dtype=engine.dtype, max_tokens=cfg.max_batch_tokens,
                          ctx_len=cfg.sps_context_len, gamma=gamma, cache_dir=cfg.sps_cache_dir)
    step_cost = load_or_profile_rows(runner, dtype=engine.dtype, max_rows=cfg.max_num_seqs,
                                     ctx_len=cfg.sps_context_len, gamma=gamma,
                                     cache_dir=cfg.sps_cache_dir)
    alloc = engine.draft_kv.allocator  # a small cache cannot profile many rows
    fit = (alloc.num_blocks - alloc.num_reserved_blocks) // alloc.blocks_for(1 + gamma)
    max_rows = max(1, min(cfg.max_num_seqs, fit))
    ident = {"device": device_name(engine.device), "torch": torch.__version__,
             "dtype": str(engine.dtype), "ctx_len": cfg.sps_context_len,
             "target": runner.model.config.to_json_string(use_diff=False),
             "draft": repr(engine.draft.config), "draft_vocab_size": cfg.draft_vocab_size,
             "attention": implementation_id(runner.backend), "linears": runner.linears,
             "engine": ENGINE_COST_VERSION}
    draft_cost = load_or_profile_draft(lambda rows: time_draft(engine, rows), max_rows=max_rows,
                                       cache_dir=cfg.sps_cache_dir, ident=ident)
    overhead = StepOverhead(*load_or_profile_overhead(
        lambda rows, drafting: time_overhead(engine, rows, drafting), max_rows=max_rows,
        cache_dir=cfg.sps_cache_dir, ident=ident))
    room = (alloc.num_blocks - alloc.num_reserved_blocks - FLUSH_ROWS) * alloc.block_size
    flush_cost = load_or_profile_flush(lambda tokens: time_flush(engine, tokens),
                                       sizes=[t for t in FLUSH_TOKENS if t <= room] or [1],
                                       cache_dir=cfg.sps_cache_dir, ident=ident)
    return EngineCosts(sps, step_cost, draft_cost, overhead, flush_cost)


@torch.inference_mode()
def time_draft(engine, rows: int, repeats: int = 5) -> float:
    """Best seconds of one greedy draft pass (`engine.draft_pass`) for `rows` stand-in
    requests on a profiling context."""
    alloc, gamma = engine.draft_kv.allocator, engine.gamma
    free = alloc.num_blocks - alloc.num_reserved_blocks
    ctx_len = max(1, min(engine.config.sps_context_len, free // rows * alloc.block_size - gamma))
    stand_ins = [_DraftProfileRow(f"__draft_profile_{i}", ctx_len) for i in range(rows)]
    try:
        for row in stand_ins:
            alloc.reserve(row.req_id, ctx_len + gamma)
            alloc.grow(row.req_id, ctx_len)
        uniforms = torch.zeros(rows, gamma, device=engine.device)
        forwards = engine.counters.draft_forwards
        seconds = best_seconds(lambda: engine.draft_pass(stand_ins, uniforms), engine.device,
                               repeats)
        engine.counters.draft_forwards = forwards  # profiling is not work done
    finally:
        for row in stand_ins:
            alloc.free(row.req_id)
    return seconds


@torch.inference_mode()
def time_flush(engine, tokens: int, rows: int = FLUSH_ROWS, repeats: int = 3) -> float:
    """Best seconds of writing `tokens` tokens of deferred draft context, spread over `rows`
    stand-in requests (`DraftRunner.extend_context`, what `flush_context` runs)."""
    alloc, runner = engine.draft_kv.allocator, engine.runner
    rows = max(1, min(rows, tokens))
    counts = [tokens // rows + (i < tokens % rows) for i in range(rows)]
    free = (alloc.num_blocks - alloc.num_reserved_blocks) * alloc.block_size
    if free < tokens + rows * alloc.block_size:
        raise RuntimeError(f"the draft cache cannot hold {tokens} profiling tokens")
    hidden = runner.model.config.hidden_size
    feats = torch.randn(tokens, hidden * len(runner.feature_layer_ids), device=engine.device,
                        generator=torch.Generator(engine.device).manual_seed(0)
                        ).to(engine.dtype)
    seq_ids = [f"__flush_profile_{i}" for i in range(rows)]
    starts = [sum(counts[:i]) for i in range(rows)]
    try:
        for sid, count in zip(seq_ids, counts):
            alloc.reserve(sid, count)
        return best_seconds(lambda: engine.draft_runner.extend_context(
            seq_ids, feats, starts, counts, [0] * rows), engine.device, repeats)
    finally:
        for sid in seq_ids:
            alloc.free(sid)


@torch.inference_mode()
def time_overhead(engine, rows: int, drafting: bool, steps: int = 6) -> float:
    """Shortest seconds that a decode step of `rows` greedy stand-in requests spends besides
    its target forward, all drafting (`fixed`) or none (`ar`); the engine must be idle."""
    if engine.requests:
        raise RuntimeError("the engine must be idle to profile its step overhead")
    ctx = max(1, engine.config.sps_context_len)  # the draft pass's cost grows with it
    budget = ctx + steps * (engine.gamma + 1) + 1
    alloc = engine.kv.allocator
    rows = max(1, min(rows, alloc.num_blocks // alloc.blocks_for(budget)))
    params = SamplingParams(temperature=0, max_tokens=budget - ctx, ignore_eos=True)
    prompt = [t % engine.vocab_size for t in range(2, 2 + ctx)]
    runner, counters = engine.runner, engine.counters
    calibration, records = engine.calibration, engine.confidence_records
    engine.counters = dataclasses.replace(counters)  # the stand-ins' work is not counted,
    engine.calibration, engine.confidence_records = None, []  # nor teaches or records anything
    ids = [engine.add_request(prompt, params, req_id=f"__overhead_{i}",
                              policy="fixed" if drafting else "ar") for i in range(rows)]
    sink: list[float] = []
    try:
        while engine.waiting:  # admit and prefill all of them
            engine.step()
        engine.runner = timed = _TimedForwards(runner)
        for _ in range(steps):
            timed.seconds = 0.0
            sync(engine.device)
            started = time.perf_counter()
            engine.step()
            sync(engine.device)
            sink.append(time.perf_counter() - started - timed.seconds)
    finally:
        engine.runner = runner
        for rid in ids:
            engine.abort(rid)
        engine.counters, engine.calibration = counters, calibration
        engine.confidence_records = records
    return min(sink) if sink else 0.0


class _TimedForwards:
    """A `TargetRunner` whose forwards add their (synchronised) seconds to `seconds`."""

    def __init__(self, runner: TargetRunner):
        self._runner, self.seconds = runner, 0.0

    def __getattr__(self, name: str):
        return getattr(self._runner, name)

    def forward(self, *args, **kwargs):
        sync(self._runner.device)
        started = time.perf_counter()
        try:
            return self._runner.forward(*args, **kwargs)
        finally:
            sync(self._runner.device)
            self.seconds += time.perf_counter() - started


class _DraftProfileRow:
    """What `LLMEngine.draft_pass` reads of a request, for timing one with no real request."""

    def __init__(self, req_id: str, ctx_len: int):
        self.req_id, self.last_token, self.num_tokens = req_id, 0, ctx_len + 1
        self.params, self.stats = SamplingParams(temperature=0), SpecStats()


def batch_token_grid(max_tokens: int) -> list[int]:
    """Every size up to 16, then about 20% apart, ending at `max_tokens`."""
    sizes = list(range(1, min(16, max_tokens) + 1))
    while sizes[-1] < max_tokens:
        sizes.append(min(max_tokens, max(sizes[-1] + 1, int(sizes[-1] * 1.2))))
    return sizes


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()}-{platform.processor() or 'cpu'}-{os.cpu_count()}cpu"


def cache_key(runner: TargetRunner, dtype: torch.dtype, sizes: list[int], ctx_len: int,
              gamma: int) -> str:
    cfg = runner.model.config
    ident = {
        "device": device_name(runner.device), "torch": torch.__version__, "dtype": str(dtype),
        "model": getattr(cfg, "_name_or_path", ""), "config": cfg.to_json_string(use_diff=False),
        "sizes": sizes, "ctx_len": ctx_len, "gamma": gamma,
        "attention": implementation_id(runner.backend), "timing": "best-of-n",
        "linears": runner.linears,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]

def load_or_profile(runner: TargetRunner, *, dtype: torch.dtype, max_tokens: int, ctx_len: int,
                    gamma: int, cache_dir: str | None) -> SPSTable:
    sizes = batch_token_grid(max_tokens)

    def measure(points: list[int]) -> SPSTable:
        return profile_sps(runner, points, ctx_len=ctx_len, block=gamma + 1)

    return cached_table(cache_dir, f"{cache_key(runner, dtype, sizes, ctx_len, gamma)}.json",
                        lambda: measure(sizes), spot=lambda: measure(sizes[:1]))


def best_seconds(fn, device: torch.device, repeats: int, after=None) -> float:
    """Shortest wall time of `fn()` over `repeats` runs after one warm-up run; `after()` runs
    after each, untimed. The shortest, not the median: on a shared machine other work only
    ever adds time, and a profile's tables are compared with one another, so a point measured
    while a neighbour was busy would mislead every choice made with it."""
    times = []
    for i in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
        if after is not None:
            after()
    return max(min(times), 1e-9)


@torch.inference_mode()
def profile_sps(runner: TargetRunner, sizes: list[int], *, ctx_len: int, block: int,
                repeats: int = 3) -> SPSTable:
    """Best-of-`repeats` timing of a B-token verify forward for each B in `sizes`."""
    with _profiling_sequences(runner, -(-sizes[-1] // block), ctx_len, block,
                              "sps") as (seq_ids, ctx_len, gen):
        # a small cache cannot hold the largest batches: profile what fits, extrapolate the rest
        sizes = [s for s in sizes if s <= len(seq_ids) * block] or [1]
        times = [_time_forward(runner, seq_ids, size, ctx_len, block, repeats, gen)
                 for size in sizes]
    # A forward of more tokens never really runs faster; timing noise can say otherwise, and a
    # table that rewards extra tokens would make Alg. 1 verify worthless candidates.
    return SPSTable(batch_tokens=list(sizes), steps_per_second=(1.0 / _monotone(times)).tolist())


def load_or_profile_rows(runner: TargetRunner, *, dtype: torch.dtype, max_rows: int,
                         ctx_len: int, gamma: int, cache_dir: str | None) -> RowCostTable:
    """The `RowCostTable` of the runner's target for up to `max_rows` sequences, cached on
    disk beside SPS(B)."""
    rows = draft_row_grid(max_rows)
    key = cache_key(runner, dtype, rows, ctx_len, gamma)

    def measure(points: list[int]) -> RowCostTable:
        return profile_rows(runner, points, ctx_len=ctx_len, gamma=gamma)

    return cached_table(cache_dir, f"rows-{key}.json", lambda: measure(rows), RowCostTable,
                        spot=lambda: measure(rows[:1]))


@torch.inference_mode()
def profile_rows(runner: TargetRunner, rows: list[int], *, ctx_len: int, gamma: int,
                 repeats: int = 5) -> RowCostTable:
    """Best-of-`repeats` seconds of a forward of R sequences of `ctx_len` cached tokens, with
    1 and with 1 + gamma new tokens each, for each R in `rows` (capped by the cache)."""
    block = gamma + 1
    with _profiling_sequences(runner, rows[-1], ctx_len, block,
                              "rows") as (seq_ids, ctx_len, gen):
        rows = [r for r in rows if r <= len(seq_ids)] or [1]
        plain = [_time_forward(runner, seq_ids, r, ctx_len, 1, repeats, gen) for r in rows]
        full = [_time_forward(runner, seq_ids, r * block, ctx_len, block, repeats, gen)
                for r in rows]
    # More sequences, or more tokens on as many sequences, never really run faster.
    plain_t = _monotone(plain)
    full_t = torch.maximum(_monotone(full), plain_t)
    return RowCostTable(rows=list(rows), plain_seconds=plain_t.tolist(),
                        full_seconds=full_t.tolist(), gamma=gamma)


@contextmanager
def _profiling_sequences(runner, num_seqs: int, ctx_len: int, block: int, name: str):
    """Up to `num_seqs` sequences holding random context, with room for `block` more tokens
    each, as many and as long (at most `ctx_len`) as the cache's free blocks allow; yields
    (sequence ids, context length, generator) and frees them after."""
    alloc = runner.kv.allocator
    free_blocks = alloc.num_blocks - alloc.num_reserved_blocks
    ctx_len = max(1, min(ctx_len, free_blocks * alloc.block_size // num_seqs - block
                         - alloc.block_size))
    num_seqs = min(num_seqs, max(1, free_blocks // alloc.blocks_for(ctx_len + block)))
    seq_ids = [f"__{name}_profile_{i}" for i in range(num_seqs)]
    gen = torch.Generator(device="cpu").manual_seed(0)
    try:
        for sid in seq_ids:
            alloc.reserve(sid, ctx_len + block)
        for sid in seq_ids:  # one at a time: profiling must fit a small prefill budget too
            ids = torch.randint(0, runner.vocab_size, (ctx_len,), generator=gen).to(runner.device)
            runner.forward(ForwardBatch([sid], [0], [ctx_len], ids, ids.new_zeros(1)), False)
        yield seq_ids, ctx_len, gen
    finally:
        for sid in seq_ids:
            alloc.free(sid)


def _monotone(times: list[float]) -> torch.Tensor:
    """Running maximum of `times` (float64): a larger forward never really runs faster."""
    return torch.cummax(torch.tensor(times, dtype=torch.float64), 0).values


def _time_forward(runner, seq_ids, size, ctx_len, block, repeats, gen) -> float:
    """Best seconds of one forward of `size` tokens, `block` new tokens per sequence."""
    counts = [block] * (size // block) + ([size % block] if size % block else [])
    sids = seq_ids[: len(counts)]
    ids = torch.randint(0, runner.vocab_size, (size,), generator=gen).to(runner.device)
    rows = torch.arange(size, device=runner.device)
    batch = ForwardBatch(sids, [ctx_len] * len(sids), counts, ids, rows)

    def roll_back():
        for sid in sids:
            runner.kv.allocator.truncate(sid, ctx_len)

    return best_seconds(lambda: runner.forward(batch, True), runner.device, repeats, roll_back)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def draft_row_grid(max_rows: int) -> list[int]:
    """Powers of two up to `max_rows`, and `max_rows` itself."""
    sizes = [1]
    while sizes[-1] * 2 < max_rows:
        sizes.append(sizes[-1] * 2)
    return sizes + [max_rows] if max_rows > 1 else sizes


def load_or_profile_draft(time_draft, *, ident: dict, max_rows: int,
                          cache_dir: str | None, kind: str = "draft") -> SPSTable:
    """Draft passes per second by the number of drafting requests (rows), as an `SPSTable`
    over rows: `time_draft(rows)` times one pass. Cached on disk like SPS(B), so the engine's
    choices depend on the table, not on the timing noise of the moment."""
    sizes = draft_row_grid(max_rows)
    key = hashlib.sha256(json.dumps({**ident, "sizes": sizes, "kind": kind},
                                    sort_keys=True).encode()).hexdigest()[:24]
    return cached_table(cache_dir, f"{kind}-{key}.json", lambda: _timed_table(time_draft, sizes),
                        spot=lambda: _timed_table(time_draft, sizes[:1]))


def load_or_profile_flush(time_flush, *, sizes: list[int], ident: dict,
                          cache_dir: str | None) -> SPSTable:
    """Deferred draft context written per second by its tokens (`DraftGate.flush`), at
    `sizes` (FLUSH_TOKENS, as far as the draft cache holds them): `time_flush(tokens)` times
    one write. Cached beside the draft table."""
    key = hashlib.sha256(json.dumps({**ident, "sizes": sizes, "rows": FLUSH_ROWS,
                                     "kind": "flush"}, sort_keys=True).encode()).hexdigest()[:24]
    return cached_table(cache_dir, f"flush-{key}.json", lambda: _timed_table(time_flush, sizes),
                        spot=lambda: _timed_table(time_flush, sizes[:1]))


def _timed_table(seconds_at, points: list[int]) -> SPSTable:
    """`seconds_at(point)` for each point, as an `SPSTable` of its rate (monotone times)."""
    times = [max(seconds_at(point), 1e-6) for point in points]
    return SPSTable(batch_tokens=points, steps_per_second=(1.0 / _monotone(times)).tolist())


def load_or_profile_overhead(time_overhead, *, ident: dict, max_rows: int,
                             cache_dir: str | None) -> tuple[SPSTable, SPSTable]:
    """What a decode step spends besides its target forward, by rows (`StepOverhead`'s
    tables): `time_overhead(rows, drafting)` times steps with nobody or everybody drafting.
    Cached beside the draft table."""
    plain = load_or_profile_draft(lambda rows: time_overhead(rows, False), ident=ident,
                                  max_rows=max_rows, cache_dir=cache_dir, kind="overhead-plain")
    drafting = load_or_profile_draft(lambda rows: time_overhead(rows, True), ident=ident,
                                     max_rows=max_rows, cache_dir=cache_dir,
                                     kind="overhead-draft")
    return plain, drafting
