"""Cost reports over a real, private Redis: jobs billed through `RedisStore.finish_job` (two
tenants, two workers on two GPU types, a job that failed over), worker time recorded through
`record_worker_time`, audit verdicts through `record_audit`, a quarantine and an operator's
registration come back in every report with totals equal to what was billed, exactly; the
operator report sums its registered workers and puts the unregistered one under `(none)`; and
`sparkgrid report` prints each format and refuses a bad day with exit 2."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import subprocess
import sys
from datetime import datetime, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import pytest

from scheduler.jobs import JobState
from scheduler.ledger import Bill, Segment
from scheduler.redis_store import RedisStore
from scheduler.report_cli import report_options, run_report
from scheduler.reports import BY, NO_OPERATOR, TOTAL, build_reports
from sparkgrid.registration import Registration, token_id_of

pytestmark = pytest.mark.integration

DAY1, DAY2 = "2025-06-02", "2025-06-03"
NOON1 = datetime(2025, 6, 2, 12, tzinfo=timezone.utc).timestamp()
NOON2 = NOON1 + 86_400
WORKERS = {"w-h200": {"gpu_type": "H200", "price_uusd_per_hour": 3_490_001, "node_ip": "10.0.0.1",
                      "model": "qwen"},
           "w-l4": {"gpu_type": "L4", "price_uusd_per_hour": 390_007, "node_ip": "10.0.0.2",
                    "model": "qwen"}}
TIME = {("w-h200", DAY1): (7_200_123, 3_000_000), ("w-h200", DAY2): (3_600_777, 100_000),
        ("w-l4", DAY1): (5_400_001, 5_000_000), ("w-l4", DAY2): (1_234_567, 0)}
"""(worker, day) -> (online ms, active ms)."""
AUDITS = [("w-h200", True, NOON1), ("w-h200", False, NOON2), ("w-l4", True, NOON1),
          ("w-l4", True, NOON1 + 5), ("w-l4", True, NOON2)]
"""(worker, passed, when) of each audit verdict."""
QUARANTINED = ("w-h200", NOON2)
"""w-h200 failed its audit on DAY2 and is still quarantined: its DAY2 payout is withheld."""


def bills() -> list[Bill]:
    def seg(worker, prompt, completion, steps):
        return Segment(worker, WORKERS[worker]["gpu_type"], prompt, completion,
                       draft_tokens=7 * steps, verified_tokens=7 * steps,
                       accepted_tokens=completion - steps, busy_ms=100 + completion,
                       spec_steps=steps)

    return [Bill("j1", "acme", "qwen", NOON1, 120, 40, (seg("w-h200", 120, 40, 15),), 1_234_567),
            Bill("j2", "beta", "qwen", NOON1 + 60, 300, 90, (seg("w-l4", 300, 90, 30),), 2_345_679),
            Bill("j3", "acme", "qwen", NOON2, 50, 70,  # fails over from w-h200 to w-l4
                 (seg("w-h200", 50, 25, 10), seg("w-l4", 75, 45, 20)), 999_999),
            Bill("j4", "beta", "qwen", NOON2 + 60, 10, 5, (seg("w-l4", 10, 5, 2),), 33)]


def cost_uusd(online_ms: int, price: int) -> int:
    """GPU cost of one (worker, day), worked out here independently of `reports.py`."""
    return int((Decimal(online_ms * price) / 3_600_000).quantize(Decimal(1), ROUND_HALF_EVEN))


async def bill_everything(store: RedisStore) -> None:
    for bill in bills():
        await store.create_job({"job_id": bill.job_id, "tenant": bill.tenant, "model": bill.model,
                                "request_id": "", "params": {}, "owner": "test",
                                "created_at": bill.finished_at - 5})
        for k, seg in enumerate(bill.segments):
            await store.start_job(bill.job_id, seg.worker, bill.finished_at - 4 + k)
        assert await store.finish_job(bill.job_id, JobState.FINISHED,
                                      {"finished_at": bill.finished_at}, bill)
    for (worker, day), (online, active) in TIME.items():
        await store.record_worker_time(worker, WORKERS[worker], day, online, active)
    for worker, passed, at in AUDITS:
        await store.record_audit(worker, passed, at)
    await store.quarantine_worker(QUARANTINED[0], "failed an audit", QUARANTINED[1])
    for operator, worker, kind in (("acme-gpus", "w-h200", "linked"),
                                   ("idle-ops", "w-idle", "in-cluster")):  # w-l4: none
        token = await store.add_operator(operator)
        await store.register_worker(operator, Registration(
            worker=worker, token_id=token_id_of(token), model_id="qwen",
            tokenizer_sha256="ab" * 32, weights_sha256="cd" * 32, gpu_type="H200",
            price_per_hour=3.490001, kind=kind, issued_at=NOON1))


@pytest.fixture
def billed(redis_server, redis_prefix):
    async def fill():
        store = RedisStore(redis_server.url, redis_prefix)
        try:
            await bill_everything(store)
            return await build_reports(store, DAY1, DAY2)
        finally:
            await store.close()

    return asyncio.run(fill())


def uusd(value: Decimal) -> int:
    return int(value * 1_000_000)


def test_every_reports_totals_equal_what_was_billed(billed):
    charged = sum(b.charge_uusd for b in bills())
    gpu_cost = sum(cost_uusd(online, WORKERS[w]["price_uusd_per_hour"])
                   for (w, _), (online, _) in TIME.items())
    prompt, completion = (sum(b.prompt_tokens for b in bills()),
                          sum(b.completion_tokens for b in bills()))
    withheld = cost_uusd(TIME[("w-h200", DAY2)][0], WORKERS["w-h200"]["price_uusd_per_hour"])
    for by in BY:
        totals = billed[by].totals
        assert uusd(totals["gpu_cost_usd"]) == gpu_cost, by
        assert uusd(totals["charges_usd" if by in ("tenant", "day")
                           else "revenue_usd"]) == charged, by
        paid = by in ("worker", "operator")  # their margin is revenue - payout
        assert uusd(totals["margin_usd"]) == charged - gpu_cost + withheld * paid, by
        if paid:
            assert uusd(totals["withheld_usd"]) == withheld, by
            assert (totals["audited_jobs"], totals["failed_audits"]) == (len(AUDITS), 1), by
    for by in ("tenant", "day"):
        totals = billed[by].totals
        assert (totals["requests"], totals["prompt_tokens"], totals["completion_tokens"]) == (
            4, prompt, completion)
    served = (billed["worker"].totals["tokens_served"], billed["gpu"].totals["tokens_served"])
    assert served == (completion, completion)
    assert billed["worker"].totals["online_hours"] == sum(o for o, _ in TIME.values()) / 3_600_000


def test_rows_split_the_failover_job_between_its_workers(billed):
    workers = {r["worker"]: r for r in billed["worker"].rows}
    assert workers["w-h200"]["tokens_served"] == 40 + 25
    assert workers["w-l4"]["tokens_served"] == 90 + 45 + 5
    assert workers["w-l4"]["prompt_tokens_processed"] == 300 + 75 + 10
    assert workers["w-h200"]["gpu_type"] == "H200"
    assert workers["w-h200"]["price_per_hour_usd"] == Decimal("3.490001")
    assert uusd(workers["w-l4"]["gpu_cost_usd"]) == (cost_uusd(5_400_001, 390_007)
                                                     + cost_uusd(1_234_567, 390_007))
    assert workers["w-l4"]["utilisation"] == 5_000_000 / (5_400_001 + 1_234_567)
    gpus = {r["gpu_type"]: r for r in billed["gpu"].rows}
    assert list(gpus) == ["H200", "L4"] and gpus["H200"]["workers"] == 1
    assert gpus["L4"]["share_of_traffic"] == 140 / 205
    tenants = {r["tenant"]: r for r in billed["tenant"].rows}
    assert list(tenants) == ["acme", "beta"]
    assert uusd(tenants["acme"]["charges_usd"]) == 1_234_567 + 999_999
    days = {r["day"]: r for r in billed["day"].rows}
    assert days[DAY2]["tokens_per_tenant"] == {"acme": 120, "beta": 15}


def test_operator_report_from_real_registrations_and_audits(billed):
    workers = {r["worker"]: r for r in billed["worker"].rows}
    assert (workers["w-h200"]["operator"], workers["w-h200"]["kind"]) == ("acme-gpus", "linked")
    assert (workers["w-l4"]["operator"], workers["w-l4"]["kind"]) == ("", "")
    assert (workers["w-h200"]["audited_jobs"], workers["w-h200"]["failed_audits"]) == (2, 1)
    assert (workers["w-l4"]["audited_jobs"], workers["w-l4"]["failed_audits"]) == (3, 0)
    operators = {r["operator"]: r for r in billed["operator"].rows}
    assert list(operators) == ["acme-gpus", NO_OPERATOR]  # idle-ops has no usage: no row
    for operator, worker in (("acme-gpus", "w-h200"), (NO_OPERATOR, "w-l4")):
        row, alone = operators[operator], workers[worker]
        assert row["workers"] == 1
        for name in ("tokens_served", "online_hours", "gpu_cost_usd", "withheld_usd",
                     "payout_usd", "revenue_usd", "audited_jobs", "failed_audits"):
            assert row[name] == alone[name], (operator, name)
    acme = operators["acme-gpus"]
    assert uusd(acme["withheld_usd"]) == cost_uusd(TIME[("w-h200", DAY2)][0],
                                                   WORKERS["w-h200"]["price_uusd_per_hour"])
    assert acme["payout_usd"] == acme["gpu_cost_usd"] - acme["withheld_usd"] > 0
    assert billed["operator"].totals["workers"] == 2


def run_in_process(capsys, *argv) -> str:
    parser = argparse.ArgumentParser()
    report_options(parser)
    assert run_report(parser.parse_args(list(argv))) == 0
    return capsys.readouterr().out


def test_report_command_in_process_prints_every_format(redis_server, redis_prefix, capsys,
                                                       tmp_path):
    asyncio.run(_bill(redis_server.url, redis_prefix))
    common = ("--since", DAY1, "--until", DAY2, "--redis-url", redis_server.url,
              "--redis-prefix", redis_prefix)
    table = run_in_process(capsys, *common)
    assert f"UTC days {DAY1} to {DAY2}" in table and "acme" in table and TOTAL in table
    rows = list(csv.DictReader(io.StringIO(run_in_process(capsys, *common, "--format", "csv",
                                                          "--by", "worker"))))
    assert [r["worker"] for r in rows] == ["w-h200", "w-l4", TOTAL]
    doc = json.loads(run_in_process(capsys, *common, "--format", "json", "--by", "gpu"))
    assert doc["since"] == DAY1 and [r["gpu_type"] for r in doc["rows"]] == ["H200", "L4"]
    doc = json.loads(run_in_process(capsys, *common, "--format", "json", "--by", "operator"))
    assert [(r["operator"], r["audited_jobs"]) for r in doc["rows"]] == [
        ("acme-gpus", 2), (NO_OPERATOR, 3)]
    out = tmp_path / "report.html"
    run_in_process(capsys, *common, "--format", "html", "--by", "day", "--out", str(out))
    page = out.read_text()
    assert page.count("<svg") == 3 and page.index("By UTC day") < page.index("By tenant")
    assert "By operator" in page and "acme-gpus" in page


def test_report_command_in_process_names_a_bad_day(redis_server, redis_prefix):
    parser = argparse.ArgumentParser()
    report_options(parser)
    with pytest.raises(ValueError, match="^--since: expected a UTC day"):
        run_report(parser.parse_args(["--since", "June", "--redis-url", redis_server.url]))


async def _bill(url: str, prefix: str) -> None:
    store = RedisStore(url, prefix)
    try:
        await bill_everything(store)
    finally:
        await store.close()


def test_sparkgrid_report_subprocess_every_format_and_a_bad_day(redis_server, redis_prefix,
                                                                tmp_path):
    asyncio.run(_bill(redis_server.url, redis_prefix))
    sparkgrid = str(Path(sys.executable).with_name("sparkgrid"))
    common = ["report", "--since", DAY1, "--until", DAY2, "--redis-url", redis_server.url,
              "--redis-prefix", redis_prefix]
    expected = {"table": f"UTC days {DAY1} to {DAY2}", "csv": "since,until",
                "json": '"timezone": "UTC"', "html": "<svg"}
    for fmt, text in expected.items():
        done = subprocess.run([sparkgrid, *common, "--format", fmt], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert text in done.stdout and "acme" in done.stdout, fmt
    by_operator = subprocess.run([sparkgrid, *common, "--by", "operator"], capture_output=True,
                                 text=True, timeout=120)
    assert by_operator.returncode == 0, by_operator.stderr
    assert "acme-gpus" in by_operator.stdout and "failed_audits" in by_operator.stdout
    bad = subprocess.run([sparkgrid, "report", "--since", "2025-02-30", "--redis-url",
                          redis_server.url], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "since" in bad.stderr and "Traceback" not in bad.stderr
