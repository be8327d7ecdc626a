"""Billing: what a job is billed when it ends, and settling that in the store exactly once.

A job ends in one of two ways, and both come here as a `JobEnd` (the facts a bill is made of)
and leave through one `Billing.settle`:
- its scheduler ends it (`Dispatcher`: finished, failed or cancelled), with the job's
  segments, one per worker that ran a part of it (`Part` measures one as it streams);
- the scheduler dies first (an orphan, `orphan_end`): every live scheduler holds a lease in
  the store that it renews (`head.py`), and sweeps the open jobs every few seconds
  (`sweep_orphans`); a job whose owner's lease has lapsed ends `failed`, billed for the tokens
  its scheduler last noted as sent to the client (`dispatch.PROGRESS_NOTES`: it lags by the
  chunks of one Redis round trip), booked to
  the worker and GPU type `UNKNOWN` since which worker delivered them is not recorded, so the
  per-worker totals still add up to the tenants'. The store settles it only if the owner's
  lease is still gone at that moment (one script), so a live scheduler's job never is.

What is billed (`settlement`): the request's prompt tokens and the completion tokens the
scheduler delivered (the sum of the segments), at the prices of the plan the job was admitted
under, from the price book in force (its version goes into the job's record). The charge is
`prompt x prompt price + completion x completion price` per million, computed exactly and
rounded half-even to whole micro-dollars once, per job (`charge_uusd`); every later sum (the
ledger's, the reports') is of integers. The workers' own claims (drafted, verified, accepted
tokens, busy time) ride along for reports, never billed.

Writing: `settle` queues the job's end and returns at once (a client's stream never waits on
Redis); a task writes the queue in order, retrying while the store is down. The store's
finishing script does nothing to a job already final, so a retried write, a second settle of
the same job, or two schedulers settling one orphan bill it once. A scheduler whose own job
was settled as an orphan (its lease had lapsed: Redis lost it, or the scheduler stalled past
its TTL) finds its own bill refused: that is logged as an error and noted in the job's
events (`anomaly`), with the tokens it delivered but could not bill.

Nothing waits only in memory: a settlement the store does not take at once (Redis down or
hung) is first written to the bill journal on local disk (`bill_journal.py`, fsynced), and a
scheduler that starts takes over the journals of dead schedulers on its host, so a crash
during an outage loses no bill. A lapsed owner is settled only when a second sweep, one
interval later, still finds its lease gone (the owner had that long to renew it after an
outage that outlasted the lease). A scheduler also settles its own strays: open jobs it owns
but neither runs nor has a bill pending for, older than `STRAY_AFTER_S` (a job whose creation
reached Redis only after the scheduler had given up on it); one that never ran is billed
nothing. A worker's figure that the ledger refuses (a negative count, an empty GPU type) never
keeps a job from being billed: its part is booked with the scheduler's own counts (`Part`).

Knows: plans and prices, segments, a job's end, the store's interface. Does not know: Redis
(see `redis_store.py`), how a bill is booked per dimension and day (`ledger.py`), gRPC, Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

from scheduler.errors import StoreUnavailable
from scheduler.jobs import JobState
from scheduler.ledger import SPEC_FIELDS, Bill, Segment, spec_totals
from scheduler.prices import Plan, PriceBook
from sparkgrid.contract import Chunk, SpecCounts

log = logging.getLogger(__name__)
UNKNOWN = "unknown"
"""The worker and GPU type an orphan's delivered tokens are booked to."""
ORPHANS_WAIT_S = 10.0
"""How long a sweep waits for its orphans' ends to be written."""
STRAY_AFTER_S = 60.0
"""A job of this scheduler's, open in the store but unknown to it, is a stray after this long
(far above the store's call timeout, so no job still being created is taken for one)."""


def charge_uusd(plan: Plan, model: str, prompt_tokens: int, completion_tokens: int) -> int:
    """What `plan` charges for a job of `model`, in micro-dollars: exact, rounded once."""
    price = plan.price(model)
    exact = (Decimal(prompt_tokens) * price.prompt_uusd_per_million
             + Decimal(completion_tokens) * price.completion_uusd_per_million) / 1_000_000
    return int(exact.to_integral_value(ROUND_HALF_EVEN))


