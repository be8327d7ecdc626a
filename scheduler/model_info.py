"""What the scheduler holds of a model: its tokenizer (lent by its first worker, or pinned) and
the limits that requests are checked against.

The scheduler counts and resumes tokens with the same tokenizer as the workers: the
`tokenizers` library on the model's `tokenizer.json`, so the scheduler's process loads no torch.

Knows: the `tokenizers` library. Does not know: Ray, gRPC, Redis, where the files came from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
"""What a Hugging Face tokenizer's decode removes when `clean_up_tokenization_spaces` is on."""


def clean_up_spaces(files: dict) -> bool:
    """Whether the model's tokenizer_config.json (among the lent files) turns the clean-up on;
    ValueError when that file is there but unreadable."""
    raw = files.get("tokenizer_config.json") if isinstance(files, dict) else None
    if raw is None:
        return False
    try:
        config = json.loads(raw)
    except (ValueError, TypeError) as err:
        raise ValueError(f"tokenizer_config.json: cannot be read ({err})") from None
    return isinstance(config, dict) and config.get("clean_up_tokenization_spaces") is True


class PromptTokenizer:
    """A model's tokenizer as the scheduler uses it: prompts to token ids, as the model's own
    (fast) tokenizer splits them, special tokens of its template included."""

    def __init__(self, tokenizer_json: bytes, clean_up_spaces: bool = False):
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as err:  # the library raises its own exception type
            raise ValueError(f"tokenizer.json: cannot be read ({err})") from None
        self.clean_up_spaces = clean_up_spaces
        """As the model's tokenizer_config.json says (`clean_up_tokenization_spaces`): its
        workers' decoded text has the spaces before punctuation and contractions removed."""

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`, exactly as the model's workers decode them."""
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:
            for before, after in CLEAN_UP:
                text = text.replace(before, after)
        return text

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)


@dataclass
class ModelInfo:
    """What the scheduler needs of a model to check and resume requests."""

    name: str
    tokenizer: PromptTokenizer
    max_context: int
    vocab_size: int
    tokenizer_sha256: str = ""
    """SHA-256 of the tokenizer.json every worker of the model must lend."""


def lent_tokenizer(model: str, files, known: ModelInfo | None,
                   pins: dict[str, str] | None) -> tuple[bytes, str]:
    """(tokenizer.json, its SHA-256) of the files a worker of `model` lent, when it is the
    model's: the pinned one when `pins` are given, and always the one of the model's workers
    adopted before (`known`). ValueError saying why not."""
    data = files.get("tokenizer.json") if isinstance(files, dict) else None
    if not isinstance(data, bytes):
        raise ValueError(f"model {model}: the worker sent no tokenizer.json (the "
                         "scheduler reads fast tokenizers only)")
    digest = hashlib.sha256(data).hexdigest()
    if pins is not None and model not in pins:
        raise ValueError(f"model {model} has no pinned tokenizer (add its tokenizer.json's "
                         "SHA-256 to the scheduler's tokenizer pins)")
    expected = known.tokenizer_sha256 if known is not None else (pins or {}).get(model)
    if expected is not None and digest != expected:
        raise ValueError(f"model {model}: its tokenizer.json (SHA-256 {digest[:16]}...) is "
                         f"not the model's ({expected[:16]}...)")
    return data, digest
