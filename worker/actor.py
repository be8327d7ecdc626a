"""The worker as a Ray actor: a thin async shell over `EngineLoop`, its Ray dashboard metrics,
and the few Ray calls the launcher makes. The only module of `worker/` that imports ray.

The actor is asynchronous: its methods run on an event loop while the engine steps on the
loop's own thread, so `stats()`, `cancel()` and health checks answer during a long step.
`generate` is a Ray streaming generator: the caller reads `Chunk`s as the engine makes them;
cancelling the generator (`ray.cancel`) cancels the job. Ray does not stop a generator whose
caller died (its items are dropped and it runs on), so a caller may hold a job on a lease
(`lease_s`, renewed with `renew`): a job whose lease lapses is aborted, and a scheduler that
crashes leaves no job running for nobody.

Figures are pushed: a thread of the actor (`sparkgrid.board.Pusher`) pushes the `stats()` dict
and the health (`check_health`) to the worker's figures board when they change (at most every
push interval of the board's layout) and a heartbeat while they do not, so that no scheduler
has to call every worker; `stats()` and `check_health()` still answer callers directly.

Knows: Ray (actors, names, node affinity, metrics). Does not know: how the engine works, how
jobs are routed.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import platform
import socket
import time
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.metrics import Counter, Gauge, Histogram
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sparkgrid.board import Pusher
from sparkgrid.contract import NAMESPACE, Resume, SamplingParams, WorkerStats
from worker.serving import EngineLoop, StepReport, build_engine
from worker.worker_config import WorkerConfig

__all__ = ["NAMESPACE", "WorkerActor", "connect", "create_worker", "find_worker"]
WorkerDied = RayActorError
"""What a caller gets from a worker that died or was killed (catch this, then fail over)."""
CallTimeout = GetTimeoutError
TAG_KEYS = ("worker", "gpu_type")
LEASE_CHECK_S = 0.5
"""How often the worker looks for jobs whose lease lapsed."""


class _Metrics:
    """The worker's custom metrics, exported on the node's Ray metrics endpoint (names get
    Ray's `ray_` prefix there), each tagged with the worker's name and GPU type."""

    def __init__(self, config: WorkerConfig):
        self.tags = {"worker": config.name, "gpu_type": config.gpu_type}
        self.tokens = Counter("sparkgrid_generated_tokens", "Tokens generated", TAG_KEYS)
        self.requests = Counter("sparkgrid_requests", "Finished requests, by finish reason",
                                TAG_KEYS + ("finish_reason",))
        self.queue_depth = Gauge("sparkgrid_queue_depth", "Requests waiting or running", TAG_KEYS)
        self.tokens_per_s = Gauge("sparkgrid_tokens_per_second",
                                  "Generated tokens per second over the recent window", TAG_KEYS)
        self.accept_length = Histogram(
            "sparkgrid_accepted_length",
            "Mean accepted length (bonus included) per finished request",
            [1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 9], TAG_KEYS)
        self.verify_tokens = Histogram(
            "sparkgrid_verify_tokens_per_step", "Tokens in one verify forward of the target",
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048], TAG_KEYS)
        self.step_seconds = Histogram(
            "sparkgrid_step_seconds", "Wall time of one engine step",
            [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5], TAG_KEYS)

    def record_step(self, report: StepReport) -> None:
        self.step_seconds.observe(report.seconds, self.tags)
        if report.new_tokens:
            self.tokens.inc(report.new_tokens, self.tags)
        if report.verify_tokens:
            self.verify_tokens.observe(report.verify_tokens, self.tags)
        for reason, accept_length in report.finished:
            self.requests.inc(1, {**self.tags, "finish_reason": reason})
            if accept_length is not None:
                self.accept_length.observe(accept_length, self.tags)

    def record_figures(self, figures: dict) -> None:
        self.queue_depth.set(figures["num_waiting"] + figures["num_running"], self.tags)
        self.tokens_per_s.set(figures["tokens_per_s"], self.tags)


@ray.remote
class WorkerActor:
    """One engine on one device. Create it with `create_worker`."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self._metrics = _Metrics(config)
        self._identity = _identity(config)
        self._loop = EngineLoop(config, lambda: build_engine(config),
                                on_step=self._metrics.record_step,
                                on_publish=self._published)
        self._pusher = Pusher(config.name, self._stats, self._health)
        self._loop.start()
        self._pusher.start()
        self._leases: dict[str, float] = {}  # job id -> monotonic time its lease lapses
        self._reaper: asyncio.Task | None = None

    @ray.method(num_returns="streaming")
    async def generate(self, job_id: str, prompt: str | list[int], params: dict | None = None,
                       resume: dict | None = None, lease_s: float | None = None):
        """Stream a job's `Chunk`s (as their contract dicts); the last has the finish reason
        and usage. `params` is a `SamplingParams` dict, `resume` a `Resume` dict (continue a
        job another worker began); with `lease_s` the job is aborted unless `renew` extends its
        lease in time. Bad input raises ValueError naming the field; a draining worker raises
        WorkerDraining."""
        sampling = SamplingParams.from_dict(params or {}, "params")
        resume = Resume.from_dict(resume or {}, "resume")
        if lease_s is not None:
            _check_lease(lease_s)
        chunks: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        accepted = self._loop.submit(job_id, prompt, sampling,
                                     lambda item: loop.call_soon_threadsafe(chunks.put_nowait,
                                                                            item),
                                     resume)
        await asyncio.wrap_future(accepted)
        if lease_s is not None:
            self._leases[job_id] = time.monotonic() + lease_s
            if self._reaper is None:
                self._reaper = asyncio.create_task(self._reap_lapsed())
        done = False
        try:
            while not done:
                item = await chunks.get()
                if isinstance(item, BaseException):
                    raise item
                done = item.finish_reason is not None
                yield item.to_dict()
        finally:
            self._leases.pop(job_id, None)
            if not done:  # the caller cancelled or went away: free the slot
                self._loop.cancel(job_id)

    async def renew(self, job_ids: list[str], lease_s: float) -> list[str]:
        """Extend the leases of `job_ids` to `lease_s` from now; returns those this worker
        holds no lease for (finished, aborted, or never seen)."""
        _check_lease(lease_s)
        deadline, unknown = time.monotonic() + lease_s, []
        for job_id in job_ids:
            if job_id in self._leases:
                self._leases[job_id] = deadline
            else:
                unknown.append(job_id)
        return unknown

    async def _reap_lapsed(self) -> None:
        while True:
            await asyncio.sleep(LEASE_CHECK_S)
            now = time.monotonic()
            for job_id, deadline in list(self._leases.items()):
                if deadline < now:  # its caller is gone: no one reads this job any more
                    del self._leases[job_id]
                    self._loop.cancel(job_id)

    async def cancel(self, job_id: str) -> bool:
        """Abort a job; True if it was in the engine. Its stream ends with reason `abort`."""
        return await asyncio.wrap_future(self._loop.cancel(job_id))

    async def score(self, prompt_ids: list[int], token_ids: list[int],
                    temperature: float) -> dict:
        """Audit another worker's output of a job: the target's scores of its delivered tokens
        (see `worker/engine/audit_score.py`); ValueError naming a bad field."""
        return await asyncio.wrap_future(self._loop.score(prompt_ids, token_ids, temperature))

    async def tokenizer_files(self) -> dict[str, bytes]:
        """The target's tokenizer files (name -> bytes): the scheduler counts and resumes
        tokens exactly as this worker does, without the weights."""
        return _tokenizer_files(self.config.target)

    async def set_registration(self, signed: dict) -> None:
        """Keep the registration the launcher signed with its operator's token (the token
        itself never reaches the actor); the scheduler reads it before it adopts this worker."""
        self._registration = dict(signed)

    async def registration(self) -> dict | None:
        """The signed registration (`sparkgrid/registration.py`), or None before the launcher
        set it."""
        return getattr(self, "_registration", None)

    async def stats(self) -> dict:
        """Identity, state, queue depth, throughput, accepted length, SPS(B), cache use: a
        `WorkerStats` dict."""
        return self._stats()

    async def costs(self) -> str | None:
        """The cost tables the engine plans with (`EngineCosts` as JSON), or None before it
        loaded: why this worker drafts where it does, and what another engine given them
        (`LLMEngine.costs`) chooses alike with (a seed's text then repeats there)."""
        engine = self._loop.engine
        return None if engine is None else engine.costs.to_json()

    def _stats(self) -> dict:
        return WorkerStats(**self._identity, **self._loop.figures()).to_dict()

    def _health(self) -> str | None:
        try:
            self._loop.check_health()
        except Exception as err:  # WorkerFailed: what the scheduler is told
            return str(err)
        return None

    def _published(self, figures: dict) -> None:
        """New figures on the engine's thread: the metrics, and a nudge to the pusher."""
        self._metrics.record_figures(figures)
        self._pusher.poke()

    async def drain(self, timeout_s: float | None = None) -> dict:
        """Accept no new jobs and return once running ones have finished (or `timeout_s`)."""
        return await asyncio.wait_for(asyncio.wrap_future(self._loop.drain()), timeout_s)

    async def check_health(self) -> None:
        """Raises WorkerFailed when the engine loop died, failed to load, or is stuck."""
        self._loop.check_health()

    async def shutdown(self) -> None:
        """Stop the engine loop (open jobs end with an error); the actor stays until killed."""
        await asyncio.to_thread(self._loop.stop)


def _identity(config: WorkerConfig) -> dict:
    import torch

    cuda = config.device.startswith("cuda")
    return {
        "name": config.name,
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "device": config.device,
        "device_name": (torch.cuda.get_device_name(config.device) if cuda
                        else (platform.processor() or "cpu")),
        "gpu_type": config.gpu_type,
        "price_per_hour": config.price_per_hour,
        "model_id": model_id(config.target),
        "target": config.target,
        "draft": config.draft,
        "verify_policy": config.policy,
        "max_batch_tokens": config.max_batch_tokens,
        "max_num_seqs": config.max_num_seqs,
        "max_context": _max_context(config.target),
        "emulate_slowdown": config.emulate_slowdown,
        "version": {"sparkgrid": _version("sparkgrid"), "torch": torch.__version__,
                    "ray": ray.__version__},
        "started_at": time.time(),
    }


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model")


def _tokenizer_files(target: str) -> dict[str, bytes]:
    return {name: (Path(target) / name).read_bytes() for name in TOKENIZER_FILES
            if (Path(target) / name).is_file()}


def _max_context(target: str) -> int | None:
    config = json.loads((Path(target) / "config.json").read_text())
    return config.get("max_position_embeddings")


def model_id(target: str) -> str:
    """A model's id from its directory: the last two path parts (`org/name`, as on a hub)."""
    parts = Path(target).resolve().parts
    return "/".join(parts[-2:])


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- what the launcher calls ------------------------------------------------------------------
def connect(address: str, timeout_s: float = 5.0) -> dict:
    """Join the Ray cluster at `address` (`host:port` of its GCS, or `auto`) as a driver on this
    node; returns this node's id, ip and resources. Raises ConnectionError saying what to fix."""
    if ray.is_initialized():  # this process already joined a cluster (tests, `sparkgrid up`)
        current = ray.get_runtime_context().gcs_address
        if address not in ("auto", current):
            raise ConnectionError(f"--ray-address {address}: this process is already connected to "
                                  f"the Ray cluster at {current}")
        return _this_node()
    if address != "auto":
        _check_reachable(address, timeout_s)
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConnectionError(f"--ray-address {address}: cannot join the Ray cluster ({err}); is "
                              "this machine a node of it (`ray start --address=...`)?") from None
    return _this_node()


def start_local() -> dict:
    """Start a private Ray for this process (`sparkgrid worker --join`), never joining a running
    cluster whatever RAY_ADDRESS says, listening on the loopback only (nothing else needs to
    reach it); returns this node as `connect` does."""
    try:
        ray.init(address="local", namespace=NAMESPACE, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False, _node_ip_address="127.0.0.1")
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConnectionError(f"cannot start a local Ray for the worker ({err})") from None
    return _this_node()


def gpu_nodes() -> list[dict]:
    """The cluster's live nodes that have GPUs: id, ip, resources and `gpus` (how many)."""
    return [{"node_id": n["NodeID"], "node_ip": n["NodeManagerAddress"],
             "resources": n["Resources"], "gpus": int(n["Resources"].get("GPU", 0))}
            for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) >= 1]


