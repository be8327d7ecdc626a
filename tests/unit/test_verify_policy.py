"""DSpark Algorithm 1, the static policies, SPSTable, and the Appendix A losslessness example."""

import json

import pytest
import torch

from sparkgrid.costs import SPSTable
from worker.engine.rejection import verify
from worker.engine.sampling import sample
from worker.engine.verify_policy import (
    Policy,
    RowCostTable,
    drafting_pays,
    fixed_lengths,
    parse_policy,
    prefix_lengths,
    threshold_lengths,
)


def _table_from_times(times: list[float]) -> SPSTable:
    """A table whose forward of i tokens (i = 1, 2, ...) takes times[i-1] seconds."""
    return SPSTable(list(range(1, len(times) + 1)), [1.0 / t for t in times])


def _reference_algorithm_1(survival, sps, extra_tokens=0, extra_tau=0.0, early_stop=True):
    """Algorithm 1 as printed in docs/DSPARK.md section 3, one candidate at a time."""
    num_requests, gamma = survival.shape
    cands = sorted(
        ((float(survival[r, j]), r, j + 1) for r in range(num_requests) for j in range(gamma)),
        key=lambda c: (-c[0], c[1], c[2]),
    )
    tokens, tau = num_requests + extra_tokens, num_requests + extra_tau
    best = tau * sps(tokens)
    lengths = [0] * num_requests
    admitted = []
    for a, r, j in cands:
        tokens += 1
        tau += a
        theta = tau * sps(tokens)
        admitted.append((r, j))
        if theta > best:
            best = theta
            for rr, jj in admitted:
                lengths[rr] = max(lengths[rr], jj)
        elif early_stop:
            break
    return lengths


def test_algorithm_1_hand_computed_case():
    # base theta = 2 / 1.0 = 2.0; admitting a = 0.9, 0.8 gives 2.9 / 1.1 and 3.7 / 1.2 (both
    # rise); a = 0.5 gives 4.2 / 1.8 = 2.33, a drop, so the scan stops with one token each.
    sps = _table_from_times([0.9, 1.0, 1.1, 1.2, 1.8, 2.0])
    survival = torch.tensor([[0.9, 0.5], [0.8, 0.2]])
    assert prefix_lengths(survival, sps).tolist() == [1, 1]
    assert prefix_lengths(survival, sps, early_stop=False).tolist() == [1, 1]


def test_extra_tokens_and_tau_shift_the_operating_point():
    # One request; two more requests in the batch use another policy (3 tokens, tau 2.5).
    # Alone: base 1 / 1.0, admitting a = 0.6 gives 1.6 / 1.1 = 1.45 -> verify 1.
    # With extras: base (1 + 2.5) / t(4) = 3.5 / 1.2 = 2.92; admitting gives 4.1 / 2.0 = 2.05.
    sps = _table_from_times([1.0, 1.1, 1.15, 1.2, 2.0])
    survival = torch.tensor([[0.6]])
    assert prefix_lengths(survival, sps).tolist() == [1]
    assert prefix_lengths(survival, sps, extra_tokens=3, extra_tau=2.5).tolist() == [0]


def test_ties_are_admitted_by_request_then_position():
    # Four equal candidates; the cost allows exactly two more tokens (the third drops theta).
    sps = _table_from_times([1.0, 1.0, 1.0, 1.0, 5.0, 5.0])
    survival = torch.full((2, 2), 0.5)
    assert prefix_lengths(survival, sps).tolist() == [2, 0]


def test_flat_cost_admits_everything_with_positive_survival():
    sps = SPSTable([1], [100.0])
    survival = torch.tensor([[0.9, 0.3, 0.0], [0.2, 0.0, 0.0]])
    assert prefix_lengths(survival, sps).tolist() == [2, 1]


@pytest.mark.parametrize("early_stop", [True, False])
def test_matches_reference_transcription_and_admits_top_prefixes(early_stop):
    gen = torch.Generator().manual_seed(7)
    for trial in range(60):
        num_requests, gamma = int(torch.randint(1, 6, (1,), generator=gen)), 4
        # quantised confidences so ties across requests happen
        conf = torch.randint(0, 6, (num_requests, gamma), generator=gen).double() / 5
        survival = torch.cumprod(conf, dim=1)
        times = torch.cumsum(torch.rand(num_requests * gamma + 4, generator=gen) * 0.3, 0) + 1.0
        sps = _table_from_times(times.tolist())
        extra = int(trial % 3)
        got = prefix_lengths(survival, sps, extra_tokens=extra, extra_tau=0.5 * extra,
                             early_stop=early_stop)
        want = _reference_algorithm_1(survival, sps, extra, 0.5 * extra, early_stop)
        assert got.tolist() == want
        admitted = torch.arange(gamma)[None, :] < got[:, None]  # a prefix per request
        if admitted.any() and (~admitted).any():
            assert survival[admitted].min() >= survival[~admitted].max()


def test_non_monotone_survival_is_rejected():
    with pytest.raises(ValueError, match="non-increasing"):
        prefix_lengths(torch.tensor([[0.5, 0.6]]), SPSTable([1], [1.0]))


def test_empty_batch_and_zero_gamma_give_zero_lengths():
    assert prefix_lengths(torch.zeros(0, 3), SPSTable([1], [1.0])).tolist() == []
    assert prefix_lengths(torch.zeros(2, 0), SPSTable([1], [1.0])).tolist() == [0, 0]


def test_early_stop_keeps_target_distribution_appendix_a():
    """DSpark Appendix A: p = (0.7, 0.3) over {A, B}, q = (0.5, 0.5), c_1 = 0.5, c_2 = 0.9 after
    A and 0.1 after B; SPS(1) = 1, SPS(2) = SPS(3) = 0.6. Verifying one token never pays
    (1.5 x 0.6 < 1), two pay only after A (1.95 x 0.6 > 1). Without early stop the decision to
    verify depends on x_1 itself and the first token becomes (0.85, 0.15)."""
    p, q = torch.tensor([0.7, 0.3]), torch.tensor([0.5, 0.5])
    c2 = {0: 0.9, 1: 0.1}
    sps = SPSTable([1, 2, 3], [1.0, 0.6, 0.6])

    def lengths(early_stop: bool) -> dict[int, int]:
        return {x1: int(prefix_lengths(torch.tensor([[0.5, 0.5 * c2[x1]]]), sps,
                                       early_stop=early_stop)[0]) for x1 in (0, 1)}

    def exact_first_token(length: dict[int, int]) -> torch.Tensor:
        out = torch.zeros(2, dtype=torch.float64)
        residual = (p - q).clamp(min=0) / (p - q).clamp(min=0).sum()
        for x1 in (0, 1):
            if length[x1] == 0:
                out += q[x1] * p  # no verification: the token is sampled from p
            else:
                accept = min(1.0, float(p[x1] / q[x1]))
                out[x1] += q[x1] * accept
                out += q[x1] * (1 - accept) * residual
        return out

    assert lengths(True) == {0: 0, 1: 0}
    assert lengths(False) == {0: 2, 1: 0}
    torch.testing.assert_close(exact_first_token(lengths(True)),
                               torch.tensor([0.7, 0.3], dtype=torch.float64))
    torch.testing.assert_close(exact_first_token(lengths(False)),
                               torch.tensor([0.85, 0.15], dtype=torch.float64))

    # Monte Carlo through verify: 200k rows, std of a frequency <= 0.0011; tolerance 0.006
    # (over 5 sigma, false-failure rate below 1e-7).
    gen = torch.Generator().manual_seed(11)
    n = 200_000
    x = torch.stack([sample(q.repeat(n, 1), torch.rand(n, generator=gen)) for _ in range(2)], 1)
    target_probs = torch.stack([p, torch.tensor([0.5, 0.5]), torch.tensor([0.2, 0.8])])
    for early_stop, want in ((True, [0.7, 0.3]), (False, [0.85, 0.15])):
        table = lengths(early_stop)
        num_verify = torch.tensor([table[0], table[1]])[x[:, 0]]
        num_accepted, next_ids = verify(target_probs.expand(n, -1, -1), q.expand(n, 2, -1), x,
                                        num_verify, torch.rand(n, 2, generator=gen),
                                        torch.rand(n, generator=gen))
        first = torch.where(num_accepted >= 1, x[:, 0], next_ids)
        freq = torch.bincount(first, minlength=2).double() / n
        assert torch.allclose(freq, torch.tensor(want, dtype=torch.float64), atol=0.006)


