"""The shipped pair's tokenizer: byte-level BPE trained on the corpus's train split only.

Byte-level, so every string encodes and `decode(encode(text)) == text` exactly (no prefix
space, no clean-up of spaces). Special tokens: `<|endoftext|>` (end of sequence and padding,
id 0) and `<|mask|>` (the drafter's mask token, id 1). Saved in Hugging Face format, so
`AutoTokenizer.from_pretrained(out_dir)` loads it.

Knows: how the tokenizer is trained and saved. Does not know: models.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from worker.training.corpus import Corpus

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"


def train_tokenizer(corpus: Corpus, out_dir: str | os.PathLike,
                    vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Train on `corpus.train`, save to `out_dir`, and return the tokenizer (at most
    `vocab_size` entries)."""
    return train_byte_bpe((doc.text for doc in corpus.train), out_dir, vocab_size,
                          num_texts=len(corpus.train))


def train_byte_bpe(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int,
                   num_texts: int | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with sparkgrid's two special tokens, trained on `texts`."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + 2} "
                         f"(256 bytes + 2 special tokens), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, MASK_TOKEN],
                                  initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(texts, trainer, length=num_texts)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        model_input_names=["input_ids", "attention_mask"],  # decoder-only: no token_type_ids
        clean_up_tokenization_spaces=False,  # decode(encode(text)) must give back text exactly
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer
