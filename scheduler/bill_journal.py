"""The bill journal: job settlements waiting for Redis, kept on local disk so that a crash of
the scheduler does not lose them.

A settlement goes to Redis at once (`billing.py`); only while Redis cannot be reached does it
wait, and a waiting settlement is first written here: one JSON line per bill, fsynced before
the writer goes on. When Redis takes it, a `done` line follows. So after a crash, the lines
without their `done` are exactly the bills that may not have landed; writing one twice is
harmless, since the store refuses to settle a job that is already final.

Each scheduler writes its own file, `{directory}/{owner}.jsonl`, and holds an exclusive lock on
it while it lives (`flock`: the kernel drops it when the process dies, however it dies). A
scheduler that starts takes over every file in the directory that nobody holds: it copies the
open bills into its own journal, fsyncs, deletes the dead file, and queues them. Several
schedulers on one host share the directory safely. A journal with nothing open is truncated.

Knows: files, locks, the settlement's encoding. Does not know: Redis, prices, gRPC.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
from pathlib import Path

from scheduler.jobs import JobState
from scheduler.ledger import Bill, Segment

log = logging.getLogger(__name__)
SUFFIX = ".jsonl"


def encode(settlement) -> dict:
    """A `billing.Settlement` as plain JSON values."""
    return {"job_id": settlement.job_id, "state": settlement.state.value,
            "fields": settlement.fields, "bill": dataclasses.asdict(settlement.bill),
            "orphan_of": settlement.orphan_of}


def decode(data: dict):
    """The `billing.Settlement` that `encode` wrote; ValueError (or KeyError/TypeError) when
    the line is not one."""
    from scheduler.billing import Settlement  # billing imports this module

    raw = dict(data["bill"])
    raw["segments"] = tuple(Segment(**s) for s in raw.get("segments", ()))
    return Settlement(str(data["job_id"]), JobState(data["state"]), dict(data["fields"]),
                      Bill(**raw), data.get("orphan_of"))


def _open_bills(path: Path) -> dict[str, dict]:
    """The bills of a journal file that have no `done` line, by job id, in order. A torn last
    line (a crash mid-write) is skipped."""
    bills: dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                entry = json.loads(line)
                if entry.get("op") == "done":
                    bills.pop(entry["job_id"], None)
                else:
                    bills[entry["settlement"]["job_id"]] = entry["settlement"]
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("bill journal %s: line %d is not a journal entry; skipped", path,
                            number)
    return bills


class BillJournal:
    """This scheduler's journal in `directory` (created, mode 0700: bills name tenants)."""

    def __init__(self, directory: str | Path, owner: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.directory / f"{owner}{SUFFIX}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OSError(f"bill journal {self.path}: held by another scheduler") from None
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self.open: set[str] = set()
        """Job ids written here without their `done` line yet."""

    def add(self, settlement) -> None:
        """Keep `settlement` until `done`: written and fsynced before this returns."""
        if settlement.job_id in self.open:
            return
        self._write({"op": "bill", "settlement": encode(settlement)}, sync=True)
        self.open.add(settlement.job_id)

    def done(self, job_id: str) -> None:
        """The store took the job's settlement (or refused it as already final)."""
        if job_id not in self.open:
            return
        self.open.discard(job_id)
        self._write({"op": "done", "job_id": job_id}, sync=False)
        if not self.open:  # nothing waits: start the file afresh
            self._file.truncate(0)

    def adopt_dead(self) -> list:
        """The open settlements of every journal in the directory whose scheduler is gone,
        now kept in this one (their files deleted). Unreadable lines are logged and skipped."""
        adopted = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path == self.path:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:  # another scheduler took it first
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # its scheduler is alive
                    continue
                for job_id, data in _open_bills(path).items():
                    try:
                        settlement = decode(data)
                    except (ValueError, KeyError, TypeError) as err:
                        log.error("bill journal %s: job %s cannot be read back (%s)", path,
                                  job_id, err)
                        continue
                    self.add(settlement)
                    adopted.append(settlement)
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        if adopted:
            log.warning("bill journal: took over %d bills of stopped schedulers", len(adopted))
        return adopted

    def close(self) -> None:
        """Release the lock; the file stays when bills are still open (the next scheduler on
        this host takes them), and goes when none is."""
        if not self.open:
            self.path.unlink(missing_ok=True)
        self._file.close()

    def _write(self, entry: dict, sync: bool) -> None:
        self._file.write(json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())
