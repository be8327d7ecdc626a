"""Engine benchmark: the DSpark engine against plain transformers, and its policies side by side.

Prints one JSON object and writes it to `--out`, with a plot beside it (aggregate throughput
against per-request speed per policy across concurrencies, the layout of the DSpark paper's
Figure 7). Measures, on one target (and draft):

1. transformers `generate`, one request at a time, against the engine in `ar` mode serving all
   prompts at once, and both serving one request at a time (is the engine a real server?);
2. the policies `ar`, `fixed`, `threshold` and `prefix` at each concurrency: throughput,
   per-request speed, accepted length, verify tokens per step.

Every arm decodes greedily exactly `--max-tokens` tokens per request from the same prompts
(cycled); a closed loop keeps c requests in flight, for max(prompts, c x `--waves`) requests
(steady state, as a server with a queue). Arms are interleaved within each repeat so machine
noise hits them alike, and medians are reported.
Without `--target`/`--draft` it builds a tiny random Qwen3 target and a random DSpark draft:
their acceptance is near zero, so speculation costs here rather than pays.

Not a test: it asserts nothing about speed; it reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from closed_loop import hf_serial, median_figures, serve  # bench/closed_loop.py, beside this

from worker import tiny
from worker.engine.config import EngineConfig
from worker.engine.draft_checkpoint import random_dspark_checkpoint
from worker.engine.engine import LLMEngine
from worker.engine.loader import load_models
from worker.engine.profiler import device_name

POLICIES = ("ar", "fixed", "threshold", "prefix")
PROMPT_DIR = Path(__file__).resolve().parent / "prompts"  # bench/prompts/README.md
# Used when the prompt files are absent: short functions of mixed length.
FALLBACK_PROMPTS = (
    "def fib(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import json\n\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n\n\n"
    "def save(path, data):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
    "        self.items.append(x)\n\n    def pop(self):\n",
    "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n    \"\"\"Merge two sorted "
    "lists into one sorted list.\n    >>> merge_sorted([1, 3], [2, 4])\n    [1, 2, 3, 4]\n"
    "    \"\"\"\n",
)
# Sizes near docs/DSPARK.md 4's CPU target (width 256, 6 layers), with a 512-entry vocabulary.
TINY_TARGET = dict(hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2,
                   intermediate_size=768)
# Random targets of real Qwen3 shapes (`--random-size`), for GPU runs: the published configs'
# widths, depths, heads and vocabulary (the tiny tokenizer covers its first 512 ids only).
RANDOM_SIZES = {
    "tiny": TINY_TARGET,
    "0.6b": dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936),
    "4b": dict(hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
               intermediate_size=9728, vocab_size=151936),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16, ... (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--target", help="target model directory (default: a tiny random Qwen3)")
    p.add_argument("--draft", help="DSpark draft directory (default: a random draft, gamma 7)")
    p.add_argument("--random-size", choices=sorted(RANDOM_SIZES), default="tiny",
                   help="shape of the random target built without --target (default tiny; "
                        "0.6b and 4b: Qwen3-0.6B / Qwen3-4B shapes, for a GPU)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated request counts")
    p.add_argument("--num-prompts", type=int, default=16,
                   help="prompts of the transformers comparison (all served at once by the engine)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per arm (median)")
    p.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                   help="draft only the N most frequent tokens (needs the draft's "
                        "draft_vocab.json; default 0: the full vocabulary)")
    p.add_argument("--waves", type=int, default=3,
                   help="at concurrency c > 1, serve c x WAVES requests (default 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared machine, more threads "
                        "stall each other; 0 keeps torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny models")
    p.add_argument("--out", default="bench/results/engine.json", help="JSON output file")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 16 tokens, 4 prompts, concurrency 1,4, one repeat, one wave")
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens, args.num_prompts, args.repeats, args.concurrency = 16, 4, 1, "1,4"
        args.waves = 1
    try:
        args.concurrency = sorted({int(c) for c in args.concurrency.split(",")})
    except ValueError:
        p.error(f"--concurrency: expected integers separated by commas, got {args.concurrency!r}")
    for name in ("max_tokens", "num_prompts", "repeats", "waves"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 1")
    if args.draft_vocab < 0:
        p.error("--draft-vocab: expected an integer >= 0 (0: the full vocabulary)")
    if min(args.concurrency) < 1:
        p.error("--concurrency: every value must be >= 1")
    for name in ("target", "draft"):
        path = getattr(args, name)
        if path is not None and not (Path(path) / "config.json").is_file():
            p.error(f"--{name} {path}: expected a model directory holding config.json")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


# -- models and prompts -------------------------------------------------------------------
def build_models(args, work: Path) -> tuple[str, str]:
    """Target and draft directories: the given ones, or tiny random ones built under `work`."""
    target_dir = args.target
    if target_dir is None:
        tokenizer = tiny.build_tokenizer(work / "target", vocab_size=512)
        target_dir = str(tiny.build_target(work / "target", "qwen3", tokenizer, seed=args.seed,
                                           dtype=torch.float32 if args.random_size == "tiny"
                                           else torch.bfloat16,
                                           **RANDOM_SIZES[args.random_size]))
    if args.draft is not None:
        return target_dir, args.draft
    cpu = load_models(target_dir, None, EngineConfig(device="cpu", dtype="float32"))
    draft_dir = random_dspark_checkpoint(cpu.target.config, work / "draft", gamma=7,
                                         seed=args.seed, target_model=cpu.target,
                                         mask_token_id=cpu.tokenizer.mask_token_id)
    return target_dir, str(draft_dir)


def load_prompts(tokenizer, count: int,
                 max_prompt_tokens: int = 200) -> tuple[list[list[int]], str]:
    """`count` token-id prompts: the code blocks of the first HumanEval prompts, cycled."""
    path = PROMPT_DIR / "humaneval.jsonl"
    texts, source = [], "built-in snippets"
    if path.is_file():
        for line in path.read_text().splitlines()[:count]:
            turn = json.loads(line)["turns"][0]
            texts.append(turn.split("```python\n", 1)[-1].rsplit("```", 1)[0])
        source = "humaneval.jsonl (code blocks)"
    texts = texts or list(FALLBACK_PROMPTS)
    ids = [tokenizer(t).input_ids[:max_prompt_tokens] for t in texts]
    return [ids[i % len(ids)] for i in range(count)], source


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the run ------------------------------------------------------------------------------
def plan(args) -> list[tuple[str, int, int]]:
    """(policy, concurrency, num_requests) of every engine arm (`policy_arms`), plus `ar` one
    request at a time and all prompts in one wave, for the comparison with transformers."""
    return sorted(set(policy_arms(args)) | {("ar", 1, single_requests(args)),
                                            ("ar", args.num_prompts, args.num_prompts)})


def policy_arms(args) -> list[tuple[str, int, int]]:
    """Every arm serves each prompt at least once, and at concurrency c at least c x `--waves`
    requests, so that most steps run at c in flight: in a single wave the batch thins out as
    requests finish, which a speculative policy (whose requests finish at different steps)
    suffers and `ar` (all in lockstep) does not, while a server with a queue never sees that
    tail."""
    return [(p, c, max(args.num_prompts, c * args.waves))
            for p in POLICIES for c in args.concurrency]


def cycle(prompts: list[list[int]], n: int) -> list[list[int]]:
    return [prompts[i % len(prompts)] for i in range(n)]


def single_requests(args) -> int:
    """Requests of the `ar` arm compared with transformers one request at a time (kept few)."""
    return min(args.num_prompts, 2 if args.quick else 3)


def warm_up(model, engine, prompts, pad_id) -> None:
    """One short call per arm: first-call overheads (allocations, kernel selection) untimed."""
    hf_serial(model, prompts[:1], 4, pad_id)
    for policy in POLICIES:
        serve(engine, prompts[:2], concurrency=2, policy=policy, max_tokens=4)


def run_arms(args, model, engine, prompts, pad_id) -> tuple[list[dict], dict]:
    hf_runs, engine_runs = [], {arm: [] for arm in plan(args)}
    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats}", file=sys.stderr, flush=True)
        hf_runs.append(hf_serial(model, prompts, args.max_tokens, pad_id))
        for policy, c, n in engine_runs:
            engine_runs[(policy, c, n)].append(
                serve(engine, cycle(prompts, n), concurrency=c, policy=policy,
                      max_tokens=args.max_tokens))
    return hf_runs, engine_runs


def paired_single_requests(model, engine, prompts, max_tokens, pad_id, rounds) -> list[float]:
    """Engine `ar` / transformers per-request speed, one prompt at a time, the two arms run
    back to back (their order alternating) so machine noise hits both of each pair alike."""
    def hf(ids):
        return hf_serial(model, [ids], max_tokens, pad_id)["per_request_tps"][0]

    def eng(ids):
        return serve(engine, [ids], concurrency=1, policy="ar",
                     max_tokens=max_tokens)["per_request_tps"]

    ratios = []
    for rnd in range(rounds):
        for i, ids in enumerate(prompts):
            if (rnd + i) % 2:
                e, h = eng(ids), hf(ids)
            else:
                h, e = hf(ids), eng(ids)
            ratios.append(e / h)
    return ratios


def compare_with_hf(args, hf_runs, engine_runs, pair_ratios) -> dict:
    k = single_requests(args)
    ar_all = engine_runs[("ar", args.num_prompts, args.num_prompts)]
    ar_one = engine_runs[("ar", 1, k)]
    hf_agg = statistics.median(r["aggregate_tps"] for r in hf_runs)
    hf_single = statistics.median(statistics.mean(r["per_request_tps"][:k]) for r in hf_runs)
    eng_agg = statistics.median(r["aggregate_tps"] for r in ar_all)
    eng_single = statistics.median(r["per_request_tps"] for r in ar_one)
    matches = sum(e == h for e, h in zip(ar_all[0]["outputs"], hf_runs[0]["outputs"]))
    return {
        "hf_serial_aggregate_tps": hf_agg,
        "hf_serial_aggregate_tps_runs": [round(r["aggregate_tps"], 2) for r in hf_runs],
        "hf_serial_per_request_tps_all": statistics.median(
            statistics.mean(r["per_request_tps"]) for r in hf_runs),
        f"engine_ar{args.num_prompts}_aggregate_tps": eng_agg,
        f"ratio_ar{args.num_prompts}_vs_hf_serial": eng_agg / hf_agg,
        "single_request_prompts": k,
        "hf_per_request_tps": hf_single,
        "engine_ar1_per_request_tps": eng_single,
        "ratio_ar1_vs_hf_arms": eng_single / hf_single,
        "ratio_ar1_vs_hf": statistics.median(pair_ratios),
        "ratio_ar1_vs_hf_pairs": [round(r, 3) for r in pair_ratios],
        "ar_outputs_equal_hf": f"{matches}/{args.num_prompts}",
    }


def policy_table(engine_runs, arms) -> dict:
    table: dict[str, dict[str, dict]] = {}
    for (policy, c, n), runs in sorted(engine_runs.items()):
        if (policy, c, n) not in arms:
            continue
        table.setdefault(policy, {})[str(c)] = {"num_requests": n, **median_figures(runs)}
    return table


def sps_summary(engine: LLMEngine) -> dict | None:
    if engine.sps is None:
        return None
    table = engine.sps
    points = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= table.batch_tokens[-1]]
    return {"steps_per_second": {str(b): round(table(b), 1) for b in points},
            "tokens_per_second": {str(b): round(b * table(b)) for b in points},
            "batch_tokens": table.batch_tokens,
            "steps_per_second_all": [round(s, 2) for s in table.steps_per_second],
            "step_ms_by_rows": step_cost_summary(engine)}


def step_cost_summary(engine: LLMEngine) -> dict | None:
    """The profiled step cost by sequences: one token each ('plain') and 1 + gamma ('full')."""
    rows = engine.step_cost
    if rows is None:
        return None
    return {"rows": rows.rows, "plain": [round(1e3 * t, 2) for t in rows.plain_seconds],
            "full": [round(1e3 * t, 2) for t in rows.full_seconds]}


def plot(table: dict, hf_point: tuple[float, float], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for policy, by_c in table.items():
        cs = sorted(by_c, key=int)
        xs = [by_c[c]["aggregate_tps"] for c in cs]
        ys = [by_c[c]["per_request_tps"] for c in cs]
        ax.plot(xs, ys, marker="o", label=policy)
        for c, x, y in zip(cs, xs, ys):
            ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.scatter(*hf_point, marker="x", color="black", label="transformers generate, serial")
    ax.set_xlabel("aggregate throughput (tokens/s)")
    ax.set_ylabel("per-request speed (tokens/s)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_engine(args, work: Path):
    """(config, models, engine) on the requested device and dtype."""
    # Built models get a new path each run, so their SPS profile could never be reused:
    # keep it out of the shared cache.
    sps_dir = str(work / "sps") if args.target is None else None
    config = EngineConfig(device=args.device, dtype=args.dtype, max_num_seqs=64,
                          max_batch_tokens=256, sps_cache_dir=sps_dir,
                          draft_vocab_size=args.draft_vocab)
    models = load_models(*build_models(args, work), config)
    return config, models, LLMEngine.from_models(config, models)


def describe_models(args, model, draft, engine) -> dict:
    cfg, dcfg = model.config, draft.config
    return {
        "target": {"source": Path(args.target).name if args.target else "tiny random qwen3",
                   "params": num_params(model), "model_type": cfg.model_type,
                   "hidden_size": cfg.hidden_size, "num_layers": cfg.num_hidden_layers,
                   "vocab_size": cfg.vocab_size},
        "draft": {"source": Path(args.draft).name if args.draft else "random dspark",
                  "params": num_params(draft), "gamma": draft.gamma,
                  "num_layers": dcfg.num_hidden_layers, "markov_rank": dcfg.markov_rank,
                  "markov_head_type": dcfg.markov_head_type, "sts": engine.sts is not None,
                  "draft_vocab_size": args.draft_vocab or dcfg.vocab_size},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="sparkgrid-bench-") as work:
        config, models, engine = load_engine(args, Path(work))
    model, tokenizer, draft = models.target, models.tokenizer, models.draft
    prompts, prompt_source = load_prompts(tokenizer, args.num_prompts)
    pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
              else tokenizer.eos_token_id)
    warm_up(model, engine, prompts, pad_id)
    hf_runs, engine_runs = run_arms(args, model, engine, prompts, pad_id)
    pair_ratios = paired_single_requests(model, engine, prompts[:8], args.max_tokens, pad_id,
                                         args.repeats)
    table = policy_table(engine_runs, policy_arms(args))
    versus = compare_with_hf(args, hf_runs, engine_runs, pair_ratios)
    out = Path(args.out)
    plot_path = out.with_name(f"{out.stem}_throughput.png")
    result = {
        "benchmark": "engine",
        "torch": torch.__version__,
        "device": device_name(config.torch_device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "models": describe_models(args, model, draft, engine),
        "engine_config": {**dataclasses.asdict(config),
                          "sps_cache_dir": "temporary" if args.target is None else None},
        "sps": sps_summary(engine),
        "workload": {"prompts": prompt_source, "num_prompts": args.num_prompts,
                     "prompt_tokens": [len(p) for p in prompts], "max_tokens": args.max_tokens,
                     "temperature": 0, "repeats": args.repeats, "concurrency": args.concurrency,
                     "requests_per_arm": {str(c): n for p, c, n in policy_arms(args)
                                          if p == "ar"}},
        "vs_transformers": versus,
        "policies": table,
        "plot": plot_path.name,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    title = (f"{result['models']['target']['source']} + {result['models']['draft']['source']}, "
             f"{result['device']}, {args.dtype}, {args.max_tokens} tokens/request")
    plot(table, (versus["hf_serial_aggregate_tps"], versus["hf_serial_per_request_tps_all"]),
         title, plot_path)
    text = json.dumps(result, indent=2)
    out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError) as err:
        print(f"bench/engine.py: error: {err}", file=sys.stderr)
        sys.exit(2)
