"""The worker's subcommands of `sparkgrid`: `engine`, `worker` and `calibrate`.

`engine` is a small generation run of the DSpark engine on this machine, streaming every
request's text; `worker` joins a node operator's GPU to the Ray cluster (`worker/launcher.py`),
or with `--join` links it to a head from outside the cluster (`worker/link.py`);
`calibrate` fits STS temperatures for a draft from its own verification logs. `COMMANDS` holds
their (add options, run) pairs for `sparkgrid.cli`. A user error raises UsageError or
ValueError naming the option.

Knows: options, output formats, `$SPARKGRID_HOME`. Does not know: the engine's internals.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sparkgrid.home import home as sparkgrid_home
from sparkgrid.home import shown as _shown
from sparkgrid.options import UsageError, int_at_least, number_in
from worker import launcher, link
from worker.models import shipped_pair

BUILTIN_PROMPTS = (  # no trailing newline: the tokenizer merges a newline with the next line's
    # indentation, so a prompt ending in a bare newline tells the model "no indent follows"
    "def fibonacci(n):",
    "class Stack:\n    def __init__(self):",
    "import json\n\ndef load_config(path):",
    "for i in range(10):",
)
DTYPES = ("float32", "bfloat16", "float16", "float64")
POLICIES = ("ar", "fixed", "threshold", "prefix")
LINE_WIDTH = 76  # streamed text is wrapped at this many characters per line


def _add_model_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    demo = "" if required else (" (default: the shipped pair when installed, else the tiny demo "
                                "pair, built once in $SPARKGRID_HOME)")
    p.add_argument("--target", metavar="DIR", required=required,
                   help="target model directory (Qwen3 or Llama, with its tokenizer)" + demo)
    p.add_argument("--draft", metavar="DIR", required=required,
                   help="DSpark draft checkpoint directory")
    p.add_argument("--device", default="cpu",
                   help="torch device: cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="weights dtype (default float32 on cpu, bfloat16 on cuda)")


def _add_run_options(p: argparse.ArgumentParser, *, max_tokens: int, temperature: float,
                     prompts_required: bool) -> None:
    p.add_argument("--max-tokens", type=int_at_least(1), default=max_tokens, metavar="N",
                   help=f"most tokens to generate per request (default {max_tokens})")
    p.add_argument("--temperature", type=number_in(0, 100), default=temperature, metavar="T",
                   help=f"sampling temperature, 0 for greedy (default {temperature})")
    p.add_argument("--seed", type=int_at_least(0), default=0, metavar="S",
                   help="request i samples with seed S + i (default 0)")
    p.add_argument("--prompts-file", metavar="JSONL", required=prompts_required,
                   help="prompts, one a line: a JSON string or an object with a \"prompt\" string")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")


def _engine_args(p: argparse.ArgumentParser) -> None:
    _add_model_options(p, required=False)
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt (repeatable; default: a few built-in code prompts)")
    p.add_argument("--num-prompts", type=int_at_least(1), metavar="N",
                   help="requests to serve together; the prompts repeat in turn when N is larger")
    p.add_argument("--verify-policy", "--policy", dest="policy", choices=POLICIES,
                   help="how many draft tokens to verify: ar (no drafting), fixed (all), "
                        "threshold (confidence), prefix (DSpark Alg. 1; the default with a "
                        "draft). `--policy` is its old name")
    p.add_argument("--draft-vocab", type=int_at_least(0), default=0, metavar="N",
                   help="draft only the N tokens the target writes most often (needs the "
                        "draft's draft_vocab.json; default 0: the full vocabulary)")
    _add_run_options(p, max_tokens=48, temperature=0.8, prompts_required=False)


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    _add_model_options(p, required=True)
    _add_run_options(p, max_tokens=64, temperature=1.0, prompts_required=True)
    p.add_argument("--holdout-fraction", type=number_in(0, 1, open_low=True, open_high=True),
                   default=0.5, metavar="F", help="share of drafted blocks held out (default 0.5)")


# -- models and prompts ------------------------------------------------------------------------
def _model_dirs(args) -> tuple[str, str | None]:
    if args.target is None:
        if args.draft is not None:
            raise UsageError("--draft needs --target (give both, or neither for the tiny "
                             "demo pair)")
        target, draft = shipped_pair() or _tiny_pair(sparkgrid_home())
        return str(target), str(draft)
    check_model_dir("--target", args.target)
    if args.draft is not None:
        check_model_dir("--draft", args.draft)
    return args.target, args.draft


def check_model_dir(option: str, path: str) -> None:
    if not Path(path).is_dir():
        raise UsageError(f"{option}: no such directory: {path}")
    if not (Path(path) / "config.json").is_file():
        raise UsageError(f"{option}: {path} has no config.json; expected a model directory")


def _tiny_pair(home: Path) -> tuple[Path, Path]:
    """The random tiny target + draft of `worker.tiny`, built once under `home/tiny-pair`."""
    pair = home / "tiny-pair"
    if not pair.is_dir():
        from worker.tiny import build_demo_pair

        print(f"building the tiny demo pair in {_shown(pair)} (once) ...", file=sys.stderr)
        home.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="tiny-pair.", dir=home))
        try:
            build_demo_pair(scratch)
            scratch.rename(pair)  # atomic: a half-built pair is never reused
        except OSError:
            if not pair.is_dir():  # else another run finished its pair first: use that
                raise
        finally:
            if scratch.exists():
                shutil.rmtree(scratch)
    return pair / "target", pair / "draft"


def _prompts(args, default: tuple[str, ...]) -> list[str]:
    prompts = list(getattr(args, "prompt", []))
    if args.prompts_file:
        prompts += _read_prompts_file(args.prompts_file)
    prompts = prompts or list(default)
    num = getattr(args, "num_prompts", None) or len(prompts)
    return [prompts[i % len(prompts)] for i in range(num)]


def _read_prompts_file(path: str) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--prompts-file: cannot read {path}: {err}") from None
    prompts = []
    for num, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            item = None
        if isinstance(item, dict):
            item = item.get("prompt")
        if not isinstance(item, str):
            raise UsageError(f"--prompts-file: {path} line {num}: expected a JSON string or an "
                             "object with a \"prompt\" string")
        prompts.append(item)
    if not prompts:
        raise UsageError(f"--prompts-file: {path} holds no prompts")
    return prompts


def _load_engine(args, target: str, draft: str | None, **config):
    import torch

    from worker.engine.config import EngineConfig
    from worker.engine.engine import LLMEngine

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this torch ({torch.__version__}) sees no "
                         "CUDA device; use --device cpu")
    cfg = EngineConfig(device=args.device, dtype=args.dtype,
                       sps_cache_dir=str(sparkgrid_home() / "sps"), **config)
    try:
        return LLMEngine.from_pretrained(target, draft, cfg)
    except (ValueError, OSError) as err:
        raise UsageError(f"cannot load the models (--target {target}, --draft {draft}): {err}") \
            from None


# -- sparkgrid engine --------------------------------------------------------------------------
def _printable(text: str) -> str:
    """Text safe for a terminal: control characters escaped, tabs as spaces, newlines kept."""
    return "".join(ch if ch.isprintable() or ch == "\n" else "    " if ch == "\t"
                   else repr(ch)[1:-1] for ch in text)


class _StreamPrinter:
    """Prints each request's text as it arrives, a line (at most LINE_WIDTH) at a time,
    prefixed with the request number, so that concurrent requests stay readable."""

    def __init__(self, num_requests: int):
        self._partial = [""] * num_requests

    def add(self, i: int, text: str) -> None:
        *lines, rest = (self._partial[i] + _printable(text)).split("\n")
        for line in lines:
            self._emit(i, line, keep=False)
        self._partial[i] = self._emit(i, rest, keep=True)

    def finish(self, i: int, line: str) -> None:
        if self._partial[i]:
            self._emit(i, self._partial[i], keep=False)
            self._partial[i] = ""
        print(f"[{i + 1}] {line}", flush=True)

    @staticmethod
    def _emit(i: int, line: str, keep: bool) -> str:
        """Print `line` in pieces of LINE_WIDTH; with `keep`, hold back an unfilled last piece."""
        pieces = [line[k:k + LINE_WIDTH] for k in range(0, len(line), LINE_WIDTH)] or [""]
        rest = pieces.pop() if keep and len(pieces[-1]) < LINE_WIDTH else ""
        for piece in pieces:
            print(f"[{i + 1}] | {piece}", flush=True)
        return rest


def _serve(engine, prompts: list[str], args, policy: str, printer: _StreamPrinter | None):
    """Serve all prompts together; returns one result dict per prompt and the seconds taken."""
    from worker.engine.config import SamplingParams

    req_ids = [engine.add_request(p, SamplingParams(temperature=args.temperature,
                                                    max_tokens=args.max_tokens,
                                                    seed=args.seed + i), policy=policy)
               for i, p in enumerate(prompts)]
    index = {req_id: i for i, req_id in enumerate(req_ids)}
    results = [{"index": i + 1, "prompt": p, "text": ""} for i, p in enumerate(prompts)]
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            i = index[out.req_id]
            results[i]["text"] += out.text
            if printer:
                printer.add(i, out.text)
            if out.finished:
                results[i].update(_request_figures(out))
                if printer:
                    printer.finish(i, _done_line(results[i]))
    return results, time.perf_counter() - start


def _request_figures(out) -> dict:
    stats = out.stats
    return {"finish_reason": out.finish_reason, "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "mean_accept_length": stats.mean_accept_length if stats.accept_lengths else None,
            "draft_tokens_verified": stats.tokens_verified,
            "draft_tokens_accepted": stats.tokens_accepted}


def _done_line(r: dict) -> str:
    mal = r["mean_accept_length"]
    accepted = f"{mal:.2f}" if mal is not None else "n/a (no drafting)"
    return (f"done: {r['finish_reason']}; {r['prompt_tokens']} prompt + "
            f"{r['completion_tokens']} completion tokens; mean accepted length {accepted}")


def _totals(engine, results: list[dict], seconds: float) -> dict:
    c = engine.counters
    completion = sum(r["completion_tokens"] for r in results)
    return {"requests": len(results), "prompt_tokens": sum(r["prompt_tokens"] for r in results),
            "completion_tokens": completion, "seconds": seconds,
            "tokens_per_second": completion / seconds if seconds > 0 else None,
            "steps": c.steps, "target_forwards": c.prefill_forwards + c.verify_forwards,
            "prefill_forwards": c.prefill_forwards, "verify_forwards": c.verify_forwards,
            "draft_forwards": c.draft_forwards, "draft_tokens_verified": c.draft_tokens_verified,
            "draft_tokens_accepted": c.draft_tokens_accepted}


def _run_engine(args) -> int:
    target, draft = _model_dirs(args)
    prompts = _prompts(args, BUILTIN_PROMPTS)
    policy = args.policy or ("prefix" if draft else "ar")
    engine = _load_engine(args, target, draft, policy=policy, profile_sps=policy == "prefix",
                          draft_vocab_size=args.draft_vocab if draft else 0)
    setup = {"target": target, "draft": draft, "policy": policy, "gamma": engine.gamma,
             "device": args.device, "dtype": str(engine.dtype).removeprefix("torch."),
             "max_tokens": args.max_tokens, "temperature": args.temperature}
    if not args.json:
        _print_setup(setup, prompts, demo=args.target is None and shipped_pair() is None)
    printer = None if args.json else _StreamPrinter(len(prompts))
    results, seconds = _serve(engine, prompts, args, policy, printer)
    totals = _totals(engine, results, seconds)
    if args.json:
        print(json.dumps({**setup, "requests": results, "totals": totals}, indent=2))
    else:
        _print_totals(totals)
    return 0


def _print_setup(setup: dict, prompts: list[str], demo: bool) -> None:
    draft = _shown(setup["draft"]) if setup["draft"] else "none"
    note = " (tiny demo pair: random weights, the text is gibberish)" if demo else ""
    print(f"target {_shown(setup['target'])}, draft {draft}{note}")
    print(f"policy {setup['policy']}, gamma {setup['gamma']}, {setup['device']} "
          f"{setup['dtype']}, {len(prompts)} requests of up to {setup['max_tokens']} tokens, "
          f"temperature {setup['temperature']}")
    for i, p in enumerate(prompts):
        print(f"[{i + 1}] prompt {p!r}")


def _print_totals(t: dict) -> None:
    print(f"total: {t['requests']} requests, {t['completion_tokens']} tokens in "
          f"{t['seconds']:.2f} s ({t['tokens_per_second']:.1f} tokens/s), {t['steps']} steps")
    print(f"forwards: target {t['target_forwards']} ({t['prefill_forwards']} prefill + "
          f"{t['verify_forwards']} verify), draft {t['draft_forwards']}; draft tokens "
          f"verified {t['draft_tokens_verified']}, accepted {t['draft_tokens_accepted']}")


# -- sparkgrid worker --------------------------------------------------------------------------
def _worker_args(p: argparse.ArgumentParser) -> None:
    launcher.add_options(p)
    link.add_options(p)


def _run_worker(args) -> int:
    try:
        if args.ray_address is None and not (args.join and not args.stop):
            raise UsageError("--ray-address is required (the Ray cluster's GCS address), unless "
                             "--join HOST:PORT links the worker to a head from outside it")
        if args.stop:
            return launcher.stop_by_name(args.ray_address, args.stop)
        opts = launcher.options_from_args(args, check_model_dir, str(sparkgrid_home() / "sps"))
        if args.join:
            return link.join(link.options_from_args(args, opts))
        return launcher.launch(opts)
    except (launcher.LaunchError, ConnectionError) as err:
        raise UsageError(str(err)) from None


# -- sparkgrid calibrate -----------------------------------------------------------------------
def _run_calibrate(args) -> int:
    from worker.engine.calibration import calibrate_sts
    from worker.engine.config import SamplingParams

    target, draft = _model_dirs(args)
    prompts = _prompts(args, ())
    engine = _load_engine(args, target, draft, policy="fixed", profile_sps=False,
                          record_confidence=True)
    params = [SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                             seed=args.seed + i) for i in range(len(prompts))]
    result = calibrate_sts(engine, prompts, params, draft_dir=draft,
                           holdout_fraction=args.holdout_fraction, seed=args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['num_blocks']} drafted blocks: fit on {result['num_fit']}, held out "
          f"{result['num_heldout']}, {result['num_capped_blocks_dropped']} cut short by a cap "
          f"dropped; wrote {_shown(Path(draft) / 'sts.json')}")
    print("held-out prefix survival a_k:")
    print("   k  temperature  survival  ECE before  ECE after  AUC before  AUC after")
    cols = ("survival_rate", "ece_before", "ece_after", "auc_before", "auc_after")
    for k, temp in enumerate(result["temperatures"]):
        cells = "".join(f"{_fmt(result[c][k]):>{w}}"
                        for c, w in zip(cols, (10, 12, 11, 12, 11)))
        print(f"{k + 1:>4}  {temp:>11.3f}{cells}")
    return 0


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


COMMANDS = {  # name: (add options, run); the help is sparkgrid.cli's
    "engine": (_engine_args, _run_engine),
    "worker": (_worker_args, _run_worker),
    "calibrate": (_calibrate_args, _run_calibrate),
}
