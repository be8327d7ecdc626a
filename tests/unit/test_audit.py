"""Audits: scoring delivered tokens under the target (one teacher-forced forward) and the
verdicts on them. A stand-in language model with set logits makes the honest and the cheating
tokens exact; the tiny Qwen3 target checks the forward itself.

Statistical checks: honest tokens drawn from the model's own distribution pass the sampled test
with false-failure probability 1e-4 (`Z_LIMIT`); the draws are seeded, so a run is repeatable."""

from __future__ import annotations

import math

import pytest
import torch

from scheduler.audit import GAP_LIMIT, MIN_TOKENS, Pool, judge
from worker.engine.audit_score import score_tokens


class SetLogits(torch.nn.Module):
    """A causal LM whose logits at position i are row i of `table` (whatever the input)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.config = type("Config", (), {"vocab_size": table.shape[1]})()

    def forward(self, input_ids):
        n = input_ids.shape[1]
        return type("Out", (), {"logits": self.table[:n][None]})()


def peaked_table(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * 3.0


def test_scores_are_the_gap_to_the_argmax_and_the_tempered_log_probability():
    table = peaked_table(12)
    lm = SetLogits(table)
    prompt, tokens = [1, 2], [int(table[i].argmax()) for i in range(1, 6)]
    tokens[2] = int(table[3].argmin())  # one token far from the argmax
    scores = score_tokens(lm, prompt, tokens, temperature=0.7)
    rows = table[1:6]  # the logits before each delivered token: positions 1..5
    expected_gap = rows.max(-1).values - rows[torch.arange(5), torch.tensor(tokens)]
    assert scores.gap == pytest.approx(expected_gap.tolist(), abs=1e-5)
    assert scores.gap[0] == 0 and scores.gap[2] > 1
    logp = torch.log_softmax(rows / 0.7, -1)
    assert scores.logprob == pytest.approx(logp[torch.arange(5), torch.tensor(tokens)].tolist(),
                                           abs=1e-5)
    p = logp.exp()
    assert scores.mean == pytest.approx((p * logp).sum(-1).tolist(), abs=1e-5)
    assert all(v >= 0 for v in scores.var)
    greedy = score_tokens(lm, prompt, tokens, temperature=0.0)
    assert greedy.gap == scores.gap and greedy.logprob == ()


@pytest.mark.parametrize("prompt, tokens, temperature, field", [
    ([], [1], 0.0, "prompt_ids"), ([1], [], 0.0, "token_ids"), ([1], [50], 0.0, "token_ids"),
    ([-1], [1], 0.0, "prompt_ids"), ([1], [1], float("nan"), "temperature"),
])
def test_bad_input_to_scoring_names_the_field(prompt, tokens, temperature, field):
    with pytest.raises(ValueError, match=field):
        score_tokens(SetLogits(peaked_table(4)), prompt, tokens, temperature)


def test_scoring_runs_a_real_target_once_over_prompt_and_tokens(qwen3_target_dir):
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(qwen3_target_dir).eval()
    prompt = [5, 9, 12, 40]
    with torch.inference_mode():  # greedy continuation, one token at a time
        ids = list(prompt)
        for _ in range(6):
            ids.append(int(target(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    scores = score_tokens(target, prompt, ids[len(prompt):], temperature=0.0)
    assert max(scores.gap) < 1e-4  # its own argmax, re-scored in one forward
    assert judge(scores.to_dict(), 0.0).passed is True


def draws(table: torch.Tensor, temperature: float, seed: int, cheat: bool = False) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(table / temperature, -1)
    if cheat:  # tokens from a flatter, cheaper model's distribution
        probs = torch.softmax(table / (temperature * 3), -1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0].tolist()


def test_honest_sampled_tokens_pass_and_a_flatter_models_fail():
    table = peaked_table(201, seed=3)
    lm = SetLogits(table)
    honest = draws(table[1:], 0.8, seed=11)
    verdict = judge(score_tokens(lm, [0, 1], honest, 0.8).to_dict(), 0.8)
    assert verdict.passed is True, verdict
    cheat = draws(table[1:], 0.8, seed=11, cheat=True)
    verdict = judge(score_tokens(lm, [0, 1], cheat, 0.8).to_dict(), 0.8)
    assert verdict.passed is False and "less likely" in verdict.reason


def test_greedy_verdict_tolerates_near_ties_only():
    assert judge({"gap": [0.0, GAP_LIMIT * 0.9, 0.0]}, 0.0).passed is True
    failed = judge({"gap": [0.0, 0.0, GAP_LIMIT * 3]}, 0.0)
    assert failed.passed is False and "token 2" in failed.reason
    assert judge({"gap": []}, 0.0).passed is None


def test_short_sampled_jobs_are_not_judged_but_pooled_evidence_is():
    short = {"gap": [0.0] * 4, "logprob": [-5.0] * 4, "mean": [-1.0] * 4, "var": [1.0] * 4}
    assert judge(short, 0.8).passed is None and MIN_TOKENS > 4
    pool = Pool()
    results = [pool.add({k: v for k, v in short.items() if k != "gap"}) for _ in range(4)]
    assert results[0] is None  # 4 tokens: too few yet
    assert results[-1] is False  # 16 tokens each 4 sigma below their mean: z = -16
    assert math.isclose(pool.z, -16.0)


@pytest.mark.parametrize("scores, field", [
    ({"gap": [0.0, "x"]}, "scores.gap"), ({"gap": [-1.0]}, "scores.gap"),
    ({"gap": [0.0] * 9, "logprob": [0.0] * 9, "mean": [0.0] * 9, "var": [-1.0] * 9},
     "scores.var"),
    ({"gap": [0.0] * 9, "logprob": [float("inf")] * 9, "mean": [0.0] * 9, "var": [1.0] * 9},
     "scores.logprob"),
    ("not a dict", "scores.gap"),
])
def test_malformed_scores_from_a_worker_name_the_field(scores, field):
    with pytest.raises(ValueError, match=field):
        judge(scores, 0.8)
