"""`sparkgrid worker`: what a node operator runs so that this machine's GPU joins the network.

Checks the arguments here first (model directories, the device, the Ray address), then creates
a detached, named worker actor pinned to this node, waits until it reports `ready` (weights
loaded, SPS(B) profiled) and prints what it is. With `--foreground` it stays, watches the
worker's health, and on Ctrl-C or SIGTERM drains and removes it; without, the worker keeps
serving after the command exits (`sparkgrid worker --stop NAME` drains and removes it).
`--join HOST:PORT` links the worker to a head from outside the platform's cluster instead
(`worker/link.py`, which reuses the checks, the wait and the registration here).

Knows: the operator's options and messages, and whether the cluster wants an authentication
token that this shell lacks (`check_ray_auth`, asked of the cluster before Ray joins it). Does
not know: Ray's API (worker/actor.py does the calls), how the engine works.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sparkgrid.contract import WorkerStats
from sparkgrid.options import int_at_least, number_in
from sparkgrid.registration import Registration, file_sha256, token_id_of, weights_sha256
from worker.worker_config import WorkerConfig

READY_POLL_S = 0.5
TOKEN_ENV = "SPARKGRID_OPERATOR_TOKEN"
HEALTH_POLL_S = 5.0
SIGNAL_POLL_S = 0.2  # how soon a foreground worker notices Ctrl-C / SIGTERM


class LaunchError(Exception):
    """What the operator must fix; printed as `error: ...`."""


@dataclass(frozen=True)
class LaunchOptions:
    """What `sparkgrid worker` was asked to do."""

    ray_address: str | None
    """None only with `--join` (`worker/link.py`): a local Ray started for the worker."""
    config: WorkerConfig
    foreground: bool = False
    ready_timeout_s: float = 900.0
    """How long loading and profiling may take before the launch is called failed."""
    drain_timeout_s: float = 120.0
    """On stop: how long running jobs may take to finish before the worker is killed anyway."""
    detect_gpu_type: bool = True
    """`config.gpu_type` is the device's own name; prefer Ray's accelerator type of the node."""
    operator_token: str | None = None
    """Signs the worker's registration (`sparkgrid/registration.py`); None: unregistered, which
    a scheduler requiring registrations (the default) routes nothing to."""


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", metavar="A",
                   help="the Ray cluster's GCS address (host:port), or 'auto' on a node of it "
                        "(required unless --join)")
    p.add_argument("--target", metavar="DIR",
                   help="target model directory (required unless --stop)")
    p.add_argument("--draft", metavar="DIR",
                   help="DSpark draft checkpoint directory (required unless --stop)")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda (the GPU Ray assigns this worker; default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="weights dtype (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--gpu-type", metavar="G",
                   help="what the device is, e.g. 'RTX 4090' (default: detected)")
    p.add_argument("--price-per-hour", type=number_in(0, 1e6), default=0.0, metavar="USD",
                   help="what this device costs per hour (default 0)")
    p.add_argument("--name", metavar="N",
                   help="worker name, unique in the cluster (default: host-device)")
    p.add_argument("--max-batch-tokens", type=int_at_least(1), default=512, metavar="N",
                   help="most tokens in one verify forward (default 512)")
    p.add_argument("--draft-vocab", type=int_at_least(0), default=0, metavar="N",
                   help="draft only the N tokens the target writes most often (needs the "
                        "draft's draft_vocab.json; default 0: the full vocabulary)")
    p.add_argument("--emulate-slowdown", type=number_in(1, 1000), default=1.0, metavar="F",
                   help="benchmarks only: make every engine step F times slower (default 1)")
    p.add_argument("--foreground", action="store_true",
                   help="stay; on Ctrl-C drain the worker and remove it (implied by --join)")
    p.add_argument("--ready-timeout", type=number_in(0, 86400, open_low=True), default=900.0,
                   metavar="S",
                   help="seconds loading may take (default 900)")
    p.add_argument("--operator-token", "--token", dest="operator_token", metavar="T",
                   default=os.environ.get(TOKEN_ENV),
                   help="the operator token `sparkgrid operators add` printed, which registers "
                        f"the worker (default: ${TOKEN_ENV}; prefer it: arguments are visible "
                        "to every user of this machine)")
    p.add_argument("--stop", metavar="NAME", help="drain and remove the worker NAME, then exit")


def options_from_args(args, check_model_dir, sps_cache_dir: str | None) -> LaunchOptions:
    """Check the options (model dirs, device, values); raises LaunchError / ValueError."""
    for option in ("target", "draft"):
        if getattr(args, option) is None:
            raise LaunchError(f"--{option} is required (the model directory this worker serves)")
        check_model_dir(f"--{option}", getattr(args, option))
    device_name = _check_device(args.device)
    config = WorkerConfig(
        name=args.name or default_name(args.device), target=args.target, draft=args.draft,
        gpu_type=args.gpu_type or device_name, device=args.device, dtype=args.dtype,
        price_per_hour=args.price_per_hour, max_batch_tokens=args.max_batch_tokens,
        draft_vocab_size=args.draft_vocab, emulate_slowdown=args.emulate_slowdown,
        sps_cache_dir=sps_cache_dir)
    if args.operator_token is not None:
        try:
            token_id_of(args.operator_token)
        except ValueError:
            raise LaunchError(f"--token/--operator-token: malformed (expected "
                              f"sgo_<id>_<secret>, as `sparkgrid operators add` printed it; "
                              f"from ${TOKEN_ENV} when the option is not given)") from None
    return LaunchOptions(args.ray_address, config, args.foreground, args.ready_timeout,
                         detect_gpu_type=not args.gpu_type, operator_token=args.operator_token)


def _check_device(device: str) -> str:
    """The device's name (what GPU type defaults to); raises LaunchError if it is not here."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LaunchError(f"--device {device}: expected cpu or cuda") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise LaunchError(f"--device {device}: only cpu and cuda devices are supported")
    if dev.index not in (None, 0):
        # The actor asks Ray for one GPU, and Ray shows it only that one (CUDA_VISIBLE_DEVICES),
        # which it calls cuda:0 whichever physical GPU it is.
        raise LaunchError(f"--device {device}: a worker uses the one GPU Ray assigns it, which "
                          "it sees as cuda; pass --device cuda and start one worker per GPU "
                          "(Ray gives each a different one)")
    if not torch.cuda.is_available():
        raise LaunchError(f"--device {device}: this node has no CUDA device that torch "
                          f"{torch.__version__} can use; use --device cpu or fix the driver")
    index = dev.index or 0
    if index >= torch.cuda.device_count():
        raise LaunchError(f"--device {device}: this node has {torch.cuda.device_count()} CUDA "
                          f"device(s), numbered from 0")
    return torch.cuda.get_device_name(index)


