"""Which regime greedy `prefix` steps run in at each load, from what each has really given.

The draft gate (`draft_gate.DraftGate`) picks the requests that draft in a step from profiled
tables and survival estimates. Far from the load where drafting stops paying, their errors do
not matter; near it they decide. On a 2-core CPU (Intel, AMX) where, with 16 and 32 requests,
plain decoding (`ar`) ran 1.0x and 1.15x drafting every step (`fixed`), the gate drafted in
part of its steps (tau 1.1-3.1) and `prefix` ran 0.89x and 0.86x the better of the two
(medians of 6 interleaved repeats; at 32 requests below in all six).

So greedy `prefix` steps run in windows of `window` steps (after a change of regime, `settle`
steps more, not measured), each window in one of three regimes: GATE (the draft gate chooses,
and Alg. 1 the verify lengths, as always), PLAIN (nobody drafts; requests keep their draft
context, so drafting can resume) or FULL (every request drafts and verifies its whole block,
as `fixed` does). FULL is there because on a CPU a verified token costs little next to the
draft pass: at 4 and 16 requests on a 2-core CPU the gate and Alg. 1 left out rows and cut
blocks (tau 5.27-5.56 against `fixed`'s 5.62, 2-8% more steps), and `prefix` ran 0.96x
`fixed` there in 10 of 10 repeats. Each window's tokens per second (the decode's committed
tokens over the decode's seconds, the newcomers' prefill left out) update a running mean of
log throughput per regime and per load: the requests running and waiting when a step is
planned (at most `max_num_seqs`), in powers of two. A window's first steps after the other
regime ran are slow (at 16 requests on a 2-core CPU, plain steps after drafting ones took
5.3 ms at first and 4.0-4.2 after 10-15 steps: caches hold the drafter's work), so those are
left out of its measure: with them, plain windows measured 20% below plain decoding and
drafting won a load where it lost (`prefix` 0.96x the better of `ar` and `fixed` there, 10 of
10 repeats below). Nor are steps with a dormant `prefix` row (`StepPlan.measured`): it
runs plain whatever the regime. A drafting window's rows count at what its regime has
committed a row over all its windows so far, not at what this window's text let them commit:
at one request, 16-step windows of whole blocks gave 320 to 1,150 tokens/s by their text, and
an unlucky pair had put drafting within the margin of plain decoding. Loads are not the
step's rows: drafting requests
finish at different steps, so a step at a load of 16 often runs 13-15 rows, and those steps
belong to the regime that caused them. After one window of each, the best regime runs;
a drafting regime (the better of GATE and FULL; GATE only where it gave `gate_margin`
times FULL's) is the better only where it gave `margin` times PLAIN's tokens per second, since
drafting costs beyond its windows that no window measures (requests drift apart: slots wait
for the next admission, newcomers are prefilled one by one, the last requests of a batch
finish one by one at a low load). The others get one window again (in turn) after
`explore_every` windows, an interval that doubles up to `max_explore_every` (grows four
times up to `max_explore_far` where one leads by `FAR`) each time the better one stays
better, and starts again when they swap. So a load where drafting loses costs a window now
and then, and a load where it wins by far (few requests) a plain window in up to
`max_explore_far`: at 4 requests on a 2-core CPU, where drafting gave 1.6x, a plain window in
64 cost 1.3% of the tokens. Where PLAIN has been confirmed so
(`settled_plain`), the planner lets requests stop keeping a draft context, as where the
gate's bounds rule drafting out. A load above it that has not yet tried every regime starts
there too, plain and settled, without trying the others (`_inherits`): drafting pays less the
more requests share a step. So does a new load where the cost tables, at the tokens a
drafting row committed at the nearest lower load, forecast drafting within the margin of
plain decoding (`forecast`, `_foresees_plain`): its windows could only confirm it.

Lossless: a step's regime is fixed before its draft pass, from earlier steps' timings, and
only decides who drafts and how many of their draft tokens are verified; verification
never sees it. It steers greedy steps only
(their tokens do not depend on who drafts); a step with a sampled request keeps the gate's
choice, whose schedule of random draws depends on the tables and the requests alone, so a
seed's text repeats.
Knows: loads, steps' tokens and seconds. Does not know: models, requests or tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

GATE, PLAIN, FULL = "gate", "plain", "full"
DRAFTING = (GATE, FULL)
ALL = (GATE, PLAIN, FULL)
FAR = 1.25
"""A lead (ratio of the regimes' tokens per second) beyond which the other regime is tried
four times as rarely each time (else twice)."""


@dataclass
class _Load:
    """One load's windows: the regime running now and what each regime has given."""

    bucket: int = 0  # floor(log2(load))
    regime: str = GATE
    steps_left: int = 0
    settle_left: int = 0  # steps of this window still to run before its measure begins
    tokens: int = 0
    rows: int = 0  # rows decoded in this window's measured steps, summed over its steps
    seconds: float = 0.0
    yield_tokens: dict[str, int] = field(default_factory=dict)  # regime -> all its tokens
    yield_rows: dict[str, int] = field(default_factory=dict)  # ... over all its rows
    mean: dict[str, float] = field(default_factory=dict)  # regime -> mean log tokens/s
    windows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ALL, 0))
    interval: int = 0  # windows of the best regime before another runs one again
    until_explore: int = 0  # of those, still to run
    explored: int = 0  # windows of the others so far (which one comes next, in turn)
    drafted: bool = False  # whether a draft pass ran in this window's measured steps
    foreseen: bool = False
    """Whether the tables forecast drafting within the margin of plain decoding here when the
    load was made (`Regimes.forecast`): it runs plain, settled, without windows of the others."""
    gate_idle: bool = False
    """Whether the gate drafted nobody in its last window: that was plain decoding (contexts
    kept), which shows drafting no better than plain, however fast it ran (at 64 requests
    such windows, measured above plain ones taken early and cold, kept every context: 0.97x
    `ar`)."""

    def better(self, margin: float, gate_margin: float) -> str:
        """The drafting regime to run where either drafting regime's mean is more than
        `margin` (a log) above PLAIN's (or PLAIN has none), else PLAIN. Of the two drafting
        regimes, GATE runs where its mean is more than `gate_margin` (a log) above FULL's, or
        while FULL has none."""
        mean, plain = self.mean, self.mean.get(PLAIN)
        gate = mean.get(GATE, -math.inf)
        if self.gate_idle and plain is not None:  # (asked every step: no copy of the means)
            gate = min(gate, plain)
        full = mean.get(FULL, -math.inf)
        drafting = GATE if gate > full + gate_margin else FULL
        value = max(gate, full)  # drafting has paid where either of its regimes has
        if plain is None:
            return drafting
        return drafting if value > plain + margin else PLAIN

    def far_apart(self, a: str, b: str) -> bool:
        """Whether regimes `a` and `b` are both measured and one leads the other by `FAR`."""
        return (a in self.mean and b in self.mean
                and abs(self.mean[a] - self.mean[b]) >= math.log(FAR))


