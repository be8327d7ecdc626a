"""What the scheduler itself saw of each worker's speed: the tokens and times of the streams it
read from it, for the router to weigh against what the worker claims.

A worker's figures (SPS table, accepted length, tokens/s) are its own word, and a stranger's
machine can claim anything. Here every chunk the dispatcher delivers from a worker is counted
at the moment it is read: its tokens, and the time since the stream's previous chunk (for the
first chunk, since the stream was opened: the time to first token counts, so a worker cannot
hide its slowness in a wait before one chunk that carries a whole answer). Per worker these add
up to the observed tokens per second per stream, at the load (requests in flight, as the
router counts them) the worker had meanwhile. The sums decay by the tokens that follow them
(`MEMORY_TOKENS`), so the figure follows a worker that slows down or speeds up. The time to
first token is also kept on its own, for operators.

The router (`scheduler.router.claim_factor`) compares this with the worker's claim at the same
load: within `CLAIM_TOLERANCE` the claim stands, beyond it the worker's predicted throughput is
scaled down to what was observed. A worker with fewer than `MIN_OBSERVED_TOKENS` observed
tokens keeps its claim (the contract bounds every claimed figure).

Limits, said plainly: the time counted is when the scheduler read a chunk, so a scheduler
whose event loop lags, or a client that reads a `Generate` stream slowly (the stream is read
as the client takes it), makes a worker look slower than it is; a long prompt's prefill counts
too (the router's model has no prefill). Both lower an honest worker's observed figure, and
only a shortfall past the tolerance costs it weight. The load is the worker's reported one
plus what this scheduler sent it: a worker that reports more requests running than it has is
compared with a lower claimed speed per request, so that lie is not caught here.

Knows: a job's part as billing measures it (`billing.Part`: when it started, its last chunk),
chunks, worker snapshots. Does not know: Ray, gRPC, Redis, routing policy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from scheduler.router import WorkerSnapshot
from sparkgrid.contract import Chunk

if TYPE_CHECKING:
    from scheduler.billing import Part

MIN_OBSERVED_TOKENS = 64
"""Below this many observed tokens (decayed) a worker's claim stands: too little to judge."""
MEMORY_TOKENS = 1024
"""The observation forgets by tokens: what was seen this many tokens ago weighs 1/e."""
REINDEX_CHANGE = 0.1
"""A worker is put in the candidate index again when its observed figure moves by more than
this share since the index last had it (its next figures re-index it in any case)."""
TTFT_WEIGHT = 0.2
"""Weight of the latest stream in the moving mean of the time to first token."""


@dataclass
class _Seen:
    """One worker's decayed sums."""

    tokens: float = 0.0
    seconds: float = 0.0
    """Stream seconds (each stream's time counted once, however many ran at once)."""
    load_seconds: float = 0.0
    """Its load multiplied by those seconds: divided by them, the mean load."""
    load: int = 1
    """Requests in flight on it as the router last counted them."""
    ttft_s: float | None = None
    handed_rate: float | None = None
    """The observed tokens/s last handed out in a snapshot (the candidate index's, as a rule;
    None: none, its claim stands)."""

    def rate(self) -> float | None:
        if self.tokens < MIN_OBSERVED_TOKENS or self.seconds <= 0:
            return None
        return self.tokens / self.seconds


@dataclass(frozen=True)
class Observed:
    """A worker's observed figures, as operators see them."""

    tokens: float
    """Observed tokens (decayed: about the last MEMORY_TOKENS)."""
    tokens_per_s: float | None
    """Per stream, at `concurrency`; None: fewer than MIN_OBSERVED_TOKENS tokens observed."""
    concurrency: float
    ttft_s: float | None
    """Moving mean of the time to first token (None: no stream seen yet)."""


class ObservedSpeeds:
    """The observations of every worker this scheduler streamed from. `find(name)` gives the
    pool's worker (None: gone) and `reindex(worker)` puts it in its candidate index again."""

    def __init__(self, find: Callable[[str], object | None] | None = None,
                 reindex: Callable[[object], None] | None = None):
        self._find = find
        self._reindex = reindex
        self._seen: dict[str, _Seen] = {}

    def saw(self, part: Part, chunk: Chunk, now: float | None = None) -> None:
        """A chunk of `part.worker` that the scheduler delivers, called before `part.add`
        counts it (the part's `last` is then the previous chunk's time, or its start)."""
        now = time.monotonic() if now is None else now
        seen = self._seen.setdefault(part.worker, _Seen())
        tokens = len(chunk.token_ids)
        elapsed = max(0.0, now - part.last)
        if part.completion_tokens == 0 and tokens:
            ttft = now - part.started
            seen.ttft_s = ttft if seen.ttft_s is None else (
                (1 - TTFT_WEIGHT) * seen.ttft_s + TTFT_WEIGHT * ttft)
        keep = math.exp(-tokens / MEMORY_TOKENS)
        seen.tokens = seen.tokens * keep + tokens
        seen.seconds = seen.seconds * keep + elapsed
        seen.load_seconds = seen.load_seconds * keep + seen.load * elapsed
        if self._moved(seen) and self._find is not None and self._reindex is not None:
            if (worker := self._find(part.worker)) is not None:
                self._reindex(worker)

    def apply(self, snap: WorkerSnapshot) -> WorkerSnapshot:
        """`snap` with the worker's observed figures (unchanged while too little was seen);
        its load is noted as the one the next chunks are read at."""
        seen = self._seen.get(snap.name)
        if seen is None:
            return snap
        seen.load = max(1, snap.queued_requests)
        seen.handed_rate = rate = seen.rate()
        if rate is None:
            return snap
        return replace(snap, observed_tokens_per_s=rate,
                       observed_concurrency=seen.load_seconds / seen.seconds)

    def figures(self, name: str) -> Observed | None:
        """What was observed of `name`; None: nothing yet."""
        seen = self._seen.get(name)
        if seen is None:
            return None
        concurrency = seen.load_seconds / seen.seconds if seen.seconds > 0 else 1.0
        return Observed(seen.tokens, seen.rate(), concurrency, seen.ttft_s)

    @staticmethod
    def _moved(seen: _Seen) -> bool:
        """Whether the index's figure of the worker is stale enough to put it again."""
        rate, held = seen.rate(), seen.handed_rate
        if rate is None or held is None:
            return (rate is None) != (held is None)
        return abs(rate - held) > REINDEX_CHANGE * held
