"""The `sparkgrid` command: one console script, one subcommand per job.

`COMMANDS` names every subcommand, the module that implements it and its one-line help. The
module is imported only when its subcommand runs, so `sparkgrid head` loads the scheduler and
never the engine (nor torch), and `sparkgrid --help` loads neither. Each module has a table
`COMMANDS = {name: (add_options, run)}` in the style of `sparkgrid.options`.

A user error (a missing directory, a bad option value, an input the engine refuses) prints
`error: <what to fix>` to stderr and exits 2, never a traceback.

Knows: which module serves which subcommand. Does not know: what any of them does.
"""

from __future__ import annotations

import importlib
import sys

from sparkgrid.options import Parser, UsageError

ENGINE_PACKAGES = ("torch", "transformers", "safetensors", "numpy", "tqdm", "ninja")
"""The `worker` extra: what the engine's commands need and the scheduler's never load."""
COMMANDS = {  # name: (module, help)
    "engine": ("worker.cli", "a small generation run of the DSpark engine on this machine"),
    "worker": ("worker.cli", "join this machine's GPU to the network: a detached, named worker "
                             "actor on this node of the platform's Ray cluster, or with --join "
                             "workers on a Ray of your own, linked to the head"),
    "calibrate": ("worker.cli", "fit STS temperatures for a draft's confidence head; writes "
                                "sts.json beside it"),
    "head": ("scheduler.cli", "the scheduler on a platform's head node: the gRPC API, routing, "
                              "failover, ledger"),
    "keys": ("scheduler.cli", "create, revoke and list API keys (stored hashed in Redis)"),
    "operators": ("scheduler.operator_cli", "add, rotate, revoke and list operators, the parties "
                                            "whose workers serve (tokens stored hashed)"),
    "generate": ("scheduler.cli", "a client call: stream a completion to stdout"),
    "workers": ("scheduler.cli", "a table of the live workers and their figures"),
    "report": ("scheduler.report_cli", "cost reports from the usage ledger: by tenant, worker, "
                                       "GPU type or UTC day"),
    "up": ("sparkgrid.up_cli", "the whole stack on this machine (Redis, Ray, workers, "
                               "scheduler) until Ctrl-C"),
    "demo": ("sparkgrid.up_cli", "`up`, a few real requests streamed to the terminal, a cost "
                                 "report, a clean stop"),
}


def build_parser(command: str | None = None) -> Parser:
    """The parser; only `command`'s module is imported and only its options are declared
    (`sparkgrid X --help` needs X's options; the others' would import their modules)."""
    parser = Parser(prog="sparkgrid", description="LLM generation on a network of GPUs.")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            add_options, run = importlib.import_module(module).COMMANDS[name]
            add_options(p)
            p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser(command if command in COMMANDS else None).parse_args(argv)
        return args.run(args)
    except ModuleNotFoundError as err:
        if err.name not in ENGINE_PACKAGES:
            raise
        print(f"error: `sparkgrid {command}` runs the engine, which needs the `worker` extra "
              f"(missing: {err.name}); install it with: pip install 'sparkgrid[worker]'",
              file=sys.stderr)
        return 2
    except (UsageError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