def default_name(device: str) -> str:
    """`<host>-<device>`, reduced to the characters a worker name allows."""
    raw = f"{socket.gethostname().split('.')[0]}-{device.replace(':', '')}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", raw).strip("-._")[:63] or "worker"


def launch(opts: LaunchOptions, out=sys.stdout) -> int:
    """Start the worker and wait until it is ready; with `foreground`, stay until signalled."""
    check_ray_auth(opts.ray_address)
    from worker import actor

    node = actor.connect(opts.ray_address)
    config = opts.config
    detected = actor.accelerator_type(node["resources"])
    if opts.detect_gpu_type and config.device.startswith("cuda") and detected:
        config = replace(config, gpu_type=detected)  # Ray's short name (`H200`) when it knows one
    if actor.find_worker(config.name) is not None:
        raise LaunchError(f"--name {config.name}: a worker of that name is already running; "
                          "choose another name, or stop it with `sparkgrid worker --stop "
                          f"{config.name} --ray-address {opts.ray_address}`")
    cuda = config.device.startswith("cuda")
    handle = actor.create_worker(config, node["node_id"], num_cpus=0 if cuda else 1,
                                 num_gpus=1 if cuda else 0)
    stats = wait_ready(actor, handle, config, opts.ready_timeout_s)
    _print_ready(stats, out)
    if opts.operator_token is not None:
        actor.call(handle.set_registration.remote(
            registration(config, stats, opts.operator_token).sign(opts.operator_token)), 30)
        print(f"  registered under operator token {token_id_of(opts.operator_token)}", file=out)
    else:
        print("  unregistered (no --operator-token): schedulers that require registrations "
              "route nothing to it", file=out)
    if not opts.foreground:
        print(f"worker {config.name} runs detached; stop it with `sparkgrid worker --stop "
              f"{config.name} --ray-address {opts.ray_address}`", file=out)
        return 0
    return _stay(actor, handle, config.name, opts, out)


