"""`sparkgrid worker --join HOST:PORT`: a worker outside the platform's Ray cluster.

Joining from outside the cluster. An operator who is not trusted with membership of the
platform's Ray cluster (a member can run code on every node of it, the head included) links
its workers to the head instead:

    sparkgrid worker --join HOST:PORT --token TOKEN [--ca FILE] --name NAME \\
        --target DIR --draft DIR [--device cuda] [--ray-address A] [...]

HOST:PORT is the head's worker link (`up.json`'s `worker_link`), TOKEN the operator token that
`sparkgrid operators add` printed (or $SPARKGRID_OPERATOR_TOKEN), FILE the CA certificate the
head's certificate is signed with (default: the system's roots; `--plaintext` turns TLS off,
for a head on a private network only). The engine runs in Ray actors on a Ray of the
operator's own: a local one started for this command, or with `--ray-address` the operator's
own cluster; with `--device cuda`, one actor per GPU of that Ray (named NAME-0, NAME-1, ...;
with one GPU just NAME). Each actor gets its own link (`worker/link_session.py`): it dials out,
so it works behind NAT with no inbound port, and it never becomes a member of the platform's
cluster. The command stays in the foreground (`--foreground` is implied); Ctrl-C or SIGTERM
drains the workers (running jobs finish, new ones are refused, so the head sends them
elsewhere), closes the links, removes the actors and stops the local Ray; a second Ctrl-C skips
the drain.

Knows: the join options, placing actors on the operator's Ray, the Ray adapter the link session
calls (`RayWorker`). Does not know: gRPC and the link's messages (the session's), Ray's API
(worker/actor.py does the calls), how the engine works.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from worker.launcher import (
    LaunchError,
    LaunchOptions,
    check_ray_auth,
    registration,
    wait_ready,
)
from worker.link_session import Head, LinkRefused, LinkSession, LinkSettings, WorkerGone
from worker.worker_config import WorkerConfig

_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")
DRAIN_CALL_SLACK_S = 10.0


@dataclass(frozen=True)
class JoinOptions:
    """What `sparkgrid worker --join` was asked to do."""

    launch: LaunchOptions
    """The worker's options; `launch.ray_address` None: a local Ray started for it."""
    head: Head
    settings: LinkSettings = LinkSettings()


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--join", metavar="HOST:PORT",
                   help="link to the head's worker link at HOST:PORT (up.json's worker_link) "
                        "instead of joining its Ray cluster; runs in the foreground (implies "
                        "--foreground); --ray-address is then optional: the operator's own Ray "
                        "cluster (default: a local Ray started for it); with --device cuda, "
                        "one worker per GPU of that Ray (NAME-0, NAME-1, ...)")
    p.add_argument("--ca", metavar="FILE",
                   help="with --join: the CA certificate (PEM) that signed the head's "
                        "(default: the system's roots)")
    p.add_argument("--plaintext", action="store_true",
                   help="with --join: no TLS (only for a head on this machine or a private "
                        "network)")


def options_from_args(args, launch: LaunchOptions) -> JoinOptions:
    """Check the link's options; raises LaunchError naming the option."""
    match = _ADDRESS.fullmatch(args.join or "")
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise LaunchError(f"--join {args.join}: expected HOST:PORT of the head's worker link "
                          "(up.json's worker_link), e.g. head.example.org:50060")
    if launch.operator_token is None:
        raise LaunchError("--token is required with --join: the operator token that `sparkgrid "
                          "operators add` printed (or set $SPARKGRID_OPERATOR_TOKEN)")
    if args.ca is not None:
        if args.plaintext:
            raise LaunchError("--ca and --plaintext: choose one (--ca is for TLS)")
        if not Path(args.ca).is_file():
            raise LaunchError(f"--ca {args.ca}: not found")
        if b"-----BEGIN CERTIFICATE-----" not in Path(args.ca).read_bytes():
            raise LaunchError(f"--ca {args.ca}: not a PEM certificate (expected "
                              "-----BEGIN CERTIFICATE-----)")
    return JoinOptions(replace(launch, foreground=True),
                       Head(args.join, launch.operator_token, args.ca, args.plaintext))


class RayWorker:
    """One worker actor as the link session calls it: each call awaited, Ray's errors turned
    into the session's (ValueError: the input was refused; WorkerGone: the actor is dead)."""

    def __init__(self, actor, handle, name: str):
        self._actor, self.handle, self.name = actor, handle, name

    async def generate(self, job_id, prompt_ids, params, resume, lease_s):
        stream = self.handle.generate.remote(job_id, prompt_ids, params, resume, lease_s)
        try:
            async for ref in stream:
                yield await ref
        except Exception as err:
            raise self._translated(err) from None

    async def cancel(self, job_id: str) -> bool:
        return await self._call(self.handle.cancel.remote(job_id))

    async def renew(self, job_ids: list[str], lease_s: float) -> list[str]:
        return await self._call(self.handle.renew.remote(job_ids, lease_s))

    async def score(self, prompt_ids, token_ids, temperature: float) -> dict:
        return await self._call(self.handle.score.remote(prompt_ids, token_ids, temperature))

    async def tokenizer_files(self) -> dict[str, bytes]:
        return await self._call(self.handle.tokenizer_files.remote())

    async def stats(self) -> dict:
        return await self._call(self.handle.stats.remote())

    async def check_health(self) -> None:
        await self._call(self.handle.check_health.remote())

    async def drain(self, timeout_s: float) -> dict:
        return await asyncio.wait_for(self._call(self.handle.drain.remote(timeout_s)),
                                      timeout_s + DRAIN_CALL_SLACK_S)

    async def _call(self, ref):
        try:
            return await ref
        except Exception as err:
            raise self._translated(err) from None

    def _translated(self, err: Exception) -> Exception:
        if isinstance(err, self._actor.WorkerDied):
            return WorkerGone(f"worker {self.name} died: {str(err).splitlines()[0]}")
        cause = getattr(err, "cause", None)  # a Ray task error: what the actor raised
        if isinstance(cause, ValueError):
            return ValueError(str(cause))  # refused input, without Ray's traceback text
        return cause if isinstance(cause, Exception) else err


@dataclass(frozen=True)
class _Place:
    config: WorkerConfig
    node_id: str
    num_gpus: int


def join(opts: JoinOptions, out=sys.stdout) -> int:
    """Start the workers on the operator's Ray, link each to the head, serve until signalled
    (0), until every link ended (1), or until the head refused one (LaunchError)."""
    from worker import actor

    def say(message: str) -> None:
        print(message, file=out, flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):  # while loading; the event loop has its own
        signal.signal(sig, _interrupt)
    launch = opts.launch
    if launch.ray_address is None:
        say("starting a local Ray for the worker ...")
        node = actor.start_local()
    else:
        check_ray_auth(launch.ray_address)
        node = actor.connect(launch.ray_address)
    workers: list[RayWorker] = []
    try:
        places = _places(actor, launch, node)
        for place in places:
            if actor.find_worker(place.config.name) is not None:
                raise LaunchError(f"--name {place.config.name}: a worker of that name already "
                                  "runs on this Ray cluster; choose another --name")
        for place in places:
            handle = actor.create_worker(place.config, place.node_id, detached=False,
                                         num_cpus=0 if place.num_gpus else 1,
                                         num_gpus=place.num_gpus)
            workers.append(RayWorker(actor, handle, place.config.name))
        sessions = []
        record = None
        for place, worker in zip(places, workers):
            stats = wait_ready(actor, worker.handle, place.config, launch.ready_timeout_s)
            say(f"worker {place.config.name} ready: {stats.model_id} on {stats.device} "
                f"({stats.gpu_type}), ${stats.price_per_hour:.2f}/h")
            record = (registration(place.config, stats, launch.operator_token, kind="linked")
                      if record is None else  # the same files: hashed once
                      replace(record, worker=place.config.name, gpu_type=place.config.gpu_type))
            sessions.append(LinkSession(worker, record, opts.head, opts.settings, say))
        return asyncio.run(_serve(sessions, workers, launch.drain_timeout_s, say))
    except KeyboardInterrupt:
        say("stopped while loading")
        return 0
    finally:
        for worker in workers:
            actor.kill(worker.handle)
        actor.disconnect()
        if workers:
            say(f"removed {len(workers)} worker(s)")


def _places(actor, launch: LaunchOptions, node: dict) -> list[_Place]:
    """Where the actors go: on cuda one per GPU of the Ray cluster, else one on this node."""
    config = launch.config
    if not config.device.startswith("cuda"):
        return [_Place(config, node["node_id"], 0)]
    slots = [(n["node_id"], actor.accelerator_type(n["resources"]))
             for n in actor.gpu_nodes() for _ in range(n["gpus"])]
    if not slots:
        where = launch.ray_address or "the local Ray"
        raise LaunchError(f"--device cuda: {where} has no GPU that Ray can assign (`ray status`)")
    places = []
    for i, (node_id, detected) in enumerate(slots):
        gpu_type = detected if launch.detect_gpu_type and detected else config.gpu_type
        name = config.name if len(slots) == 1 else f"{config.name}-{i}"
        places.append(_Place(replace(config, name=name, gpu_type=gpu_type), node_id, 1))
    return places


async def _serve(sessions: list[LinkSession], workers: list[RayWorker], drain_timeout_s: float,
                 say) -> int:
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (force if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    runs = {asyncio.create_task(session.run()): session for session in sessions}
    say(f"{len(sessions)} link(s) to {sessions[0].head.address}; Ctrl-C drains the workers "
        "and removes them")
    stopped, refused, code = asyncio.create_task(stop.wait()), None, 0
    while runs and not stop.is_set() and refused is None:
        done, _ = await asyncio.wait({*runs, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for task in done & runs.keys():
            session = runs.pop(task)
            err = None if task.cancelled() else task.exception()
            if isinstance(err, LinkRefused):
                refused = err
            elif err is not None:  # WorkerGone, or the worker failed a call the hello needs
                say(f"link {session.name} ended: {err}")
                code = 1
    if stop.is_set() and runs:
        say(f"draining {len(workers)} worker(s) (running jobs finish; Ctrl-C again skips) ...")
        drains = asyncio.gather(*(_drain(w, drain_timeout_s, say) for w in workers))
        forced = asyncio.create_task(force.wait())
        await asyncio.wait({drains, forced}, return_when=asyncio.FIRST_COMPLETED)
        drains.cancel()
        forced.cancel()
        await asyncio.gather(drains, forced, return_exceptions=True)
    for session in runs.values():
        session.stop()
    stopped.cancel()
    results = await asyncio.gather(*runs, return_exceptions=True)
    refused = refused or next((r for r in results if isinstance(r, LinkRefused)), None)
    if refused is not None:
        raise LaunchError(str(refused))
    return code


async def _drain(worker: RayWorker, timeout_s: float, say) -> None:
    try:
        await worker.drain(timeout_s)
    except Exception as err:  # a dead or stuck worker is removed all the same
        say(f"worker {worker.name} did not drain cleanly ({type(err).__name__}); removing it")


def _interrupt(signum, frame):
    raise KeyboardInterrupt
