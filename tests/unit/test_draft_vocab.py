"""The reduced draft vocabulary's ranking file: order, coverage, and refusal of bad files."""

import json

import pytest
import torch

from worker.engine.draft_vocab import RANKING_NAME, load_ranking, rank_tokens, save_ranking


def test_tokens_are_ranked_by_count_then_id():
    assert rank_tokens(torch.tensor([3, 0, 5, 3, 1])) == [2, 0, 3, 4, 1]


def test_the_ranking_file_round_trips_and_records_coverage(tmp_path):
    counts = torch.zeros(300, dtype=torch.long)
    counts[7], counts[11] = 60, 40  # the top 2 tokens are all of the counted ones
    save_ranking(counts, tmp_path)
    ranked = load_ranking(tmp_path, 300)
    assert ranked[:2] == [7, 11] and sorted(ranked) == list(range(300))
    record = json.loads((tmp_path / RANKING_NAME).read_text())
    assert record["counted_tokens"] == 100
    assert record["coverage"] == {"256": 1.0, "300": 1.0}


def test_a_draft_without_a_ranking_has_none(tmp_path):
    assert load_ranking(tmp_path, 10) is None


@pytest.mark.parametrize("content", ['{"ranked_token_ids": [0, 1, 1]}',
                                     '{"ranked_token_ids": [0, 1]}', '{"other": 1}', "not json"])
def test_bad_ranking_files_are_refused_naming_the_file(tmp_path, content):
    (tmp_path / RANKING_NAME).write_text(content)
    with pytest.raises(ValueError, match=RANKING_NAME):
        load_ranking(tmp_path, 3)


def _heads():
    from worker.engine.markov import MARKOV_HEADS
    torch.manual_seed(0)
    return {name: cls(64, 16, 8) for name, cls in MARKOV_HEADS.items()}


def test_the_vanilla_markov_table_gives_the_projected_bias_and_the_others_have_none():
    """A row of the table is the bias a draft step would project, onto all of the vocabulary
    and onto a reduced one's rows; the gated and recurrent heads read h_k, so no table."""
    heads = _heads()
    vanilla = heads.pop("vanilla")
    prev, h = torch.tensor([3, 0, 63, 3]), torch.randn(4, 16)
    w2 = vanilla.markov_w2.weight[torch.tensor([5, 1, 9])]
    for rows in (None, w2):
        table = vanilla.transition_table(rows)
        assert table.shape == (64, 64 if rows is None else 3)
        projected, embed, _ = vanilla.step(h, prev, None, rows)
        read, read_embed, _ = vanilla.step(h, prev, None, rows, table)
        torch.testing.assert_close(read, projected)
        assert torch.equal(read_embed, embed)
    assert all(head.transition_table(w2) is None for head in heads.values())


def test_a_reduced_vocabulary_holds_the_table_only_within_its_memory_budget(monkeypatch):
    from types import SimpleNamespace

    from worker.engine import draft_vocab
    head = _heads()["vanilla"]
    draft = SimpleNamespace(lm_head=torch.nn.Linear(16, 64, bias=False), markov_head=head)
    vocab = draft_vocab.DraftVocab.build(draft, list(range(64))[::-1], 4)
    assert vocab.markov_table.shape == (64, 4)
    torch.testing.assert_close(vocab.markov_table[7],
                               head.markov_w2.weight[[63, 62, 61, 60]] @ head.markov_w1.weight[7])
    monkeypatch.setattr(draft_vocab, "MARKOV_TABLE_MAX_BYTES", 64 * 4 * 4 - 1)
    assert draft_vocab.DraftVocab.build(draft, list(range(64)), 4).markov_table is None
