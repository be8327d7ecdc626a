"""The profiled cost tables on disk, and kept from going stale in one direction: slow.

`profiler` measures each table once and caches it here, per device, model, dtype, attention
code and grid, so a restart reads it back instead of measuring again. A table measured while
the machine was slowed (a neighbour's load, a process just started) would then steer every
later choice of the draft gate and Alg. 1, and they weigh tables against one another: on a
2-core CPU the drafting step overhead was cached at 5.1 ms a step where it ran in 3.2, and
the gate kept requests that would have gained from drafting plain for dozens of steps.

So a cached table is checked on reading: its first point (one row, or one token: the
cheapest) is timed again (`spot`), and where the cached time exceeds the fresh one by more
than `SLOWED`, the table is measured again and each point keeps the faster of the two
(`faster`). Other work only ever adds time, so the faster figure is the nearer to the
machine's own; the tables can only come nearer to it. A table read back within the margin
is used as it is.

Knows: files, `SPSTable` and `RowCostTable`. Does not know: how a table is measured.
"""

from __future__ import annotations

from pathlib import Path

from sparkgrid.costs import SPSTable
from worker.engine.verify_policy import RowCostTable

SLOWED = 1.25
"""How many times the fresh time of its first point a cached table's may be before the table
is measured again (timings on a busy 2-core machine move 5-15% from run to run)."""


def cached_table(cache_dir: str | None, name: str, build, table_type=SPSTable, spot=None):
    """The table cached as `name`, or `build()` written there (atomically) first. `spot()`,
    where given, measures the table's first point alone (a table of one point, or the whole
    table where it has one): a cached table whose first point is slower than that by more
    than `SLOWED` is measured again and merged (`faster`)."""
    root = Path(cache_dir or Path.home() / ".cache" / "sparkgrid" / "sps")
    path = root / name
    cached = None
    if path.exists():
        try:
            cached = table_type.from_json(path.read_text())
        except ValueError:
            pass  # a damaged cache file is re-measured and overwritten
    if cached is not None:
        if spot is None or first_seconds(cached) <= SLOWED * first_seconds(spot()):
            return cached
        table = faster(cached, build())
    else:
        table = build()
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(table.to_json())
    tmp.replace(path)
    return table


def first_seconds(table: SPSTable | RowCostTable) -> float:
    """Seconds at a table's first point (for a `RowCostTable`, of its one-token forward)."""
    if isinstance(table, RowCostTable):
        return table.plain_seconds[0]
    return 1.0 / table.steps_per_second[0]


def faster(old: SPSTable | RowCostTable, new: SPSTable | RowCostTable):
    """`new`, each point the faster of it and `old`'s where both measured the same grid
    (a point-wise minimum of times keeps them monotone, and a full forward no faster than a
    plain one); `new` alone where the grids differ."""
    if isinstance(new, RowCostTable):
        if not isinstance(old, RowCostTable) or (old.rows, old.gamma) != (new.rows, new.gamma):
            return new
        return RowCostTable(rows=new.rows, gamma=new.gamma,
                            plain_seconds=[min(a, b) for a, b in zip(old.plain_seconds,
                                                                     new.plain_seconds)],
                            full_seconds=[min(a, b) for a, b in zip(old.full_seconds,
                                                                    new.full_seconds)])
    if not isinstance(old, SPSTable) or old.batch_tokens != new.batch_tokens:
        return new
    return SPSTable(batch_tokens=new.batch_tokens,
                    steps_per_second=[max(a, b) for a, b in zip(old.steps_per_second,
                                                                new.steps_per_second)])