class Regimes:
    """Per load (1, 2-3, 4-7, ... requests running and waiting), the regime greedy `prefix`
    steps run in now, and what each has given (`regime`, `observe`)."""

    def __init__(self, *, window: int = 16, settle: int = 8, explore_every: int = 4,
                 max_explore_every: int = 64, max_explore_far: int = 256,
                 smoothing: float = 0.3, margin: float = 1.1, gate_margin: float = 1.05,
                 regimes: tuple[str, ...] = ALL):
        if isinstance(settle, bool) or not isinstance(settle, int) or settle < 0:
            raise ValueError(f"settle: expected an integer >= 0, got {settle!r}")
        if (not isinstance(regimes, (tuple, list)) or len(set(regimes)) != len(regimes)
                or not {GATE, PLAIN} <= set(regimes) <= set(ALL)):
            raise ValueError(f"regimes: expected {GATE!r} and {PLAIN!r}, and {FULL!r} or not, "
                             f"each once; got {regimes!r}")
        for name, value in (("window", window), ("explore_every", explore_every),
                            ("max_explore_every", max_explore_every),
                            ("max_explore_far", max_explore_far)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        for name, value, floor, floor_name in (
                ("max_explore_every", max_explore_every, explore_every, "explore_every"),
                ("max_explore_far", max_explore_far, max_explore_every, "max_explore_every")):
            if value < floor:
                raise ValueError(f"{name}: expected at least {floor_name} ({floor}), "
                                 f"got {value}")
        if not (isinstance(smoothing, (int, float)) and 0 < smoothing <= 1):
            raise ValueError(f"smoothing: expected a number in (0, 1], got {smoothing!r}")
        for name, value in (("margin", margin), ("gate_margin", gate_margin)):
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not 1.0 <= value < math.inf):
                raise ValueError(f"{name}: expected a number >= 1, got {value!r}")
        self.order = tuple(r for r in ALL if r in regimes)
        """The regimes that compete, in the order a new load first tries them."""
        self.margin = float(margin)
        """How many times PLAIN's tokens per second a drafting regime must have given to be
        the better (its costs outlast its windows). Without one, at 16 requests on a 2-core
        CPU the two regimes' windows gave within 4% of each other, `prefix` drafted in part
        of its windows, and ran 0.83-1.05x the better of `ar` and `fixed` (6 repeats)."""
        self.gate_margin = float(gate_margin)
        """How many times FULL's tokens per second GATE must have given to be the better
        drafting regime. Where both draft, a window's tokens per second follow its text more
        than its regime (at one request on a 2-core CPU, 16-step windows of FULL gave 320 to
        1,150 tokens/s), so a near tie is noise; on a CPU it goes to whole blocks, since a
        verified token costs little next to the draft pass (at one request GATE took 2%
        more steps than `fixed` for the same tokens, at 4 requests up to 10%)."""
        self._margins = (math.log(self.margin), math.log(self.gate_margin))
        self.window, self.settle, self.smoothing = window, settle, float(smoothing)
        self.explore_every, self.max_explore_every = explore_every, max_explore_every
        self.max_explore_far = max_explore_far
        """The interval's cap where the best regime leads the one tried by `FAR`: the
        other's windows cost more there, and it is less likely to have become the better."""
        self.loads: dict[int, _Load] = {}
        """load bucket (floor(log2(load))) -> its windows."""
        self.plain_steps = 0
        """Steps run in the PLAIN regime."""
        self.forecast: Callable[[int, float], float | None] | None = None
        """What the cost tables forecast for a load of `demand` requests all drafting whole
        blocks, each committing `tokens_per_row` a step: its tokens per second as a multiple of
        plain decoding's (the planner's, `Planner.drafting_outlook`); None (or a None answer):
        no forecast, the load tries every regime."""

    def regime(self, demand: int) -> str:
        """The regime of the next step planned at a load of `demand` (requests running and
        waiting): GATE, PLAIN or FULL."""
        return self._load(demand).regime

    def _load(self, demand: int) -> _Load:
        """The load of `demand`, made on first sight; one that has not yet measured every
        regime runs PLAIN while it inherits (`_inherits`)."""
        bucket = _bucket(demand)
        load = self.loads.get(bucket)
        if load is None:
            load = self.loads[bucket] = _Load(bucket=bucket, steps_left=self.window,
                                              settle_left=self.settle)
            if self._foresees_plain(load):
                load.foreseen, load.regime = True, PLAIN
        if load.regime != PLAIN and self._inherits(load):  # a lower load settled since
            load.regime, load.settle_left = PLAIN, self.settle
            self._new_window(load)
        return load

    def _new_window(self, load: _Load) -> None:
        """Start `load`'s next window: nothing measured yet, `window` steps to run."""
        load.tokens, load.rows, load.seconds, load.steps_left = 0, 0, 0.0, self.window
        load.drafted = False

    def _foresees_plain(self, load: _Load) -> bool:
        """Whether, at the fewest requests of a new load (the bucket's lower bound, where
        drafting pays most), the tables (`forecast`) put drafting in whole blocks within
        `margin` of plain decoding, at the tokens a drafting row committed at the nearest
        lower load that tried every regime (the better of its drafting regimes). Windows
        there could choose drafting only where it ran further above its tables than the
        margin, and each drafting window costs its load: at 16 requests on a 2-core CPU,
        where the tables forecast 1.05x (and whole runs of `fixed` gave 0.97x `ar`), the
        first run's windows, and the newcomers they scattered, cost `prefix` a tenth of that
        run (0.88x `ar`)."""
        near = self._nearest_below(load, self._tried_all)
        if self.forecast is None or near is None:
            return False
        yields = [near.yield_tokens[r] / near.yield_rows[r] for r in DRAFTING
                  if near.yield_rows.get(r)]
        gain = self.forecast(1 << load.bucket, max(yields)) if yields else None
        return gain is not None and gain < self.margin

    def _inherits(self, load: _Load) -> bool:
        """Whether `load` has not yet measured every regime and the nearest lower load that
        has is settled on plain decoding (`_settled`): drafting pays less the more requests
        share a step (its verify rows cost more where the forward is bound by compute, and the
        draft pass runs for more rows), so a load above one where drafting lost twice starts
        where that one ended, without a window of each regime. On a 2-core CPU those windows
        cost the first run at 64 requests a tenth of its throughput (0.90x `ar`), after 32
        requests had settled on plain decoding."""
        if self._tried_all(load) or load.foreseen:
            return False
        near = self._nearest_below(load, lambda other: self._tried_all(other) or other.foreseen)
        return near is not None and self._settled(near)

    def _nearest_below(self, load: _Load, has_verdict) -> _Load | None:
        """The highest load below `load` for which `has_verdict(other)` holds, or None."""
        lower = [b for b, other in self.loads.items() if b < load.bucket and has_verdict(other)]
        return self.loads[max(lower)] if lower else None

    def observe(self, demand: int, regime: str, tokens: int, seconds: float,
                drafted: bool = True, rows: int | None = None) -> None:
        """A step planned at `demand` in `regime` committed `tokens` in `seconds` (its
        decode) over `rows` decoding rows (None: as many as `tokens`, one token a row);
        `drafted`: a draft pass ran in it. A step of another regime than the one its load
        runs now, or with a count or a time that cannot be one (negative, not finite, no
        time), teaches nothing."""
        load = self.loads.get(_bucket(demand))
        rows = tokens if rows is None else rows
        if (load is None or regime != load.regime
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 0
                       for n in (tokens, rows))
                or not 0 < seconds < math.inf):
            return
        if regime == PLAIN:
            self.plain_steps += 1
        if load.settle_left > 0:  # the regime changed a few steps ago: not yet its own pace
            load.settle_left -= 1
            return
        load.tokens += tokens
        load.rows += rows
        load.seconds += seconds
        load.drafted = load.drafted or drafted
        load.steps_left -= 1
        if load.steps_left <= 0:
            self._close_window(load)

    def settled_plain(self, demand: int) -> bool:
        """Whether plain decoding runs at the load of `demand` and a window of another regime
        since the first verdict has confirmed it (its interval has grown past
        `explore_every`), or the load inherits that from a lower one (`_inherits`): where
        drafting keeps losing, requests need not keep a draft context (`Planner._dormancy`)."""
        load = self._load(demand)
        return self._settled(load) or self._inherits(load)

    def _settled(self, load: _Load) -> bool:
        """Whether `load` has settled on plain decoding: foreseen (`_foresees_plain`) and
        running PLAIN, or by its own windows: PLAIN runs, and a window of another regime since
        the first verdict has confirmed it. (Asking also that PLAIN lead every drafting
        regime, not only that drafting fall short of the margin, kept 16-64 requests on a
        2-core CPU from settling: whole-block windows there gave more than the margin now and
        then, while whole runs of `fixed` gave 0.98x `ar`, and `prefix` drafted in most runs,
        0.95x `ar`.)"""
        if load.foreseen:
            return load.regime == PLAIN
        return (self._tried_all(load) and load.regime == PLAIN
                and load.better(*self._margins) == PLAIN
                and load.interval > self.explore_every)

    def _tried_all(self, load: _Load) -> bool:
        """Whether every competing regime has run a measured window at `load`."""
        return len(load.mean) == len(self.order)

    def means(self, demand: int) -> dict[str, float]:
        """Each regime's mean tokens/s at the load of `demand`, as far as measured."""
        load = self.loads.get(_bucket(demand))
        return {k: math.exp(v) for k, v in load.mean.items()} if load else {}

    def _close_window(self, load: _Load) -> None:
        """Fold the window just run into its regime's mean and pick the next window's (the
        first `settle` steps of a window in another regime than the last are not measured,
        unless the two are far apart)."""
        ran = load.regime
        self._next_window(load)
        changed = load.regime != ran
        load.settle_left = self.settle if changed and not load.far_apart(ran, load.regime) else 0

    def _next_window(self, load: _Load) -> None:
        ran, before = load.regime, load.better(*self._margins)
        explored = self._tried_all(load) and ran != before
        if load.tokens > 0 and load.rows > 0:
            # tokens a row per step follow the text (how far its drafts are accepted) more
            # than the regime: the window counts its rows at what its regime has committed a
            # row over all its windows so far (a plain row commits one token anyway)
            all_tokens = load.yield_tokens[ran] = load.yield_tokens.get(ran, 0) + load.tokens
            all_rows = load.yield_rows[ran] = load.yield_rows.get(ran, 0) + load.rows
            sample = math.log(load.rows * (all_tokens / all_rows) / load.seconds)
            old = load.mean.get(ran)
            load.mean[ran] = sample if old is None else old + self.smoothing * (sample - old)
            load.windows[ran] += 1
            if ran == GATE:
                load.gate_idle = not load.drafted
        self._new_window(load)
        missing = [r for r in self.order if r not in load.mean]
        if missing:  # each regime runs a window before any is chosen (unless it inherits)
            load.regime = PLAIN if load.foreseen or self._inherits(load) else missing[0]
            return
        best = load.better(*self._margins)
        if explored or load.interval == 0:
            # another regime's window (or the first of each) is in: the best one runs for an
            # interval that grows while it stays the best, and starts over when not (four
            # times as long where it leads the one tried by far: at one request drafting
            # gives 1.5x, and each plain window costs a few percent of a short run; where
            # drafting leads plain so, the first interval is four times as long too: where
            # it fails a request, the gate leaves that one out anyway)
            if explored and best == before:
                far = load.far_apart(best, ran)
                grow, cap = (4, self.max_explore_far) if far else (2, self.max_explore_every)
                load.interval = min(grow * load.interval, cap)
            else:
                far = (load.interval == 0 and best in DRAFTING
                       and load.far_apart(best, PLAIN))
                load.interval = (min(4 * self.explore_every, self.max_explore_far) if far
                                 else self.explore_every)
            load.until_explore = load.interval
            load.regime = best
            return
        load.until_explore -= 1
        if load.until_explore > 0:
            load.regime = best
            return
        others = [r for r in self.order if r != best]
        load.regime = others[load.explored % len(others)]
        load.explored += 1


def _bucket(demand: int) -> int:
    """The load bucket of `demand` requests: floor(log2(demand))."""
    return max(demand, 1).bit_length() - 1