def registration(config: WorkerConfig, stats: WorkerStats, token: str,
                 kind: str = "in-cluster") -> Registration:
    """What the operator declares of this worker: its model and the hashes of the files it
    serves (read here, on the operator's machine), its GPU type and price, and how it reaches
    the scheduler (`kind`: in-cluster, or linked by `--join`)."""
    tokenizer = Path(config.target) / "tokenizer.json"
    if not tokenizer.is_file():
        raise LaunchError(f"--target {config.target}: no tokenizer.json (the scheduler reads "
                          "fast tokenizers only)")
    return Registration(worker=config.name, token_id=token_id_of(token), model_id=stats.model_id,
                        tokenizer_sha256=file_sha256(tokenizer),
                        weights_sha256=weights_sha256(config.target, config.draft),
                        gpu_type=config.gpu_type, price_per_hour=config.price_per_hour,
                        kind=kind, issued_at=time.time())


def wait_ready(actor, handle, config: WorkerConfig, timeout_s: float) -> WorkerStats:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stats = WorkerStats.from_dict(
                actor.call(handle.stats.remote(), timeout_s=max(1.0, deadline - time.monotonic())))
        except actor.CallTimeout:
            break
        except actor.WorkerDied as err:
            raise LaunchError(f"worker {config.name} died while starting: {err}") from None
        if stats.state == "ready":
            return stats
        if stats.state == "failed":
            actor.kill(handle)
            raise LaunchError(f"worker {config.name} failed to load: {stats.error}")
        time.sleep(READY_POLL_S)
    actor.kill(handle)
    raise LaunchError(f"worker {config.name} was not ready after {timeout_s:g} s (removed); does "
                      "this node have a free CPU/GPU in Ray (`ray status`), and is --ready-timeout "
                      "long enough to load the weights?")


def _print_ready(stats: WorkerStats, out) -> None:
    print(f"worker {stats.name} ready", file=out)
    print(f"  node    {stats.node_ip} ({stats.node_id})", file=out)
    print(f"  device  {stats.device} ({stats.device_name}), gpu type {stats.gpu_type}, "
          f"${stats.price_per_hour:.2f}/h", file=out)
    print(f"  model   {stats.model_id} (target {stats.target}, draft {stats.draft}), "
          f"verify policy {stats.verify_policy}", file=out)
    sps = stats.sps
    if sps:
        points = ", ".join(f"{b}: {s:.0f}"
                           for b, s in zip(sps.batch_tokens, sps.steps_per_second))
        print(f"  profile SPS(B), target forwards/s by tokens per forward: {points}", file=out)


def _stay(actor, handle, name: str, opts: LaunchOptions, out) -> int:
    """Watch the worker until Ctrl-C / SIGTERM, then drain and remove it. The signal only
    records itself (no lock, no exception): raised as an exception it could land inside a Ray
    call, or before the handler's `try`, and skip the drain. A second signal, while
    draining, stops at once."""
    signalled: list[int] = []

    def on_signal(signum, frame):
        signalled.append(signum)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT
                      else signal.SIG_DFL)

    # SIGTERM (systemd, docker stop) stops it like Ctrl-C; SIGINT is set too, because a
    # process started in the background by a shell inherits SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    print(f"worker {name} serving in the foreground; Ctrl-C drains and removes it", file=out,
          flush=True)
    next_check = time.monotonic() + HEALTH_POLL_S
    while not signalled:
        time.sleep(SIGNAL_POLL_S)
        if signalled or time.monotonic() < next_check:
            continue
        try:
            actor.call(handle.check_health.remote(), timeout_s=30)
        except actor.WorkerDied:
            print(f"worker {name} died", file=out)
            return 1
        except Exception as err:  # unhealthy: say so, watch on (the scheduler routes around)
            print(f"worker {name} unhealthy: {err}", file=out)
        next_check = time.monotonic() + HEALTH_POLL_S
    stop_worker(actor, handle, name, opts.drain_timeout_s, out)
    return 0


