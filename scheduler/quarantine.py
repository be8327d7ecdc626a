"""Quarantined workers as one scheduler holds them: why each gets no jobs, which were decided
here and not yet shared, and the shared set as the store has it.

A scheduler quarantines a worker on its own (three broken rules, a failed audit) and hands the
decision to the store (`take_new`), where every scheduler of the prefix reads it (`sync`) and
where `sparkgrid workers release NAME` lifts it. A decision made here stays until the store has
it, so a sync that read the store just before never undoes it.

Knows: names and reasons. Does not know: Ray, Redis, routing.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class Quarantines:
    """`apply(name)` is called whenever a worker's reason (or none) changes."""

    def __init__(self, apply):
        self._apply = apply
        self._reasons: dict[str, str] = {}
        self._new: dict[str, tuple[str, float]] = {}

    def reason(self, name: str) -> str | None:
        """Why `name` gets no jobs; None when it is not quarantined."""
        return self._reasons.get(name)

    def add(self, name: str, reason: str) -> None:
        if name in self._reasons:
            return
        self._reasons[name] = reason
        self._new[name] = (reason, time.time())
        log.warning("worker %s is quarantined: %s", name, reason)
        self._apply(name)

    def take_new(self) -> dict[str, tuple[str, float]]:
        """Quarantines decided here since the last call: name -> (reason, since)."""
        taken, self._new = self._new, {}
        return taken

    def give_back(self, taken: dict[str, tuple[str, float]]) -> None:
        """What `take_new` returned and the store did not take: handed on again later."""
        self._new = {**taken, **self._new}

    def sync(self, stored: dict[str, str]) -> None:
        """The shared quarantines (name -> reason) as the store has them now; one decided here
        and not yet handed on stays. A worker in neither is released."""
        stored = {**stored, **{n: r for n, (r, _) in self._new.items()}}
        changed = {n for n in set(stored) | set(self._reasons)
                   if stored.get(n) != self._reasons.get(n)}
        self._reasons = stored
        for name in sorted(changed):
            self._apply(name)
