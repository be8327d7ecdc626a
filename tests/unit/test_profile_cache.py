"""Cost tables cached on disk: read back while they hold, measured again where a fresh timing of
their first point shows they were taken on a slowed machine, each point then the faster."""

from __future__ import annotations

import pytest

from sparkgrid.costs import SPSTable
from worker.engine.profile_cache import SLOWED, cached_table, faster
from worker.engine.verify_policy import RowCostTable


def _sps(times: list[float]) -> SPSTable:
    return SPSTable(batch_tokens=[1, 2, 4][:len(times)], steps_per_second=[1 / t for t in times])


class _Calls:
    """A measurement stand-in that counts its calls and gives the tables it is handed."""

    def __init__(self, *tables):
        self.tables, self.calls = list(tables), 0

    def __call__(self):
        self.calls += 1
        return self.tables.pop(0)


def test_a_table_is_measured_once_and_read_back_while_a_spot_check_agrees(tmp_path):
    build = _Calls(_sps([0.010, 0.012, 0.020]))
    first = cached_table(str(tmp_path), "t.json", build, spot=_Calls())
    assert build.calls == 1 and (tmp_path / "t.json").is_file()
    # the first point measured again a little faster, within the margin: the cache serves
    spot = _Calls(_sps([0.010 / (0.9 * SLOWED)]))
    again = cached_table(str(tmp_path), "t.json", _Calls(), spot=spot)
    assert again == first and spot.calls == 1


def test_a_table_cached_from_a_slowed_machine_is_measured_again_each_point_the_faster(tmp_path):
    cached_table(str(tmp_path), "t.json", _Calls(_sps([0.020, 0.012, 0.040])))
    build = _Calls(_sps([0.010, 0.015, 0.030]))  # faster at 1 and 4, slower at 2
    spot = _Calls(_sps([0.010]))  # the cached first point took twice as long
    merged = cached_table(str(tmp_path), "t.json", build, spot=spot)
    assert build.calls == 1
    assert [round(1 / s, 6) for s in merged.steps_per_second] == [0.010, 0.012, 0.030]
    # written back: the next reading (a spot check that agrees) gives the merged table
    assert cached_table(str(tmp_path), "t.json", _Calls(), spot=_Calls(_sps([0.010]))) == merged


def test_a_damaged_cache_file_is_measured_again(tmp_path):
    (tmp_path / "t.json").write_text("{not json")
    build = _Calls(_sps([0.010]))
    assert cached_table(str(tmp_path), "t.json", build, spot=_Calls()) == _sps([0.010])
    assert build.calls == 1


def test_row_cost_tables_merge_point_by_point_and_other_grids_are_replaced():
    old = RowCostTable(rows=[1, 4], plain_seconds=[0.002, 0.004], full_seconds=[0.003, 0.009],
                       gamma=6)
    new = RowCostTable(rows=[1, 4], plain_seconds=[0.001, 0.005], full_seconds=[0.004, 0.006],
                       gamma=6)
    merged = faster(old, new)
    assert merged.plain_seconds == [0.001, 0.004] and merged.full_seconds == [0.003, 0.006]
    other = RowCostTable(rows=[1, 2], plain_seconds=[0.003, 0.004],
                         full_seconds=[0.005, 0.006], gamma=6)
    assert faster(old, other) == other
    assert faster(_sps([0.01, 0.02]), _sps([0.02, 0.01, 0.03])) == _sps([0.02, 0.01, 0.03])


@pytest.mark.parametrize("kind", ["sps", "rows"])
def test_a_slowed_first_point_is_judged_by_its_seconds(tmp_path, kind):
    """Row tables compare their one-token forwards; token tables their first point."""
    if kind == "rows":
        def table(t):
            return RowCostTable(rows=[1], plain_seconds=[t], full_seconds=[2 * t], gamma=6)
        table_type = RowCostTable
    else:
        table, table_type = (lambda t: _sps([t])), SPSTable
    cached_table(str(tmp_path), "t.json", _Calls(table(0.010)), table_type)
    within = _Calls()
    assert cached_table(str(tmp_path), "t.json", within, table_type,
                        spot=_Calls(table(0.010 / SLOWED * 1.01))) == table(0.010)
    assert within.calls == 0
    beyond = _Calls(table(0.004))
    assert cached_table(str(tmp_path), "t.json", beyond, table_type,
                        spot=_Calls(table(0.010 / SLOWED * 0.99))) == table(0.004)
    assert beyond.calls == 1


def test_an_engines_cost_tables_travel_as_json_and_bad_ones_are_named():
    """What a worker reports (`costs`) reads back into the same tables; a table that is not
    one is refused naming it."""
    import json

    from worker.engine.online_costs import StepOverhead
    from worker.engine.profiler import EngineCosts

    rows = RowCostTable(rows=[1, 8], plain_seconds=[0.01, 0.02], full_seconds=[0.02, 0.05],
                        gamma=6)
    costs = EngineCosts(_sps([0.01, 0.012]), rows, SPSTable([1, 4], [300.0, 120.0]),
                        StepOverhead(None, SPSTable([1], [900.0])), SPSTable([1], [5000.0]))
    back = EngineCosts.from_json(costs.to_json())
    assert (back.sps, back.step_cost, back.draft_cost, back.flush_cost) == (
        costs.sps, rows, costs.draft_cost, costs.flush_cost)
    assert back.overhead.plain is None and back.overhead.drafting == costs.overhead.drafting
    assert EngineCosts.from_json(EngineCosts().to_json()).sps is None
    data = json.loads(costs.to_json())
    data["draft_cost"]["batch_tokens"] = [2, 1]
    with pytest.raises(ValueError, match="draft_cost"):
        EngineCosts.from_json(json.dumps(data))
    with pytest.raises(ValueError, match="EngineCosts"):
        EngineCosts.from_json('{"sps": null}')