def stop_worker(actor, handle, name: str, drain_timeout_s: float, out) -> None:
    """Drain the worker (running jobs finish, up to the timeout), then remove it."""
    print(f"draining worker {name} ...", file=out)
    try:
        actor.call(handle.drain.remote(drain_timeout_s), timeout_s=drain_timeout_s + 10)
    except Exception as err:  # a dead or stuck worker is removed all the same
        print(f"worker {name} did not drain cleanly ({type(err).__name__}); removing it", file=out)
    actor.kill(handle)
    print(f"worker {name} removed", file=out)


def stop_by_name(ray_address: str, name: str, out=sys.stdout) -> int:
    check_ray_auth(ray_address)
    from worker import actor

    actor.connect(ray_address)
    handle = actor.find_worker(name)
    if handle is None:
        raise LaunchError(f"--stop {name}: no worker of that name is running")
    stop_worker(actor, handle, name, LaunchOptions.drain_timeout_s, out)
    return 0


# -- the cluster's authentication token ---------------------------------------------------------
TOKEN_HELP = ("use the cluster's token: on its head node `ray get-auth-token` prints it (it is "
              "the file ~/.ray/auth_token of the user who started the cluster, e.g. with "
              "`sparkgrid up`); put it in ~/.ray/auth_token here, or in RAY_AUTH_TOKEN, or in a "
              "file that RAY_AUTH_TOKEN_PATH names")


def check_ray_auth(address: str, timeout_s: float = 5.0) -> None:
    """Before joining the Ray cluster at `address` (host:port of its GCS): make this process
    send the cluster's authentication token if the cluster wants one, or raise LaunchError
    naming the cause.

    Ray turns token authentication on for a cluster that `ray.init()` or `ray start --head`
    starts (`sparkgrid up`'s too), but a process that joins one by its address sends a token
    only with RAY_AUTH_MODE=token in its environment; without, Ray retries for 20 s, printing
    an InvalidAuthToken warning a second, and then blames node membership. So the cluster's GCS
    is asked first, once without a token and, if it wants one, once with this machine's token
    (found where Ray looks: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else
    ~/.ray/auth_token); token mode is switched on only when that token is accepted. An address
    that is not host:port, or a cluster that does not answer, is left to `actor.connect`."""
    if not re.fullmatch(r"[^/\s]+:\d+", address):  # 'auto', ray://..., or malformed
        return
    import grpc

    if _gcs_answer(address, None, timeout_s) != grpc.StatusCode.UNAUTHENTICATED:
        return  # no token needed, or nothing answers there (connect says so)
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        raise LaunchError(f"--ray-address {address}: the Ray cluster there requires an "
                          f"authentication token, but RAY_AUTH_MODE={mode} is set here; unset "
                          "it (or set RAY_AUTH_MODE=token) and give this shell the cluster's token")
    token, source = _ray_token()
    if token is None:
        raise LaunchError(f"--ray-address {address}: the Ray cluster there requires an "
                          "authentication token, and this shell has none (no RAY_AUTH_TOKEN, "
                          f"RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); {TOKEN_HELP}")
    if _gcs_answer(address, token, timeout_s) == grpc.StatusCode.UNAUTHENTICATED:
        raise LaunchError(f"--ray-address {address}: the Ray cluster there does not accept this "
                          f"shell's authentication token (from {source}): it is not the "
                          f"cluster's; {TOKEN_HELP}")
    os.environ["RAY_AUTH_MODE"] = "token"  # read by ray.init in this process


def _ray_token() -> tuple[str | None, str]:
    """This machine's Ray token and where it came from, in Ray's own order of sources."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token, "RAY_AUTH_TOKEN"
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        try:
            token = Path(path).read_text().strip()
        except OSError as err:
            raise LaunchError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the Ray token there "
                              f"({err.strerror})") from None
        if not token:
            raise LaunchError(f"RAY_AUTH_TOKEN_PATH={path}: the file is empty")
        return token, path
    default = Path.home() / ".ray" / "auth_token"
    try:
        token = default.read_text().strip()
    except OSError:
        return None, str(default)
    return token or None, str(default)


def _gcs_answer(address: str, token: str | None, timeout_s: float):
    """The gRPC status of one cheap call to the GCS at `address` (its cluster id), made with
    `token` as Ray sends it, or with none."""
    import grpc

    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")
        try:
            call(b"", timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK
