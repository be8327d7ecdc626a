"""Cost tables by tokens: what a worker profiles and the router and the engine both read.

`SPSTable` is SPS(B), target forwards per second by the tokens B of one forward, as a worker
measured it. The engine's verify-length policy plans every step with it (on tensors); the
router predicts a worker's throughput with it (on floats), so it lives here, free of torch.
`piecewise_linear` is the one interpolation rule of every profiled table in the project.

Knows: interpolation, field checks. Does not know: how a table was measured, tensors (it
works on anything with arithmetic and `clip`: a float, a numpy array or a torch tensor).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass


def piecewise_linear(xs: list[float], ys: list[float], x):
    """y(x) through the points (xs strictly increasing): linear between two points; before the
    first, the first segment; past the last, the last slope, but never a negative one (a noisy
    profile must not predict that more work takes less time). One point: flat.

    `x` is a number, or an array (a float64 numpy array or torch tensor) for many at once: the
    line is written as a sum of hinges, one per segment, so that it needs only arithmetic and
    `clip`, and this one rule serves the router (floats) and the engine (arrays) alike."""
    if hasattr(x, "clip"):
        def hinge(at, low, high):
            return (x - at).clip(min=low, max=high)
    else:
        def hinge(at, low, high):
            return _clamped(x - at, low, high)
    y = x * 0.0 + ys[0]
    slope = 0.0
    for i in range(len(xs) - 1):
        slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
        # segment i: its slope across its width; the first one extends before the first point
        y = y + slope * hinge(xs[i], None if i == 0 else 0, xs[i + 1] - xs[i])
    return y + max(slope, 0.0) * hinge(xs[-1], 0, None)  # past the last point


def _clamped(v: float, low, high) -> float:
    if low is not None and v < low:
        return low
    if high is not None and v > high:
        return high
    return v


def json_object(text: str, name: str, fields: tuple[str, ...]) -> dict:
    """`text` parsed as a JSON object with exactly `fields`; a ValueError naming `name`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} JSON is not valid JSON: {err}") from None
    if not isinstance(data, dict) or set(data) != set(fields):
        raise ValueError(f"{name} JSON must be an object with exactly the keys "
                         f"{', '.join(map(repr, fields))}; got {text[:200]!r}")
    return data


@dataclass(frozen=True)
class SPSTable:
    """Target forward steps per second as a function of the tokens in the forward.

    Between profiled points the step *time* (1 / sps) is interpolated linearly; past the last
    point it is extrapolated from the last two points, with a slope clamped at 0
    (`piecewise_linear`). A one-point table is flat.
    """

    batch_tokens: list[int]
    """Strictly increasing token counts, the first one 1."""
    steps_per_second: list[float]
    """Measured target forwards per second at each count."""

    def __post_init__(self) -> None:
        tokens, sps = self.batch_tokens, self.steps_per_second
        if not isinstance(tokens, (list, tuple)) or not isinstance(sps, (list, tuple)):
            raise ValueError("SPSTable batch_tokens and steps_per_second must be lists; got "
                             f"{type(tokens).__name__} and {type(sps).__name__}")
        if not tokens or len(tokens) != len(sps):
            raise ValueError(
                "SPSTable needs batch_tokens and steps_per_second of equal, non-zero length; "
                f"got {len(tokens)} and {len(sps)}")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in tokens):
            raise ValueError(f"SPSTable batch_tokens must be integers; got {tokens}")
        if tokens[0] != 1 or any(b <= a for a, b in zip(tokens, tokens[1:])):
            raise ValueError(
                f"SPSTable batch_tokens must start at 1 and strictly increase; got {tokens}")
        if any(isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)
               or s <= 0 for s in sps):
            raise ValueError(f"SPSTable steps_per_second must be finite and positive; got {sps}")

    def __call__(self, num_tokens: float) -> float:
        """Predicted steps per second for a forward of `num_tokens` (>= 1) tokens."""
        if num_tokens < 1:
            raise ValueError(f"SPSTable covers forwards of >= 1 token; got {num_tokens}")
        return 1.0 / piecewise_linear(self.batch_tokens, self._times(), num_tokens)

    def step_time(self, num_tokens):
        """Predicted seconds per forward for each entry of `num_tokens` (counts >= 1: a torch
        tensor, float64 on the CPU comes back; or a float64 numpy array, the engine's planning
        arithmetic, ~10x cheaper than torch on a few dozen numbers)."""
        tokens = num_tokens.double().cpu() if hasattr(num_tokens, "double") else num_tokens
        if tokens.reshape(-1).shape[0] and float(tokens.min()) < 1:
            raise ValueError(f"SPSTable covers forwards of >= 1 token; got {float(tokens.min())}")
        return piecewise_linear(self.batch_tokens, self._times(), tokens)

    def _times(self) -> list[float]:
        return [1.0 / s for s in self.steps_per_second]

    def at_rows(self, rows: int) -> "SPSTable":
        """The cost of a forward of `rows` sequences by its tokens: this table itself, which
        knows only tokens (the engine's `RowCostTable` also knows sequences)."""
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SPSTable":
        data = json_object(text, "SPSTable", ("batch_tokens", "steps_per_second"))
        return cls(data["batch_tokens"], data["steps_per_second"])
