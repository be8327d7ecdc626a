"""What the scheduler holds of a model: its tokenizer (lent by its first worker, or pinned) and
the limits that requests are checked against.

The scheduler counts and resumes tokens with the same tokenizer as the workers: the
`tokenizers` library on the model's `tokenizer.json`, so the scheduler's process loads no torch.

Knows: the `tokenizers` library. Does not know: Ray, gRPC, Redis, where the files came from.
"""

from __future__ import annotations

from dataclasses import dataclass


class PromptTokenizer:
    """A model's tokenizer as the scheduler uses it: prompts to token ids, as the model's own
    (fast) tokenizer splits them, special tokens of its template included."""

    def __init__(self, tokenizer_json: bytes):
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as err:  # the library raises its own exception type
            raise ValueError(f"tokenizer.json: cannot be read ({err})") from None

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=True).ids

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