def test_sps_table_interpolates_step_time_not_rate():
    sps = SPSTable([1, 3], [1.0, 0.5])  # 1 s at one token, 2 s at three
    assert sps(1) == pytest.approx(1.0)
    assert sps(2) == pytest.approx(1 / 1.5)
    assert sps(3) == pytest.approx(0.5)


def test_sps_table_extrapolates_time_from_last_two_points():
    sps = SPSTable([1, 2, 4], [1.0, 0.5, 0.25])  # times 1, 2, 4: slope 1 s per token at the end
    assert sps(6) == pytest.approx(1 / 6)
    noisy = SPSTable([1, 2, 4], [1.0, 0.5, 0.6])  # time falls at the end: clamped flat
    assert noisy(100) == pytest.approx(0.6)


def test_sps_table_json_round_trip():
    sps = SPSTable([1, 8, 32, 128], [172.4, 128.2, 96.1, 47.6])
    again = SPSTable.from_json(sps.to_json())
    assert again == sps
    assert json.loads(sps.to_json())["batch_tokens"] == [1, 8, 32, 128]


@pytest.mark.parametrize(
    "tokens, sps, message",
    [
        ([], [], "equal, non-zero length"),
        ([1, 2], [1.0], "equal, non-zero length"),
        ([2, 3], [1.0, 1.0], "start at 1"),
        ([1, 3, 3], [1.0, 1.0, 1.0], "strictly increase"),
        ([1, 2.5], [1.0, 1.0], "integers"),
        ([1, 2], [1.0, 0.0], "finite and positive"),
        ([1, 2], [1.0, float("nan")], "finite and positive"),
    ],
)
def test_bad_sps_tables_are_rejected_with_clear_errors(tokens, sps, message):
    with pytest.raises(ValueError, match=message):
        SPSTable(tokens, sps)


def test_sps_table_from_bad_json_names_the_problem():
    with pytest.raises(ValueError, match="not valid JSON"):
        SPSTable.from_json("{")
    with pytest.raises(ValueError, match="batch_tokens"):
        SPSTable.from_json('{"steps_per_second": [1.0]}')


def test_sps_table_rejects_forwards_of_zero_tokens():
    with pytest.raises(ValueError, match=">= 1 token"):
        SPSTable([1], [1.0])(0)


def test_threshold_lengths_stop_at_first_low_confidence():
    conf = torch.tensor([[0.9, 0.8, 0.3, 0.9], [0.2, 0.9, 0.9, 0.9], [0.7, 0.7, 0.7, 0.7]])
    assert threshold_lengths(conf, 0.7).tolist() == [2, 0, 4]


def test_fixed_lengths_verify_everything():
    assert fixed_lengths(3, 7).tolist() == [7, 7, 7]


def test_parse_policy_accepts_values_and_names_field_on_error():
    assert parse_policy("prefix") is Policy.PREFIX
    assert parse_policy(Policy.AR) is Policy.AR
    with pytest.raises(ValueError, match=r"spec\.policy must be one of 'ar', 'fixed', "
                                         r"'threshold', 'prefix'; got 'dynamic'"):
        parse_policy("dynamic", field="spec.policy")


def test_the_scalar_sps_lookup_agrees_with_the_tensor_one():
    sps = SPSTable([1, 2, 8, 64, 256], [90.0, 88.0, 60.0, 21.0, 5.5])
    counts = [1, 1.5, 2, 3, 7.9, 8, 40, 64, 100, 256, 300, 4096]
    tensor = 1.0 / sps.step_time(torch.tensor(counts, dtype=torch.float64))
    assert [sps(c) for c in counts] == pytest.approx(tensor.tolist(), rel=1e-12)
    assert SPSTable([1], [7.0])(123) == 7.0
    with pytest.raises(ValueError, match=">= 1 token"):
        sps(0.5)


