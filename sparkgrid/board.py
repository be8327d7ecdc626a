"""The figures board: a small async Ray actor that workers push their figures to and schedulers
read the changed ones from, so that no scheduler calls every worker to learn how it is doing.

- A worker pushes its `stats()` dict (with its health: None, or why `check_health` fails) when
  its figures change, at most every `push_interval_s`; while they do not change it pushes a
  heartbeat (the same call without figures) every `heartbeat_s`. `Pusher` does this on a
  thread of the worker's process.
- A scheduler calls `since(epoch, version)` once per read interval and gets only the entries
  pushed after `version` (the board keeps them in push order, so this is O(changed), not
  O(workers)): one call per board per interval, whatever the number of workers.
- Several boards (shards) can share the load: shard i of n is the actor `board_name(i)` in the
  Ray namespace `sparkgrid-figures` (`BOARD_NAMESPACE`); a worker pushes to shard
  `shard_of(name, n)`. The scheduler that first creates the boards sets the layout (shards,
  intervals, staleness bound); every board answers it with `layout()`; workers follow it.
- Staleness bound: figures a scheduler routes on are at most `push_interval_s` (the worker's
  spacing) + the scheduler's read interval + the call times old. A worker whose pushes (figures
  or heartbeats) have not reached the board for `stale_after_s` counts as unhealthy there: it
  gets no new jobs until it pushes again. Entries unheard of for `FORGET_AFTER_S` are dropped.

Trust: in-cluster workers are platform GPUs, trusted members of the platform's Ray cluster (any
member of a Ray cluster can run code on every other one, and so could also push under another
worker's name). The board stores what it is sent as sent and interprets nothing; each scheduler
reads every entry through the typed contract (`WorkerStats.from_dict`), as it reads a worker's
own answers. Boards live outside the workers' namespace (`sparkgrid`), whose every named actor
a scheduler's discovery would try as a worker, and are named outside the pattern of worker
names besides (`is_board`).

Knows: Ray (actors, names), push order. Does not know: the contract's fields, routing, the
scheduler, the engine.
"""

from __future__ import annotations

import secrets
import threading
import time
import zlib
from collections import OrderedDict

import ray
from ray.exceptions import GetTimeoutError, RayError

BOARD_NAMESPACE = "sparkgrid-figures"
BOARD_PREFIX = "_figures-board."
"""Worker names start with a letter or digit, so no worker is ever named like a board."""
FORGET_AFTER_S = 300.0
"""An entry not pushed to for this long is dropped (its worker is gone or pushes elsewhere)."""
CALL_TIMEOUT_S = 5.0
FIND_RETRY_S = 2.0
"""How often a worker without a board looks for one (boards are made by the first scheduler)."""


def board_name(shard: int) -> str:
    return f"{BOARD_PREFIX}{shard}"


def is_board(actor_name: str) -> bool:
    return actor_name.startswith(BOARD_PREFIX)


def shard_of(worker: str, shards: int) -> int:
    return zlib.crc32(worker.encode()) % shards


