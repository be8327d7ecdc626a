"""`piecewise_linear`, the one interpolation of every profiled table: floats (the router) and
tensors (the engine) get the same line, and the line is the rule its docstring states."""

from __future__ import annotations

import bisect
import random

import pytest
import torch

from sparkgrid.costs import SPSTable, piecewise_linear


def _by_segments(xs, ys, x):
    """The rule, written the direct way: find the segment, extend the first one backwards and
    the last one forwards (never with a negative slope)."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    if x > xs[-1]:
        return ys[-1] + max(slope, 0.0) * (x - xs[-1])
    return ys[i] + slope * (x - xs[i])


def test_floats_and_tensors_follow_the_stated_rule():
    rng = random.Random(0)
    for _ in range(500):
        xs = sorted(rng.sample(range(1, 200), rng.randint(1, 6)))
        ys = [rng.uniform(0.1, 5) for _ in xs]
        points = [rng.uniform(-10, 300) for _ in range(16)] + list(xs)
        expected = [_by_segments(xs, ys, p) for p in points]
        assert [piecewise_linear(xs, ys, p) for p in points] == pytest.approx(expected, abs=1e-9)
        tensor = piecewise_linear(xs, ys, torch.tensor(points, dtype=torch.float64))
        assert tensor.tolist() == pytest.approx(expected, abs=1e-9)


def test_past_the_last_point_time_never_shrinks():
    assert piecewise_linear([1, 10], [5.0, 2.0], 100) == 2.0
    assert piecewise_linear([1, 10], [2.0, 5.0], 19) == pytest.approx(8.0)


def test_the_router_and_the_engine_read_one_table_alike():
    table = SPSTable([1, 8, 64], [100.0, 80.0, 20.0])
    counts = [1, 3, 8, 30, 64, 200]
    engine = (1.0 / table.step_time(torch.tensor(counts))).tolist()
    assert engine == pytest.approx([table(c) for c in counts], rel=1e-12)
