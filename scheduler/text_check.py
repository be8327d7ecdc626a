"""What a worker may send of a job's content: token ids of the model's vocabulary, and text that
is exactly the scheduler's own decoding of those ids.

The scheduler decodes every delivered token itself, the way the engine does (one token at a
time through `sparkgrid.detokenizer`, the text cut before the first stop string that ends in
it, the held-back rest flushed at the end unless a stop string ended the job). A worker's
streamed text must be a prefix of that text while the job runs (it may hold characters back,
as the engine does while a character or a stop string is incomplete) and equal to it when the
job ends. A worker that sends tokens after its text reached a stop string is generating, and
billing, past the end of the job. So what the client receives is always the scheduler's
decoding of the ids it is billed for; a worker whose text disagrees gets a strike and the job
fails over (`Dispatcher._broken_rule`).

A failed check changes nothing: the chunk is not delivered, and the next worker resumes from
the ids delivered before it.

Knows: the detokenizer, stop strings. Does not know: Ray, gRPC, Redis, billing.
"""

from __future__ import annotations

from collections.abc import Sequence

from sparkgrid.detokenizer import IncrementalDetokenizer, stop_cut


class ContentCheck:
    """One job's delivered content as the scheduler sees it; `check` each chunk before it is
    delivered."""

    def __init__(self, tokenizer, vocab_size: int, prompt_ids: Sequence[int],
                 stop: Sequence[str]):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._vocab_size = vocab_size
        self._stop = tuple(stop)
        self._expected = ""  # the scheduler's text of the delivered ids
        self._delivered = 0  # characters of it the workers sent (and were delivered)
        self._stopped = False  # the text reached a stop string

    def check(self, token_ids: Sequence[int], text: str, finished: bool) -> str | None:
        """What is wrong with a chunk (as the strike names it), or None; only a good chunk is
        taken in."""
        bad = next((t for t in token_ids if not 0 <= t < self._vocab_size), None)
        if bad is not None:
            return f"sent token id {bad}, outside the vocabulary of {self._vocab_size}"
        mark, expected, stopped = self._detok.mark(), self._expected, self._stopped
        for tok in token_ids:
            if stopped:
                self._detok.rewind(mark)
                return "sent tokens after its text reached a stop string"
            checked = len(expected)
            expected += self._detok.add([tok])
            cut = stop_cut(expected, checked, self._stop)
            if cut is not None:
                expected, stopped = expected[:cut], True
        if finished and not stopped:
            expected += self._detok.finish()
        end = self._delivered + len(text)
        if expected[self._delivered:end] != text or (finished and end != len(expected)):
            self._detok.rewind(mark)
            return (f"sent text that is not its tokens' text (at character {self._delivered}: "
                    f"{text[:40]!r}, the tokens decode to "
                    f"{expected[self._delivered:self._delivered + 40]!r})")
        self._expected, self._stopped, self._delivered = expected, stopped, end
        return None