# -- the draft gate: is drafting worth its own time? -----------------------------------------
def test_drafting_pays_hand_computed_case():
    # one request; verifying B tokens takes 1 + 0.1 (B - 1) s; a = (0.9, 0.5)
    sps = _table_from_times([1.0, 1.1, 1.2])
    est = torch.tensor([[0.9, 0.5]])
    # plain: 1 token / 1.0 s. Alg. 1 reaches n = 2: (1 + 0.9) / 1.1 = 1.727, 2.4 / 1.2 = 2.0.
    # with draft time d: best of 1.9 / (1.1 + d) and 2.4 / (1.2 + d);
    # 2.4 / (1.2 + d) > 1 iff d < 1.2
    assert drafting_pays(est, sps, draft_seconds=1.19)
    assert not drafting_pays(est, sps, draft_seconds=1.21)


def test_drafting_never_pays_when_alg_1_would_verify_nothing():
    sps = _table_from_times([1.0, 2.0, 3.0])  # every extra token doubles the step: no rise
    assert not drafting_pays(torch.tensor([[0.9, 0.8]]), sps, draft_seconds=0.0)
    assert not drafting_pays(torch.zeros(3, 4), _table_from_times([1.0]), draft_seconds=0.0)
    assert not drafting_pays(torch.zeros(0, 4), _table_from_times([1.0]), draft_seconds=0.0)


def test_rows_that_do_not_draft_raise_the_bar():
    # a flat table: drafting gains a / (1 + d) per row of survival a, but plain decoding of the
    # other rows is part of both sides, so the same draft time pays for fewer rows in total
    sps = _table_from_times([1.0])
    est = torch.tensor([[0.5]])
    assert drafting_pays(est, sps, draft_seconds=0.4)           # 1.5 / 1.4 > 1
    assert not drafting_pays(est, sps, draft_seconds=0.4, other_rows=3)  # 4.5 / 1.4 < 4


def test_drafting_pays_rejects_bad_arguments():
    sps = _table_from_times([1.0])
    with pytest.raises(ValueError, match="draft_seconds"):
        drafting_pays(torch.tensor([[0.5]]), sps, draft_seconds=-1.0)
    with pytest.raises(ValueError, match="non-increasing"):
        drafting_pays(torch.tensor([[0.5, 0.9]]), sps, draft_seconds=0.0)


# -- RowCostTable: step cost by sequences and tokens ------------------------------------------
ROWS = RowCostTable(rows=[1, 4], plain_seconds=[1.0, 2.0], full_seconds=[2.0, 5.0], gamma=2)


def test_row_cost_interpolates_between_row_counts_then_between_token_counts():
    at2 = ROWS.at_rows(2)  # plain 1 + 1/3, full 2 + 1 (a third of the way from 1 to 4 rows)
    times = at2.step_time(torch.tensor([2.0, 4.0, 6.0])).tolist()
    assert times == pytest.approx([4 / 3, 4 / 3 + (3.0 - 4 / 3) / 2, 3.0])
    assert at2(6) == pytest.approx(1 / 3.0)  # the scalar form gives forwards per second
    assert ROWS.at_rows(1).step_time(torch.tensor([1.0, 3.0])).tolist() == [1.0, 2.0]


def test_row_cost_extrapolates_rows_with_a_slope_of_at_least_zero():
    at8 = ROWS.at_rows(8)  # slopes per row: plain 1/3, full 1
    assert at8.step_time(torch.tensor([8.0, 24.0])).tolist() == pytest.approx([2 + 4 / 3, 9.0])
    noisy = RowCostTable(rows=[1, 2], plain_seconds=[2.0, 1.0], full_seconds=[3.0, 3.0], gamma=1)
    assert noisy.at_rows(5).step_time(torch.tensor([5.0])).tolist() == [1.0]


def test_row_cost_never_prices_extra_tokens_below_zero():
    flat = RowCostTable(rows=[1], plain_seconds=[2.0], full_seconds=[1.5], gamma=3)
    assert flat.at_rows(3).step_time(torch.tensor([3.0, 12.0])).tolist() == [2.0, 2.0]