def _this_node() -> dict:
    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    return {"node_id": node_id, "node_ip": node["NodeManagerAddress"],
            "resources": node["Resources"]}


def _check_reachable(address: str, timeout_s: float) -> None:
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ConnectionError(f"--ray-address {address}: expected host:port of the Ray head "
                              "(e.g. 10.0.0.5:6379) or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(f"--ray-address {address}: nothing answers there ({err}); start the "
                              "head with `ray start --head` or give its address") from None


def disconnect() -> None:
    ray.shutdown()


def accelerator_type(resources: dict) -> str | None:
    """Ray's accelerator type of a node (`H200`, `A100`, ...) from its resources, if any."""
    for key in resources:
        if key.startswith("accelerator_type:"):
            return key.split(":", 1)[1]
    return None


def find_worker(name: str):
    """The live worker actor named `name`, or None."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def create_worker(config: WorkerConfig, node_id: str, num_cpus: float, num_gpus: float,
                  detached: bool = True):
    """A named worker actor pinned (not softly) to the node `node_id`; detached, or (a linked
    worker's) ending with this process. Raises ValueError when the name is taken."""
    try:
        return WorkerActor.options(
            name=config.name, namespace=NAMESPACE, lifetime="detached" if detached else None,
            max_restarts=0,
            num_cpus=num_cpus, num_gpus=num_gpus,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        ).remote(config)
    except ValueError as err:  # ActorAlreadyExistsError is a ValueError
        raise ValueError(f"--name {config.name}: a worker of that name already exists in the "
                         f"cluster; choose another name or stop that one ({err})") from None


def call(ref, timeout_s: float | None = None):
    """The result of one actor call (ray.get), raising WorkerDied / CallTimeout / the error."""
    return ray.get(ref, timeout=timeout_s)


def kill(handle) -> None:
    ray.kill(handle, no_restart=True)


def _check_lease(lease_s) -> None:
    if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or not 0 < lease_s < 3600:
        raise ValueError(f"lease_s: expected seconds in (0, 3600), got {lease_s!r}")
