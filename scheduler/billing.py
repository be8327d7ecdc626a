"""Billing: what a job is billed when it ends, and settling that in the store exactly once.

A job ends in one of two ways, and both come here as a `JobEnd` (the facts a bill is made of)
and leave through one `Billing.settle`:
- its scheduler ends it (`Dispatcher`: finished, failed or cancelled), with the job's
  segments, one per worker that ran a part of it (`Part` measures one as it streams);
- the scheduler dies first, and the next one to start finds the job open (an orphan,
  `orphan_end`): it ends `failed`, billed for the tokens its scheduler last recorded as
  delivered (a progress note a second old at most), booked to the worker and GPU type
  `UNKNOWN` since which worker delivered them is not recorded, so the per-worker totals
  still add up to the tenants'.

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
the same job, or two schedulers settling one orphan bill it once.

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
"""How long a starting scheduler waits for its orphans' ends to be written."""


def charge_uusd(plan: Plan, model: str, prompt_tokens: int, completion_tokens: int) -> int:
    """What `plan` charges for a job of `model`, in micro-dollars: exact, rounded once."""
    price = plan.price(model)
    exact = (Decimal(prompt_tokens) * price.prompt_uusd_per_million
             + Decimal(completion_tokens) * price.completion_uusd_per_million) / 1_000_000
    return int(exact.to_integral_value(ROUND_HALF_EVEN))


def usage(prompt_tokens: int, segments) -> dict[str, int]:
    """The tokens a job is billed for (the client is told these too): its prompt, and what
    the scheduler delivered, which is what its segments delivered."""
    return {"prompt_tokens": prompt_tokens,
            "completion_tokens": sum(s.completion_tokens for s in segments)}


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
        return Segment(self.worker, self.gpu_type, self.prompt_tokens, self.completion_tokens,
                       busy_ms=round(1000 * (self.last - self.started)),
                       **{name: getattr(self.spec, name) for name in SPEC_FIELDS})


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


@dataclass(frozen=True)
class Settlement:
    """A job's end as the store writes it (`finish_job`): state, record fields and bill."""

    job_id: str
    state: JobState
    fields: dict
    bill: Bill


def settlement(end: JobEnd, prices: PriceBook, at: float) -> Settlement:
    """What `end` is billed and the record it leaves, settled at unix time `at`."""
    plan = prices.plan(end.plan)
    tokens = usage(end.prompt_tokens, end.segments)
    charge = charge_uusd(plan, end.model, tokens["prompt_tokens"], tokens["completion_tokens"])
    bill = Bill(end.job_id, end.tenant, end.model, at, tokens["prompt_tokens"],
                tokens["completion_tokens"], tuple(end.segments), charge)
    fields = {"finish_reason": end.finish_reason, "error": end.error, "finished_at": at,
              **tokens, "charge_uusd": charge, "plan": plan.name, "price_version": prices.version,
              "segments": [dataclasses.asdict(s) for s in end.segments],
              "spec": spec_totals(end.segments), "text": end.text,
              "workers": None if end.workers is None else list(end.workers),
              "token_ids": None if end.token_ids is None else list(end.token_ids)}
    return Settlement(end.job_id, JobState(end.state), fields, bill)


def orphan_end(record: dict, plan: str | None) -> JobEnd:
    """The end of an open job (its store record) whose scheduler died (see above)."""
    delivered = int(record.get("progress_completion_tokens") or 0)
    segments = (Segment(UNKNOWN, UNKNOWN, 0, delivered),) if delivered else ()
    return JobEnd(record["job_id"], record["tenant"], record["model"], plan, JobState.FAILED,
                  int(record.get("prompt_tokens") or 0), segments,
                  error=f"the scheduler that ran it ({record.get('owner')}) stopped")


class Billing:
    """Settles jobs in `store`, priced by `prices`; `start()` the writer first."""

    def __init__(self, store, prices: PriceBook, retry_s: float = 1.0):
        self.store = store
        self.prices = prices
        self.retry_s = retry_s
        self._queue: asyncio.Queue[Settlement] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def plan(self, tenant: str) -> Plan:
        """The plan the tenant is on now (the book's default for none or an unknown one)."""
        return self.prices.plan(await self.store.tenant_plan(tenant))

    def settle(self, end: JobEnd) -> Settlement:
        """Bill the job's end and queue its write (see above); returns what will be written."""
        done = settlement(end, self.prices, time.time())
        self._queue.put_nowait(done)
        return done

    async def settle_orphans(self, owner: str) -> list[str]:
        """Settle every open job not of `owner` (this scheduler): their scheduler died. Waits
        up to `ORPHANS_WAIT_S` for the writes; returns the jobs' ids."""
        settled = []
        for record in await self.store.open_jobs():
            if record.get("owner") == owner:
                continue
            plan = record.get("plan") or (await self.plan(record["tenant"])).name
            self.settle(orphan_end(record, plan))
            settled.append(record["job_id"])
            log.warning("job %s: left open by %s; settling it as failed", record["job_id"],
                        record.get("owner"))
        if settled and not await self.flush(ORPHANS_WAIT_S):
            log.error("ledger: orphaned jobs not yet settled (Redis down); still retrying")
        return settled

    def start(self) -> None:
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
                    await self.store.finish_job(done.job_id, done.state, done.fields, done.bill)
                    break
                except StoreUnavailable as err:
                    log.warning("ledger: job %s not yet written (%s); retrying", done.job_id, err)
                    await asyncio.sleep(self.retry_s)
                except Exception:  # a bug or a vanished job: log it, never stop the writer
                    log.exception("ledger: job %s could not be written", done.job_id)
                    break
            self._queue.task_done()
