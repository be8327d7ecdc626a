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