def test_row_cost_json_round_trip_and_bad_tables_name_the_problem():
    assert RowCostTable.from_json(ROWS.to_json()) == ROWS
    with pytest.raises(ValueError, match="exactly"):
        RowCostTable.from_json(json.dumps({"rows": [1]}))
    with pytest.raises(ValueError, match="rows must be integers starting at 1"):
        RowCostTable(rows=[2, 4], plain_seconds=[1.0, 2.0], full_seconds=[2.0, 3.0], gamma=1)
    with pytest.raises(ValueError, match="finite and positive"):
        RowCostTable(rows=[1], plain_seconds=[0.0], full_seconds=[2.0], gamma=1)
    with pytest.raises(ValueError, match="equal, non-zero length"):
        RowCostTable(rows=[1, 2], plain_seconds=[1.0], full_seconds=[2.0], gamma=1)
    with pytest.raises(ValueError, match="gamma must be an integer >= 1"):
        RowCostTable(rows=[1], plain_seconds=[1.0], full_seconds=[2.0], gamma=0)
    with pytest.raises(ValueError, match=">= 1 sequence"):
        ROWS.at_rows(0)


def test_a_large_cost_per_sequence_makes_alg_1_verify_more():
    """The same step priced two ways: by tokens alone (16 tokens cost 2x one token), or with a
    fixed cost per sequence that extra tokens barely add to (16 sequences: 16 s, 16 + 16
    tokens: 18 s). Survival 0.5 at the first position of each of the 16 requests."""
    survival = torch.tensor([[0.5, 0.0]] * 16)
    by_tokens = _table_from_times([1.0 + i / 15 for i in range(48)])
    by_rows = RowCostTable(rows=[1, 16], plain_seconds=[1.0, 16.0], full_seconds=[1.25, 20.0],
                           gamma=2)
    assert prefix_lengths(survival, by_tokens).tolist() == [0] * 16
    assert prefix_lengths(survival, by_rows.at_rows(16)).tolist() == [1] * 16
    assert not drafting_pays(survival, by_tokens, draft_seconds=0.5)
    assert drafting_pays(survival, by_rows.at_rows(16), draft_seconds=0.5)



def test_threshold_bars_the_drafts_own_confidence_not_the_online_map():
    """`threshold` compares the draft's STS confidence with its bar; the engine's online map
    (`DraftProposal.conf`, here far lower) is what `prefix` plans with, and must not move
    a static bar (a map learned on `fixed` steps had left `threshold` verifying nothing)."""
    from types import SimpleNamespace

    from worker.engine.spec_step import DraftProposal, choose_lengths
    stated = torch.tensor([[3.0, 3.0, -3.0]])  # sigmoid: 0.95, 0.95, 0.05
    proposal = DraftProposal(ids=torch.zeros(1, 3, dtype=torch.long), probs=None,
                             conf_logits=stated, conf=torch.full((1, 3), 0.1))
    reqs = [SimpleNamespace(policy=Policy.THRESHOLD, remaining=100)]
    got = choose_lengths(reqs, [0], proposal, gamma=3, sps=None, threshold=0.5, sts=None,
                         max_batch_tokens=64)
    assert got == [2]


def test_whole_blocks_verify_every_prefix_rows_block_up_to_its_cap():
    """In a `regimes.FULL` step a `prefix` row verifies its whole block as a `fixed` row does
    (up to the tokens it has left), where Alg. 1 would have cut a block of low confidence."""
    from types import SimpleNamespace

    from worker.engine.spec_step import DraftProposal, choose_lengths
    low = torch.full((2, 4), -4.0)  # sigmoid 0.018: Alg. 1 verifies little of such blocks
    proposal = DraftProposal(ids=torch.zeros(2, 4, dtype=torch.long), probs=None,
                             conf_logits=low, conf=torch.sigmoid(low))
    reqs = [SimpleNamespace(policy=Policy.PREFIX, remaining=100),
            SimpleNamespace(policy=Policy.PREFIX, remaining=3)]
    sps = SPSTable([1, 4, 16], [100.0, 50.0, 20.0])
    kwargs = dict(gamma=4, sps=sps, threshold=0.5, sts=None, max_batch_tokens=64,
                  draft_seconds=0.001)
    cut = choose_lengths(reqs, [0, 1], proposal, **kwargs)
    assert cut[0] < 4
    assert choose_lengths(reqs, [0, 1], proposal, whole_blocks=True, **kwargs) == [4, 2]
