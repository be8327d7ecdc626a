"""How a call to a worker can fail, whichever way it reaches the worker (a Ray actor, or a
worker link), and what the pool tells the dispatcher about it.

Knows: Ray's and the link's error types. Does not know: what the pool does about them.
"""

from __future__ import annotations

from ray.exceptions import RayActorError, RayError, RayTaskError

from scheduler.link_handle import LinkCallFailed, LinkError, LinkGone

GONE = (RayActorError, LinkGone)
"""The worker is dead to this scheduler (its actor died, its link closed)."""
FAILED = (RayTaskError, LinkCallFailed)
"""The call raised on the worker (`.cause` says how)."""
NO_ANSWER = (RayError, LinkError)
"""Any call that gave no answer."""


class WorkerLost(Exception):
    """The worker died, stopped answering, or its stream broke: the job may resume elsewhere."""


class WorkerRefused(Exception):
    """The worker refused the job itself (bad input): resuming elsewhere would not help."""


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
