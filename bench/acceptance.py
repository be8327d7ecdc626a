"""Acceptance benchmark: how far DSpark's drafts get through verification, against DFlash's.

Prints one JSON object and writes it to `--out`, with two plots beside it. On one pair built by
`worker.training.build_pair` (DIR/target, DIR/dspark, DIR/dflash) it measures, for each drafter
at the gamma of its checkpoint, at temperatures 0 and 1, under the `fixed` policy (every draft
position is verified, so acceptance does not depend on the scheduler's choices):

1. the accepted length tau (tokens committed per decoding step, bonus included) on two prompt
   sets, held-out standard-library prefixes and the HumanEval code blocks, and the DSpark/DFlash
   ratio of it (the paper's Table 1 question);
2. the conditional acceptance P(accept k | 1..k-1 accepted) per draft position k (the paper's
   Figure 2);
3. the calibration of the confidence heads on the held-out set at T = 1: ECE and AUC of the
   prefix survival a_k per position, raw and, for DSpark, after Sequential Temperature Scaling
   with the temperatures of DIR/dspark/sts.json (fitted on other held-out prefixes).

Every request has its own seed (its index in the set), so runs repeat exactly.
Not a test: it asserts nothing about acceptance; it reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from worker.engine.calibration import complete_blocks, position_metrics
from worker.engine.config import EngineConfig, SamplingParams
from worker.engine.engine import LLMEngine
from worker.engine.loader import EngineModels, load_models
from worker.engine.profiler import device_name
from worker.training.corpus import load_corpus
from worker.training.draft_stages import corpus_prefixes

DRAFTERS = ("dspark", "dflash")
COLORS = {"dspark": "C0", "dflash": "C1"}
TEMPERATURES = (0.0, 1.0)
HUMANEVAL = Path(__file__).resolve().parent / "prompts" / "humaneval.jsonl"  # bench/prompts/
HELDOUT_SEED = 3  # build_pair fits STS on seed-2 held-out prefixes: these are other ones
PREFIX_TOKENS = 128


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", required=True, help="a build_pair output directory")
    p.add_argument("--num-prompts", type=int, default=128,
                   help="prompts per set (default 128: ECE is biased upward on few blocks)")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens per request")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1; 0 keeps torch's default)")
    p.add_argument("--out", default="bench/results/acceptance.json", help="JSON output file")
    p.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                   help="draft only the N most frequent tokens (the drafters' draft_vocab.json; "
                        "default 0: the full vocabulary)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 prompts, 32 tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.num_prompts, args.max_tokens = 4, 32
    for name in ("num_prompts", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 1")
    if args.draft_vocab < 0:
        p.error("--draft-vocab: expected an integer >= 0 (0: the full vocabulary)")
    missing = [n for n in ("target", *DRAFTERS)
               if not (Path(args.pair) / n / "config.json").is_file()]
    if missing:
        p.error(f"--pair {args.pair}: expected a build_pair output holding target/, dspark/ and "
                f"dflash/ model directories; no config.json under {', '.join(missing)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    return args


# -- prompts --------------------------------------------------------------------------------
def humaneval_prompts(tokenizer, count: int) -> list[list[int]]:
    """The code inside the ```python fence of the first `count` HumanEval prompts."""
    if not HUMANEVAL.is_file():
        raise FileNotFoundError(f"{HUMANEVAL}: the HumanEval prompts are missing; expected a "
                                "JSONL file of {\"turns\": [text]} beside the repository")
    texts = []
    for line in HUMANEVAL.read_text().splitlines()[:count]:
        turn = json.loads(line)["turns"][0]
        texts.append(turn.split("```python\n", 1)[-1].rsplit("```", 1)[0])
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def prompt_sets(tokenizer, count: int) -> dict[str, list[list[int]]]:
    heldout = corpus_prefixes(load_corpus().heldout, tokenizer, count, PREFIX_TOKENS,
                              seed=HELDOUT_SEED)
    return {"heldout": heldout, "humaneval": humaneval_prompts(tokenizer, count)}


# -- one run: a prompt set at a temperature -----------------------------------------------
def run_set(engine: LLMEngine, prompts: list[list[int]], temperature: float,
            max_tokens: int) -> tuple[dict, list]:
    """Generate every prompt (all in flight at once, each with seed = its index) under `fixed`;
    returns the acceptance figures and the confidence records of the run."""
    first_record = len(engine.confidence_records)
    stats, start = {}, time.perf_counter()
    for i, ids in enumerate(prompts):
        params = SamplingParams(temperature=temperature, seed=i, max_tokens=max_tokens)
        engine.add_request(ids, params, req_id=f"r{i}", policy="fixed")
    while engine.has_unfinished():
        stats.update((o.req_id, o.stats) for o in engine.step() if o.finished)
    wall = time.perf_counter() - start
    return acceptance_figures(list(stats.values()), engine.gamma, wall), \
        engine.confidence_records[first_record:]


def acceptance_figures(stats: list, gamma: int, wall: float) -> dict:
    steps = [n for s in stats for n in s.accept_lengths]
    verified = [sum(s.position_verified[k] for s in stats if s.position_verified)
                for k in range(gamma)]
    accepted = [sum(s.position_accepted[k] for s in stats if s.position_accepted)
                for k in range(gamma)]
    return {
        "tau": sum(steps) / len(steps) if steps else None,  # mean over all decoding steps
        "num_steps": len(steps),
        "num_tokens": sum(s.completion_tokens for s in stats),
        "conditional_acceptance": [a / v if v else None for a, v in zip(accepted, verified)],
        "position_verified": verified,
        "position_accepted": accepted,
        "wall_s": round(wall, 2),
    }


# -- calibration ------------------------------------------------------------------------------
def calibration(records: list, sts: list[float] | None) -> dict | None:
    """Per position k: ECE and AUC of a_k against the prefix-survival label, raw ('before') and
    with STS ('after', when `sts` is given); None without a confidence head. Blocks cut short
    by a request's last tokens are dropped, as when STS is fitted (`complete_blocks`)."""
    if not records:
        return None
    conf_logits, accepted, num_dropped = complete_blocks(records)
    out = {"num_blocks": len(records), "num_capped_blocks_dropped": num_dropped,
           **position_metrics(conf_logits, accepted, sts)}
    for key in [k for k in out if k.startswith(("ece_", "auc_"))]:
        out[f"mean_{key}"] = mean_of(out[key])
    return out


def mean_of(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


# -- models ---------------------------------------------------------------------------------
def make_engine(args, models: EngineModels, config: EngineConfig, name: str) -> LLMEngine:
    """An engine over the shared target (`models`, loaded with `config`) with the drafter
    `name`; every prompt of a set fits in one batch with all gamma draft tokens verified (no
    batch-share cap)."""
    models = models.with_draft(Path(args.pair) / name, config)
    num_seqs = args.num_prompts
    config = dataclasses.replace(config, policy="fixed", profile_sps=False,
                                 record_confidence=True, max_num_seqs=num_seqs,
                                 max_batch_tokens=num_seqs * (models.draft.gamma + 1),
                                 draft_vocab_size=args.draft_vocab)
    return LLMEngine.from_models(config, models)


def describe(engine: LLMEngine) -> dict:
    c = engine.draft.config
    vocab = engine.draft_vocab
    return {"params": num_params(engine.draft), "gamma": engine.gamma,
            "draft_vocab_size": c.vocab_size if vocab is None else vocab.token_ids.numel(),
            "num_layers": c.num_hidden_layers, "markov_rank": c.markov_rank,
            "markov_head_type": c.markov_head_type, "confidence_head": c.enable_confidence_head,
            "sts_temperatures": engine.sts}


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(args, loaded: EngineModels, config: EngineConfig,
            sets: dict) -> tuple[dict, dict, dict, dict]:
    """(acceptance[drafter][set][T], calibration[drafter], models, engine configs), each
    drafter in turn on the target of `loaded`."""
    acceptance, calib, models, configs = {}, {}, {}, {}
    for name in DRAFTERS:
        engine = make_engine(args, loaded, config, name)
        models[name], configs[name] = describe(engine), dataclasses.asdict(engine.config)
        acceptance[name] = {s: {} for s in sets}
        for set_name, prompts in sets.items():
            for temp in TEMPERATURES:
                print(f"{name} {set_name} T={temp:g}", file=sys.stderr, flush=True)
                figures, records = run_set(engine, prompts, temp, args.max_tokens)
                acceptance[name][set_name][temp_key(temp)] = figures
                if set_name == "heldout" and temp == 1.0:
                    calib[name] = calibration(records, engine.sts)
        del engine  # free its caches before the next engine allocates its own
    return acceptance, calib, models, configs


def temp_key(temperature: float) -> str:
    return f"T{temperature:g}"


def tau_ratios(acceptance: dict) -> dict:
    """DSpark tau / DFlash tau per set and temperature, and their mean."""
    ratios = {s: {t: ratio(by_t["tau"], acceptance["dflash"][s][t]["tau"])
                  for t, by_t in by_set.items()}
              for s, by_set in acceptance["dspark"].items()}
    return {**ratios, "mean": mean_of([r for by_t in ratios.values() for r in by_t.values()])}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None  # None: a run without a decoding step


# -- plots ------------------------------------------------------------------------------------
def plot_positions(acceptance: dict, title: str, path: Path) -> None:
    """P(accept k | 1..k-1 accepted) against k at T = 1, one panel per set (paper Figure 2)."""
    plt = pyplot()
    sets = list(acceptance["dspark"])
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.8), sharey=True)
    for ax, set_name in zip(axes, sets):
        for name in DRAFTERS:
            fig_t1 = acceptance[name][set_name][temp_key(1.0)]
            ys = fig_t1["conditional_acceptance"]
            ax.plot(range(1, len(ys) + 1), [math.nan if y is None else y for y in ys],
                    marker="o", color=COLORS[name],
                    label=f"{name} (tau {fig_t1['tau'] or math.nan:.2f})")
            ax.set_xticks(range(1, len(ys) + 1))
        ax.set_title(f"{set_name}, T=1", fontsize=9)
        ax.set_xlabel("draft position k")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("P(accept k | 1..k-1 accepted)")
    save(fig, title, path)


def plot_calibration(calib: dict, title: str, path: Path) -> None:
    """ECE and AUC of the prefix survival a_k per position, before and after STS."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.8))
    for metric, ax in zip(("ece", "auc"), axes):
        for name, figures in calib.items():
            for when, style, label in (("before", "--", "raw"), ("after", "-", "STS")):
                ys = (figures or {}).get(f"{metric}_{when}")
                if ys:
                    ax.plot(range(1, len(ys) + 1), [math.nan if y is None else y for y in ys],
                            style, marker="o", color=COLORS[name], label=f"{name}, {label}")
                    ax.set_xticks(range(1, len(ys) + 1))
        ax.set_xlabel("draft position k")
        ax.set_ylabel(f"{metric.upper()} of a_k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, title, path)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, title: str, path: Path) -> None:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


# -- the run ----------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = Path(args.pair)
    config = EngineConfig(device=args.device)
    loaded = load_models(pair / "target", None, config)
    target = loaded.target
    sets = prompt_sets(loaded.tokenizer, args.num_prompts)
    acceptance, calib, models, configs = measure(args, loaded, config, sets)
    out = Path(args.out)
    plots = {"position_acceptance": out.with_name(f"{out.stem}_position_acceptance.png"),
             "calibration": out.with_name(f"{out.stem}_calibration.png")}
    ratios = tau_ratios(acceptance)
    result = {
        "benchmark": "acceptance",
        "pair": pair.resolve().name,
        "torch": torch.__version__,
        "device": device_name(config.torch_device),
        "dtype": str(config.torch_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "models": {"target": {"params": num_params(target), **target_shape(target.config)},
                   **models},
        "engine_config": configs,
        "workload": workload(args, sets),
        "summary": summary(ratios, calib),
        "acceptance": acceptance,
        "tau_ratio_dspark_vs_dflash": ratios,
        "calibration": {"set": "heldout", "temperature": 1.0, **calib},
        "plots": {k: v.name for k, v in plots.items()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{result['pair']}: {args.num_prompts} prompts/set, {args.max_tokens} tokens, fixed"
    plot_positions(acceptance, title, plots["position_acceptance"])
    plot_calibration(calib, f"{title}; held-out set, T=1", plots["calibration"])
    text = json.dumps(result, indent=2)
    out.write_text(text + "\n")
    print(text)
    return 0


def target_shape(cfg) -> dict:
    return {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size}


def workload(args, sets: dict) -> dict:
    sources = {"heldout": f"corpus_prefixes(load_corpus().heldout, {PREFIX_TOKENS} tokens, "
                          f"seed={HELDOUT_SEED})",
               "humaneval": "humaneval.jsonl code blocks (first prompts)"}
    return {"policy": "fixed", "temperatures": list(TEMPERATURES), "max_tokens": args.max_tokens,
            "seeds": "request i of a set has seed i",
            "sets": {name: {"source": sources[name], "num_prompts": len(prompts),
                            "mean_prompt_tokens": statistics.mean(len(p) for p in prompts)}
                     for name, prompts in sets.items()}}


def summary(ratios: dict, calib: dict) -> dict:
    """The headline figures: the mean tau ratio, and the calibration errors averaged over k."""
    out = {"tau_ratio_mean": ratios["mean"]}
    for name, figures in calib.items():
        for key in ("mean_ece_before", "mean_ece_after", "mean_auc_before", "mean_auc_after"):
            if figures and key in figures:
                out[f"{name}_{key}"] = figures[key]
    return out


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError) as err:
        print(f"bench/acceptance.py: error: {err}", file=sys.stderr)
        sys.exit(2)