def usage(prompt_tokens: int, segments, finished: bool = True) -> dict[str, int]:
    """The tokens a job is billed for (the client is told these too): its prompt, and what
    the scheduler delivered, which is what its segments delivered. A job that ended without
    finishing (failed, cancelled, its scheduler gone) and delivered no token is billed nothing,
    its prompt neither: the client got nothing for it (a retry pays for the prompt once)."""
    completion = sum(s.completion_tokens for s in segments)
    return {"prompt_tokens": prompt_tokens if finished or completion else 0,
            "completion_tokens": completion}


class Part:
    """One worker's part of a job, as the scheduler sees it stream; `segment()` books it."""

    def __init__(self, worker: str, gpu_type: str, prompt_tokens: int):
        self.worker, self.gpu_type, self.prompt_tokens = worker, gpu_type, prompt_tokens
        self.started = time.monotonic()
        self.last = self.started
        self.completion_tokens = 0
        self.spec = SpecCounts()

    def add(self, chunk: Chunk) -> None:
        """A chunk the scheduler delivered to the client."""
        self.completion_tokens += len(chunk.token_ids)
        self.spec = chunk.spec  # a running total: the latest chunk's
        self.last = time.monotonic()

    def segment(self) -> Segment:
        """The part as booked. A figure of the worker's that the ledger refuses (an empty GPU
        type, a negative count: the contract should have stopped it) is an anomaly: logged,
        and the part is booked with what the scheduler counted alone."""
        busy_ms = round(1000 * (self.last - self.started))
        try:
            return Segment(self.worker, self.gpu_type, self.prompt_tokens, self.completion_tokens,
                           busy_ms=busy_ms,
                           **{name: getattr(self.spec, name) for name in SPEC_FIELDS})
        except (ValueError, TypeError) as err:
            log.error("ledger ANOMALY: worker %s: %s; its part is booked without its claims",
                      self.worker, err)
            return Segment(self.worker or UNKNOWN, UNKNOWN, self.prompt_tokens,
                           self.completion_tokens, busy_ms=busy_ms)


@dataclass(frozen=True)
class JobEnd:
    """The facts a job's bill is made of, from whichever path ended it."""

    job_id: str
    tenant: str
    model: str
    plan: str | None
    """The plan the job was admitted under (None or an unknown name: the book's default)."""
    state: JobState
    prompt_tokens: int
    segments: tuple[Segment, ...]
    """Each worker's part, in dispatch order; what they delivered is what is billed."""
    finish_reason: str = ""
    error: str = ""
    workers: tuple[str, ...] | None = None
    """The rest is for the job's record; None leaves what the record has (an orphan's)."""
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    orphan_of: str | None = None
    """An orphan's: the owner it was found under (the store checks its lease is gone)."""
    settled_by: str | None = None
    """An orphan's: the scheduler that settles it."""


@dataclass(frozen=True)
class Settlement:
    """A job's end as the store writes it (`finish_job`): state, record fields and bill."""

    job_id: str
    state: JobState
    fields: dict
    bill: Bill
    orphan_of: str | None = None
    """Set for an orphan: written only while this owner's lease is gone."""


def settlement(end: JobEnd, prices: PriceBook, at: float) -> Settlement:
    """What `end` is billed and the record it leaves, settled at unix time `at`."""
    plan = prices.plan(end.plan)
    tokens = usage(end.prompt_tokens, end.segments, JobState(end.state) is JobState.FINISHED)
    charge = charge_uusd(plan, end.model, tokens["prompt_tokens"], tokens["completion_tokens"])
    bill = Bill(end.job_id, end.tenant, end.model, at, tokens["prompt_tokens"],
                tokens["completion_tokens"], tuple(end.segments), charge)
    fields = {"finish_reason": end.finish_reason, "error": end.error, "finished_at": at,
              **tokens, "charge_uusd": charge, "plan": plan.name, "price_version": prices.version,
              "segments": [dataclasses.asdict(s) for s in end.segments],
              "spec": spec_totals(end.segments), "text": end.text,
              "workers": None if end.workers is None else list(end.workers),
              "token_ids": None if end.token_ids is None else list(end.token_ids),
              **({"settled_by": end.settled_by} if end.settled_by else {})}
    return Settlement(end.job_id, JobState(end.state), fields, bill, end.orphan_of)


