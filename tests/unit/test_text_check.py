"""The scheduler's check of a worker's text against its own decoding of the delivered ids,
run against the engine's own request bookkeeping (what an honest worker streams) on the shipped
tokenizer: an honest stream always passes, however its tokens are split into chunks and
whatever stop strings end it, and any change to its text or tokens is caught."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from scheduler.model_info import PromptTokenizer
from scheduler.text_check import ContentCheck
from sparkgrid.contract import SamplingParams
from sparkgrid.detokenizer import IncrementalDetokenizer
from worker.engine.request import Request
from worker.models import shipped_pair

TEXTS = ["def f(x):\n    return x  # done\n", "héllo 中文 ok 🙂 naïve café\n",
         "print('日本語')  # 👍🏽 emoji\nx = 1\n"]
EOS = 0


@pytest.fixture(scope="module")
def tokenizer():
    return PromptTokenizer((Path(shipped_pair()[0]) / "tokenizer.json").read_bytes())


def honest_stream(tokenizer, prompt_ids, output_ids, stop, rng):
    """What the engine streams for these output ids: (token ids, text, finished) per chunk."""
    params = SamplingParams(max_tokens=len(output_ids), stop=tuple(stop))
    req = Request("r", list(prompt_ids), params, "ar", IncrementalDetokenizer(
        tokenizer, prompt_ids), frozenset({EOS}), 0, torch.device("cpu"))
    chunks, at = [], 0
    while not req.finished:
        n = rng.randint(1, 4)
        req.commit(output_ids[at:at + n])
        at += n
        out = req.take_output()
        chunks.append((out.token_ids, out.text, out.finished))
    return chunks


def check_all(tokenizer, prompt_ids, stop, chunks):
    check = ContentCheck(tokenizer, len(tokenizer), prompt_ids, stop)
    return [check.check(ids, text, finished) for ids, text, finished in chunks]


@pytest.mark.parametrize("seed", range(12))
def test_an_honest_stream_always_passes(tokenizer, seed):
    rng = random.Random(seed)
    text = TEXTS[seed % len(TEXTS)]
    ids = tokenizer.encode(text)
    cut = rng.choice([c for c in range(1, len(ids) // 2)  # prompts end on a whole character
                      if "\ufffd" not in tokenizer.decode(ids[:c])])
    prompt, output = ids[:cut], ids[cut:]
    stop = [] if seed % 3 == 0 else [rng.choice(["x", "\n", "ok", "中", "  "])]
    chunks = honest_stream(tokenizer, prompt, output, stop, rng)
    assert check_all(tokenizer, prompt, stop, chunks) == [None] * len(chunks)
    delivered = "".join(text for _, text, _ in chunks)
    assert text.startswith(tokenizer.decode(prompt) + delivered)  # (no stop: all of it)
    if not stop:
        assert tokenizer.decode(prompt) + delivered == text


def test_a_changed_character_is_caught_and_leaves_the_check_where_it_was(tokenizer):
    ids = tokenizer.encode(TEXTS[1])
    prompt, output = ids[:2], ids[2:]
    chunks = honest_stream(tokenizer, prompt, output, [], random.Random(1))
    check = ContentCheck(tokenizer, len(tokenizer), prompt, ())
    k = next(i for i, (_, text, _) in enumerate(chunks) if text)
    for ids_, text, finished in chunks[:k]:
        assert check.check(ids_, text, finished) is None
    ids_, text, finished = chunks[k]
    forged = text[:-1] + ("X" if text[-1] != "X" else "Y")
    assert "not its tokens' text" in check.check(ids_, forged, finished)
    # the refused chunk was not taken in: the honest one still passes, and the rest after it
    assert [check.check(*c) for c in chunks[k:]] == [None] * (len(chunks) - k)


def test_text_without_its_tokens_and_tokens_without_their_text_are_caught(tokenizer):
    ids = tokenizer.encode(TEXTS[0])
    check = ContentCheck(tokenizer, len(tokenizer), ids[:1], ())
    assert "not its tokens' text" in check.check([], "padding", False)
    assert "not its tokens' text" in check.check(ids[1:], "", True)  # the end must have it all
    assert check.check(ids[1:], tokenizer.decode(ids[1:]), True) is None


def test_tokens_past_a_stop_string_are_caught(tokenizer):
    ids = tokenizer.encode("a = 1\nb = 2\nc = 3\n")
    check = ContentCheck(tokenizer, len(tokenizer), ids[:1], ("\n",))
    stop_at = next(i for i in range(2, len(ids)) if "\n" in tokenizer.decode(ids[1:i]))
    assert check.check(ids[1:stop_at], tokenizer.decode(ids[1:stop_at]).split("\n")[0],
                       False) is None
    problem = check.check(ids[stop_at:stop_at + 2], "", True)
    assert problem == "sent tokens after its text reached a stop string"


def test_ids_outside_the_vocabulary_are_caught_before_decoding(tokenizer):
    check = ContentCheck(tokenizer, len(tokenizer), [1], ())
    assert check.check([5, len(tokenizer)], "", False) == (
        f"sent token id {len(tokenizer)}, outside the vocabulary of {len(tokenizer)}")
    assert "outside the vocabulary" in check.check([-1], "", False)


def test_a_tokenizer_that_cleans_up_spaces_is_decoded_as_its_workers_do(tokenizer):
    raw = (Path(shipped_pair()[0]) / "tokenizer.json").read_bytes()
    clean = PromptTokenizer(raw, clean_up_spaces=True)
    ids = clean.encode("Yes , it isn't . Ok ?")
    assert clean.decode(ids) == "Yes, it isn't. Ok?"
    assert tokenizer.decode(ids) == "Yes , it isn't . Ok ?"