def layout(shards: int, push_interval_s: float, stale_after_s: float) -> dict:
    """A board layout, checked (ValueError naming the field). Heartbeats go every quarter of
    the staleness bound, at most every 2 s (so the scheduler's online-time count, which
    bridges gaps of up to 5 s, sees every idle worker continuously)."""
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= 64:
        raise ValueError(f"shards: expected an integer in [1, 64], got {shards!r}")
    for name, value in (("push_interval_s", push_interval_s), ("stale_after_s", stale_after_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    if stale_after_s < 2 * push_interval_s:
        raise ValueError(f"stale_after_s: expected at least twice push_interval_s "
                         f"({push_interval_s:g}), got {stale_after_s:g}")
    return {"shards": shards, "push_interval_s": float(push_interval_s),
            "heartbeat_s": min(2.0, stale_after_s / 4), "stale_after_s": float(stale_after_s)}


@ray.remote(num_cpus=0, max_restarts=-1)
class FiguresBoard:
    """One shard. Entries: worker -> [pushed version, figures version, figures, health, time]."""

    def __init__(self, shard: int, board_layout: dict):
        self._layout = {**board_layout, "shard": shard, "epoch": secrets.token_hex(8)}
        self._version = 0
        self._entries: OrderedDict[str, list] = OrderedDict()  # in push order, oldest first

    async def layout(self) -> dict:
        return self._layout

    async def push(self, worker: str, figures: dict | None, health: str | None = None) -> bool:
        """Record `worker`'s figures (None: a heartbeat, the figures last pushed still hold).
        False: this board holds no figures of `worker` (it restarted): push them whole."""
        entry = self._entries.get(worker)
        if figures is None and entry is None:
            return False
        self._version += 1
        now = time.monotonic()
        if entry is None:
            entry = self._entries[worker] = [0, 0, None, None, now]
        else:
            self._entries.move_to_end(worker)
        entry[0], entry[3], entry[4] = self._version, health, now
        if figures is not None:
            entry[1], entry[2] = self._version, figures
        self._forget(now)
        return True

    async def since(self, epoch: str | None, version: int) -> dict:
        """The entries pushed after `version` of board `epoch` (all of them when the epoch is
        another: the board restarted), newest first, each [worker, figures (None: unchanged
        since `version`), health, seconds since the push]."""
        if epoch != self._layout["epoch"]:
            version = 0
        now, out = time.monotonic(), []
        for worker in reversed(self._entries):
            pushed, changed, figures, health, at = self._entries[worker]
            if pushed <= version:
                break
            out.append([worker, figures if changed > version else None, health, now - at])
        return {"epoch": self._layout["epoch"], "version": self._version, "entries": out}

    async def size(self) -> int:
        return len(self._entries)

    def _forget(self, now: float) -> None:
        while self._entries:
            worker, entry = next(iter(self._entries.items()))
            if now - entry[4] < FORGET_AFTER_S:
                return
            del self._entries[worker]


def open_boards(board_layout: dict) -> list:
    """The boards of `board_layout`, made (detached, in BOARD_NAMESPACE) where none
    runs yet; where they already run, they keep the layout they were made with, and the one
    they answer is what counts (`layout()`). Needs `ray.init` done. Blocking."""
    handles = []
    for shard in range(board_layout["shards"]):
        handles.append(FiguresBoard.options(
            name=board_name(shard), namespace=BOARD_NAMESPACE, lifetime="detached",
            get_if_exists=True).remote(shard, board_layout))
    return handles


class Pusher:
    """Pushes one worker's figures to its board from a daemon thread: `stats()` returns the
    figures (a dict), `health()` None or why the worker is unhealthy; `poke()` says they may
    have changed (they are compared, leaving out `volatile` fields such as the uptime)."""

    def __init__(self, worker: str, stats, health, volatile: tuple[str, ...] = ("uptime_s",)):
        self.worker = worker
        self._stats, self._health, self._volatile = stats, health, volatile
        self._poked = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pusher-{worker}", daemon=True)
        self.pushes = 0

    def start(self) -> Pusher:
        self._thread.start()
        return self

    def poke(self) -> None:
        self._poked.set()

    def stop(self) -> None:
        self._stopped.set()
        self._poked.set()

    def _find(self):
        """(this worker's board, the layout), or (None, None) while there is none."""
        try:
            first = ray.get_actor(board_name(0), namespace=BOARD_NAMESPACE)
            found = ray.get(first.layout.remote(), timeout=CALL_TIMEOUT_S)
            shard = shard_of(self.worker, found["shards"])
            board = (first if shard == 0
                     else ray.get_actor(board_name(shard), namespace=BOARD_NAMESPACE))
            return board, found
        except (ValueError, RayError, GetTimeoutError):
            return None, None

    def _run(self) -> None:
        board, found, last, last_push = None, None, None, 0.0
        while not self._stopped.is_set():
            if board is None:
                board, found = self._find()
                if board is None:
                    self._stopped.wait(FIND_RETRY_S)
                    continue
                last = None  # a board found anew gets the figures whole
            self._poked.wait(max(0.0, found["heartbeat_s"] - (time.monotonic() - last_push)))
            self._poked.clear()
            gap = found["push_interval_s"] - (time.monotonic() - last_push)
            if gap > 0 and self._stopped.wait(gap):  # at most one push per interval
                return
            try:
                figures, health = self._stats(), self._health()
            except Exception as err:  # the worker's own failure is what it reports
                figures, health = None, f"figures unavailable: {err!r}"
            key = None if figures is None else {k: v for k, v in figures.items()
                                                if k not in self._volatile}
            changed = key is not None and key != last
            if not changed and time.monotonic() - last_push < found["heartbeat_s"]:
                continue  # poked, but nothing new, and no heartbeat due yet
            try:
                held = ray.get(board.push.remote(self.worker, figures if changed else None,
                                                 health), timeout=CALL_TIMEOUT_S)
            except (RayError, GetTimeoutError):
                board = None  # gone or stuck: look for it (or its successor) again
                continue
            last_push = time.monotonic()
            self.pushes += 1
            last = key if (changed or held) else None  # not held: send them whole next time
            if not held:
                self._poked.set()
