"""Streaming detokenization against a small byte-level BPE tokenizer trained in the test."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sparkgrid.detokenizer import IncrementalDetokenizer

EOS = "<|endoftext|>"
PIECES = ["hello", " world", " café", " naïve", " 中文", "字", " 🙂", "🚀", " déjà vu", "\n",
          " the", " ÿ", " Ω", " über", "!", " 日本語", "👍🏽", " a", "é", "  "]


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = ["Le café est très bon, déjà vu à Noël.", "中文和日本語の文字 mixed with English.",
             "Emoji: 🙂 🚀 👍🏽 and more 🙂🙂.", "The naïve über coder writes ÿ and Ω."]
    return lines + ["".join(rng.choice(PIECES) for _ in range(12)) for _ in range(200)]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)


def _byte_level_chars() -> dict[int, str]:
    """The byte -> printable character table byte-level BPE vocabularies are written in:
    printable Latin-1 bytes stand for themselves, the others take code points from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _random_segmentation(tokenizer, text: str, rng: random.Random) -> list[int]:
    """Ids that decode to `text` but split its bytes at random token boundaries, so multi-byte
    characters are often cut across tokens (unlike the canonical encoding)."""
    vocab = tokenizer.get_vocab()
    chars = _byte_level_chars()
    data = text.encode("utf-8")
    ids, i = [], 0
    while i < len(data):
        options = [n for n in range(1, 9) if i + n <= len(data)
                   and "".join(chars[b] for b in data[i:i + n]) in vocab]
        n = rng.choice(options)  # n = 1 always exists: every byte is in the alphabet
        ids.append(vocab["".join(chars[b] for b in data[i:i + n])])
        i += n
    return ids


def _stream(tokenizer, prompt_ids, ids, rng, skip_special_tokens=True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    pieces, i = [], 0
    while i < len(ids):
        n = rng.randint(0, 4)  # includes empty adds
        pieces.append(detok.add(ids[i:i + n]))
        i += n
    pieces.append(detok.finish())
    return pieces


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 10)))


def test_holds_back_a_character_split_across_tokens(tokenizer):
    vocab, chars = tokenizer.get_vocab(), _byte_level_chars()
    ids = [vocab[chars[b]] for b in "中".encode()]  # one token per UTF-8 byte
    assert tokenizer.decode(ids) == "中"
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("hi"))
    assert [detok.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "中"
    assert detok.finish() == ""


def test_canonical_encodings_stream_to_the_full_decode(tokenizer):
    rng = random.Random(1)
    for _ in range(300):
        prompt_ids = tokenizer.encode(_random_text(rng))
        text = _random_text(rng)
        ids = tokenizer.encode(text)
        pieces = _stream(tokenizer, prompt_ids, ids, rng)
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in piece for piece in pieces)


def test_random_segmentations_never_emit_partial_characters(tokenizer):
    rng = random.Random(2)
    for _ in range(300):
        prompt_ids = _random_segmentation(tokenizer, _random_text(rng), rng)
        text = _random_text(rng)
        ids = _random_segmentation(tokenizer, text, rng)
        pieces = _stream(tokenizer, prompt_ids, ids, rng)
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_id_sequences_that_decode_cleanly(tokenizer, skip_special_tokens):
    rng = random.Random(3)
    vocab_size = len(tokenizer)
    checked = 0
    while checked < 300:
        ids = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 6))]
        full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if "\ufffd" in full:
            continue
        prompt_ids = tokenizer.encode(_random_text(rng))
        pieces = _stream(tokenizer, prompt_ids, ids, rng, skip_special_tokens)
        assert "".join(pieces) == full
        assert not any("\ufffd" in piece for piece in pieces)
        checked += 1


def test_finish_flushes_an_incomplete_trailing_character(tokenizer):
    vocab, chars = tokenizer.get_vocab(), _byte_level_chars()
    head = tokenizer.encode("ok ")
    tail = [vocab[chars[b]] for b in "🙂".encode()[:2]]  # half an emoji
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add(head) == "ok "
    assert detok.add(tail) == ""
    rest = detok.finish()
    assert rest.startswith("\ufffd")
    assert "ok " + rest == tokenizer.decode(head + tail)


def test_special_tokens_follow_skip_flag(tokenizer):
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids = tokenizer.encode("hello") + [eos] + tokenizer.encode(" world")
    skip = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    keep = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert "".join(skip.add([i]) for i in ids) + skip.finish() == "hello world"
    assert "".join(keep.add([i]) for i in ids) + keep.finish() == f"hello{EOS} world"


# -- resuming a stream on another engine (the scheduler's failover) ---------------------------
def _request_stream(tokenizer, prompt_ids, new_ids, stop=(), resume=None):
    """Commit `new_ids` one by one into a Request as the engine does (up to a stop string);
    return its streamed pieces, the last one the flush of a finish."""
    import torch

    from worker.engine.config import Resume, SamplingParams
    from worker.engine.request import Request

    resume = resume or Resume()
    params = SamplingParams(max_tokens=len(new_ids) + 1, stop=stop)
    req = Request("r", list(prompt_ids) + list(resume.token_ids), params, "ar",
                  IncrementalDetokenizer(tokenizer, prompt_ids), frozenset(), 0,
                  torch.device("cpu"))
    req.resume(resume)
    pieces = []
    for tok in new_ids:
        req.commit([tok])
        pieces.append(req.take_output().text)
        if req.finished:
            break
    req.finish("length")
    pieces.append(req.take_output().text)
    return pieces


@pytest.mark.parametrize("stop", [(), (" 中文和",), ("🚀 x",)])
def test_a_stream_resumed_at_any_token_continues_without_repeated_or_missing_text(tokenizer, stop):
    from worker.engine.config import Resume

    prompt_ids = tokenizer("Emoji:").input_ids
    new_ids = tokenizer(" café 中文和日本語 🚀 x 👍🏽 done").input_ids
    whole = _request_stream(tokenizer, prompt_ids, new_ids, stop)
    expected = "".join(whole)
    assert expected  # the stop strings cut the text, but not all of it
    num_committed = len(whole) - 1  # a worker can die only before the stop string completes
    assert num_committed > 3
    for cut in range(1, num_committed):
        # no flush
        delivered = "".join(_request_stream(tokenizer, prompt_ids, new_ids[:cut], stop)[:-1])
        rest = _request_stream(tokenizer, prompt_ids, new_ids[cut:], stop,
                       Resume(tuple(new_ids[:cut]), len(delivered)))
        assert delivered + "".join(rest) == expected, f"cut after {cut} tokens"


def test_resume_refuses_more_characters_than_its_tokens_decode_to(tokenizer):
    from worker.engine.config import Resume

    ids = tokenizer("hello world").input_ids
    with pytest.raises(ValueError, match="resume.num_chars"):
        _request_stream(tokenizer, ids[:1], ids[2:], resume=Resume(tuple(ids[1:2]), 99))
