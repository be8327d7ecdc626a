"""Sequential Temperature Scaling: labels, metrics, calibration of over-confident logits, file."""

import json
import math

import pytest
import torch

from worker.engine.sts import (
    apply_sts,
    expected_calibration_error,
    fit_sts,
    load_sts,
    roc_auc,
    save_sts,
    survival,
    survival_labels,
)

TRUE_TEMPERATURE = 3.0  # the synthetic head's logits are 3x too sharp


def _synthetic_logs(num_rows: int, gamma: int, seed: int):
    """Verification logs of an over-confident head: P(accept k | 1..k-1 accepted) =
    sigmoid(z_k / 3). Every row verifies all gamma positions (as calibration logs must, see
    fit_sts), so -1 appears only after the first rejection."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, gamma, generator=gen, dtype=torch.float64) * 4.0 + 3.0
    accept = torch.rand(num_rows, gamma, generator=gen, dtype=torch.float64) < torch.sigmoid(
        logits / TRUE_TEMPERATURE)
    labels = torch.full((num_rows, gamma), -1, dtype=torch.int8)
    for k in range(gamma):
        alive = labels[:, k - 1] == 1 if k > 0 else torch.ones(num_rows, dtype=torch.bool)
        labels[alive, k] = accept[alive, k].to(torch.int8)
    return logits, labels


def _prefix_ece(logits, labels, temperatures, k):
    a = survival(apply_sts(logits, temperatures).double())[:, k]
    target = survival_labels(labels)[:, k]
    known = target >= 0
    return expected_calibration_error(a[known], target[known].double())


def test_survival_labels_make_later_positions_zero_after_a_rejection():
    accepted = torch.tensor([[1, 1, 0, -1], [1, 0, -1, -1], [1, -1, -1, -1], [0, -1, -1, -1],
                             [1, 1, 1, 1]], dtype=torch.int8)
    expected = [[1, 1, 0, 0], [1, 0, 0, 0], [1, -1, -1, -1], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert survival_labels(accepted).tolist() == expected


def test_ece_hand_computed():
    # bins of 15: 0.1 -> bin 1, 0.95 -> bin 14. Bin 1: mean 0.1 vs 0.5; bin 14: 0.95 vs 1.
    pred = torch.tensor([0.1, 0.1, 0.95, 0.95])
    label = torch.tensor([0.0, 1.0, 1.0, 1.0])
    assert expected_calibration_error(pred, label) == pytest.approx(0.5 * 0.4 + 0.5 * 0.05)
    assert math.isnan(expected_calibration_error(torch.zeros(0), torch.zeros(0)))


def test_roc_auc_averages_ties_and_is_nan_for_one_class():
    pred = torch.tensor([0.1, 0.4, 0.4, 0.8])
    label = torch.tensor([0, 0, 1, 1])
    # pairs (pos, neg): (0.4, 0.1) 1, (0.4, 0.4) 0.5, (0.8, 0.1) 1, (0.8, 0.4) 1 -> 3.5 / 4
    assert roc_auc(pred, label) == pytest.approx(0.875)
    assert math.isnan(roc_auc(pred, torch.ones(4)))


def test_sts_calibrates_over_confident_head_and_keeps_order():
    gamma = 4
    train_logits, train_labels = _synthetic_logs(40_000, gamma, seed=0)
    test_logits, test_labels = _synthetic_logs(40_000, gamma, seed=1)
    temps = fit_sts(train_logits, train_labels)
    assert len(temps) == gamma
    for t in temps:
        assert t == pytest.approx(TRUE_TEMPERATURE, rel=0.2)
    for k in range(gamma):
        before = _prefix_ece(test_logits, test_labels, [1.0] * gamma, k)
        after = _prefix_ece(test_logits, test_labels, temps, k)
        assert before > 0.05
        assert after < 0.02 and after < before / 4
        # a positive temperature is monotone: each position's ranking, hence AUC, is unchanged
        verified = test_labels[:, k] >= 0
        raw = torch.sigmoid(test_logits[verified, k])
        scaled = apply_sts(test_logits, temps)[verified, k].double()
        label = test_labels[verified, k]
        assert roc_auc(scaled, label) == pytest.approx(roc_auc(raw, label), abs=1e-4)


def test_position_without_known_labels_keeps_temperature_one():
    logits = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    accepted = torch.tensor([[1, -1]] * 5 + [[0, -1]] * 5, dtype=torch.int8)
    temps = fit_sts(logits, accepted, grid=torch.tensor([0.5, 2.0]))
    # position 2 still has labels: rows rejected at 1 are known zeros
    assert temps[0] in (0.5, 2.0) and temps[1] in (0.5, 2.0)
    only_unknown = torch.full((10, 2), -1, dtype=torch.int8)
    assert fit_sts(logits, only_unknown) == [1.0, 1.0]


def test_save_and_load_round_trip(tmp_path):
    path = save_sts(tmp_path, [2.5, 3.0], {"ece_before": 0.07, "auc": float("nan")})
    assert path.name == "sts.json"
    assert load_sts(tmp_path) == [2.5, 3.0]
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["metrics"] == {"ece_before": 0.07, "auc": None}


def test_load_returns_none_when_absent(tmp_path):
    assert load_sts(tmp_path) is None


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        ('{"version": 2, "temperatures": [1.0]}', "version"),
        ('{"version": 1, "temperatures": []}', "temperatures"),
        ('{"version": 1, "temperatures": [1.0, -2.0]}', "temperatures"),
        ('{"version": 1, "temperatures": [1.0], "metrics": []}', "metrics"),
    ],
)
def test_malformed_file_names_file_and_problem(tmp_path, content, problem):
    (tmp_path / "sts.json").write_text(content)
    with pytest.raises(ValueError, match=problem) as err:
        load_sts(tmp_path)
    assert "sts.json" in str(err.value)


def test_apply_sts_rejects_wrong_number_of_temperatures():
    with pytest.raises(ValueError, match="2 STS temperatures for 3 draft positions"):
        apply_sts(torch.zeros(4, 3), [1.0, 1.0])
