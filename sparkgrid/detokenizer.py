"""Streaming detokenization: text for newly generated tokens, one chunk at a time.

Decoding a single token is wrong for byte-level BPE: a character such as "中" or an emoji may be
split over several tokens, and some decoders join tokens with context-dependent spacing. So each
call decodes a short window of earlier tokens plus the new ones and emits only the text beyond
what the window's earlier tokens already produced. While the decoded text ends with U+FFFD (an
incomplete UTF-8 sequence) nothing is emitted; the tokens wait for the rest of the character.

For byte-level BPE, the pieces from `add` plus `finish()` equal
`tokenizer.decode(generated_ids, skip_special_tokens=...)` whenever that decode is clean (holds
no U+FFFD). The window starts in the prompt's last tokens, so tokenizers whose decoder strips a
leading space (SentencePiece) keep the space the prompt context implies.

Scope: one request's generated text. Not here: stop strings, special-token policy beyond
`skip_special_tokens`, or which tokens count as generated. The worker's engine streams text
with it, and the scheduler checks that text with it (`scheduler/text_check.py`), so both sides
decode a job's tokens the same way.

Knows: a tokenizer's `decode(ids, skip_special_tokens=...)`. Does not know: torch, the engine.
"""

from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first new ones, for their spacing


class IncrementalDetokenizer:
    """Turns a growing list of generated ids into a stream of newly completed text."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # A fast tokenizer's Rust backend decodes the same text without transformers' per-call
        # Python work (a third of a wide decode step's host time), unless the wrapper would
        # also clean up spaces.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = (backend if backend is not None
                         and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
                         else None)
        self._ids: list[int] = [int(i) for i in prompt_ids]  # context, then generated
        # ids[prefix_offset:read_offset] produced text already emitted (or prompt context);
        # ids[read_offset:] are tokens whose text has not been emitted yet.
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - PROMPT_CONTEXT_TOKENS, 0)

    def add(self, new_ids: Sequence[int]) -> str:
        """Append generated ids; return the text they complete ("" while a character is split)."""
        self._ids.extend(int(i) for i in new_ids)
        prefix_text, full_text = self._window_texts()
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""  # hold back: nothing new, or a multi-byte character is still incomplete
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full_text[len(prefix_text):]

    def finish(self) -> str:
        """Everything not yet emitted, incomplete characters included; call once at the end."""
        prefix_text, full_text = self._window_texts()
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text):]

    def mark(self) -> tuple[int, int, int]:
        """Where it stands now, for `rewind`."""
        return len(self._ids), self._prefix_offset, self._read_offset

    def rewind(self, mark: tuple[int, int, int]) -> None:
        """Forget every id added since `mark` was taken."""
        length, self._prefix_offset, self._read_offset = mark
        del self._ids[length:]

    def _window_texts(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset:]
        num_seen = self._read_offset - self._prefix_offset
        prefix_text = self._decode(window[:num_seen])
        return prefix_text, self._decode(window)

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


def stop_cut(text: str, checked: int, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string that ends beyond `text[:checked]` begins, or None: the
    text is cut there (the stop string is not part of the output)."""
    hits = [at for stop in stops if (at := text.find(stop, max(0, checked - len(stop) + 1))) >= 0]
    return min(hits) if hits else None