def orphan_end(record: dict, plan: str | None, settled_by: str | None = None) -> JobEnd:
    """The end of an open job (its store record) whose scheduler died (see above)."""
    delivered = int(record.get("progress_completion_tokens") or 0)
    segments = (Segment(UNKNOWN, UNKNOWN, 0, delivered),) if delivered else ()
    owner = record.get("owner") or ""
    return JobEnd(record["job_id"], record["tenant"], record["model"], plan, JobState.FAILED,
                  int(record.get("prompt_tokens") or 0), segments,
                  error=f"the scheduler that ran it ({owner}) stopped (its lease lapsed)",
                  orphan_of=owner, settled_by=settled_by)



class Billing:
    """Settles jobs in `store`, priced by `prices`; `start()` the writer first."""

    def __init__(self, store, prices: PriceBook, retry_s: float = 1.0, journal=None):
        self.store = store
        self.prices = prices
        self.retry_s = retry_s
        self.journal = journal
        """A `BillJournal` (or None: settlements waiting for Redis live in memory only)."""
        self._queue: asyncio.Queue[Settlement] = asyncio.Queue()
        self._waiting: dict[str, Settlement] = {}  # queued, not yet written
        self._outage = False  # the last write failed: new settlements go to the journal first
        self._lapsed: dict[str, float] = {}  # owner -> when a sweep first found its lease gone
        self._task: asyncio.Task | None = None

    async def plan(self, tenant: str) -> Plan:
        """The plan the tenant is on now (the book's default for none or an unknown one)."""
        return self.prices.plan(await self.store.tenant_plan(tenant))

    def settle(self, end: JobEnd) -> Settlement:
        """Bill the job's end and queue its write (see above); returns what will be written."""
        done = settlement(end, self.prices, time.time())
        self._queue_write(done)
        return done

    def _queue_write(self, done: Settlement) -> None:
        self._waiting[done.job_id] = done
        if self._outage:
            self._keep(done)
        self._queue.put_nowait(done)

    def _keep(self, done: Settlement) -> None:
        """Into the journal (fsynced) before anything else: it waits for Redis."""
        if self.journal is not None:
            try:
                self.journal.add(done)
            except OSError as err:
                log.error("bill journal: job %s not kept on disk (%s)", done.job_id, err)

    async def settle_orphans(self, owner: str, holds=lambda job_id: False,
                             confirm_s: float = 0.0) -> list[str]:
        """Settle every open job whose owner is not `owner` (this scheduler) and holds no live
        lease: its scheduler died, or stalled past its lease. Waits up to `ORPHANS_WAIT_S` for
        the writes; returns the ids of the jobs queued for settling (the store writes each
        only if its owner's lease is still gone then, and only once). An owner is settled only
        once its lease has been seen gone for `confirm_s`; `holds(job_id)` says whether this
        scheduler runs the job (its other open jobs are strays: see above)."""
        opened = await self.store.open_jobs()
        records = [r for r in opened if r.get("owner") != owner]
        live = await self.store.live_owners(r.get("owner") or "" for r in records)
        now = time.monotonic()
        lapsed = {r.get("owner") or "" for r in records} - live
        self._lapsed = {o: self._lapsed.get(o, now) for o in lapsed}
        settled = self._settle_strays(owner, opened, holds)
        for record in records:
            if record.get("owner") in live or now - self._lapsed[record.get("owner") or ""] \
                    < confirm_s:
                continue
            plan = record.get("plan") or (await self.plan(record["tenant"])).name
            self.settle(orphan_end(record, plan, settled_by=owner))
            settled.append(record["job_id"])
            log.warning("job %s: left open by %s, whose lease has lapsed; settling it as "
                        "failed", record["job_id"], record.get("owner"))
        if settled and not await self.flush(ORPHANS_WAIT_S):
            log.error("ledger: orphaned jobs not yet settled (Redis down); still retrying")
        return settled

    def _settle_strays(self, owner: str, opened: list[dict], holds) -> list[str]:
        cutoff = time.time() - STRAY_AFTER_S
        strays = [r for r in opened if r.get("owner") == owner and not holds(r["job_id"])
                  and r["job_id"] not in self._waiting and r.get("created_at", 0) < cutoff]
        for record in strays:
            end = orphan_end(record, record.get("plan"))
            if record.get("state") == JobState.QUEUED.value:  # it never ran: nothing to bill
                end = dataclasses.replace(end, prompt_tokens=0, segments=())
            self.settle(dataclasses.replace(
                end, orphan_of=None, error="its scheduler lost track of it (the store answered "
                                           "its creation too late); settled by that scheduler"))
            log.error("job %s: open in the store but unknown to this scheduler; settled as "
                      "failed", record["job_id"])
        return [r["job_id"] for r in strays]

    async def sweep_orphans(self, owner: str, every_s: float, holds=lambda job_id: False) -> None:
        """`settle_orphans` every `every_s` seconds, for ever (a task of the scheduler's);
        a sweep that fails (Redis down) is logged and tried again at the next."""
        while True:
            try:
                await self.settle_orphans(owner, holds, confirm_s=every_s)
            except StoreUnavailable as err:
                log.warning("orphan sweep skipped: %s", err)
            except Exception:  # a bug: log it, never stop sweeping
                log.exception("orphan sweep failed")
            await asyncio.sleep(every_s)

    def start(self) -> None:
        """Start the writer, with the bills of dead schedulers' journals queued first."""
        for done in self.journal.adopt_dead() if self.journal is not None else ():
            self._waiting[done.job_id] = done
            self._queue.put_nowait(done)
        self._task = asyncio.create_task(self._run())

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued end is written (True), or `timeout_s` passes (False)."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            done = await self._queue.get()
            while True:
                try:
                    landed = await self.store.finish_job(done.job_id, done.state, done.fields,
                                                         done.bill, orphan_of=done.orphan_of)
                    if not landed and done.orphan_of is None:
                        await self._check_refused(done)
                    break
                except StoreUnavailable as err:
                    if not self._outage:  # everything waiting goes to disk now
                        self._outage = True
                        for waiting in list(self._waiting.values()):
                            self._keep(waiting)
                    log.warning("ledger: job %s not yet written (%s); retrying", done.job_id, err)
                    await asyncio.sleep(self.retry_s)
                except Exception:  # a bug or a vanished job: log it, never stop the writer
                    log.exception("ledger: job %s could not be written", done.job_id)
                    self._keep(done)  # kept on disk for an operator (taken up at a restart)
                    break
            self._written(done)
            self._queue.task_done()

    def _written(self, done: Settlement) -> None:
        self._waiting.pop(done.job_id, None)
        if self.journal is not None and done.job_id in self.journal.open:
            try:
                self.journal.done(done.job_id)
            except OSError as err:
                log.warning("bill journal: %s", err)
        if not self._waiting:
            self._outage = False

    async def _check_refused(self, done: Settlement) -> None:
        """The store refused a job's own end: a retry of a write that had landed (fine), or
        the job was settled as an orphan while this scheduler still ran it (an anomaly: what
        it delivered beyond that settlement is not billed)."""
        record = await self.store.get_job(done.job_id) or {}
        if not record.get("settled_by"):
            return
        log.error("ledger ANOMALY: job %s was settled as an orphan by %s (billed %s prompt + %s "
                  "completion tokens) while this scheduler still ran it; its own bill (%d + %d "
                  "tokens, %d uusd) is NOT booked", done.job_id, record["settled_by"],
                  record.get("prompt_tokens"), record.get("completion_tokens"),
                  done.bill.prompt_tokens, done.bill.completion_tokens, done.bill.charge_uusd)
        await self.store.note_event(
            done.job_id, "anomaly", error="settled as an orphan while its scheduler ran it",
            unbilled_completion_tokens=max(0, done.bill.completion_tokens
                                           - int(record.get("completion_tokens") or 0)),
            refused_charge_uusd=done.bill.charge_uusd)
