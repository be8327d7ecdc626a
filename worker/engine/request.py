"""One request's state inside the engine: tokens, text, status and speculation statistics.

Knows: what was generated, what has been streamed, when to stop (EOS, max_tokens, stop
strings). Does not know: tensors of the caches, batching, or how tokens were produced.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from sparkgrid.detokenizer import IncrementalDetokenizer, stop_cut
from worker.engine.config import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SpecStats:
    """Speculation figures of one request (DSpark section 1: tau counts the bonus token)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    draft_tokens_proposed: int = 0
    """Draft tokens the drafter produced for this request (gamma per drafting step)."""
    tokens_verified: int = 0
    """Draft tokens sent to the target for verification."""
    tokens_accepted: int = 0
    """Verified draft tokens the target accepted."""
    accept_lengths: list[int] = field(default_factory=list)
    """Tokens committed per decoding step (accepted + 1 bonus/replacement)."""
    position_verified: list[int] = field(default_factory=list)
    """Per draft position k: how often verification reached it (sent to the target with
    1..k-1 accepted; a position after a rejection is never reached)."""
    position_accepted: list[int] = field(default_factory=list)
    """Per draft position k: how often it was accepted (given 1..k-1 were)."""

    def record(self, num_verified: int, num_accepted: int, gamma: int) -> None:
        if len(self.position_verified) < gamma:
            self.position_verified += [0] * (gamma - len(self.position_verified))
            self.position_accepted += [0] * (gamma - len(self.position_accepted))
        if num_verified == 0:  # a plain step (the draft gate's choice): one token, no draft
            self.accept_lengths.append(1)
            return
        self.tokens_verified += num_verified
        self.tokens_accepted += num_accepted
        self.accept_lengths.append(num_accepted + 1)
        for k in range(min(num_verified, num_accepted + 1)):  # stops at the first rejection
            self.position_verified[k] += 1
            self.position_accepted[k] += int(k < num_accepted)

    @property
    def mean_accept_length(self) -> float:
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0

    @property
    def conditional_acceptance(self) -> list[float | None]:
        """P(position k accepted | positions 1..k-1 accepted), None where never verified."""
        return [a / v if v else None
                for a, v in zip(self.position_accepted, self.position_verified)]

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "draft_tokens_proposed": self.draft_tokens_proposed,
            "tokens_verified": self.tokens_verified,
            "tokens_accepted": self.tokens_accepted,
            "mean_accept_length": self.mean_accept_length,
            "accept_lengths": list(self.accept_lengths),
            "conditional_acceptance": self.conditional_acceptance,
        }


@dataclass
class RequestOutput:
    """An increment streamed to the caller after an engine step."""

    req_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # "stop" (EOS or stop string), "length", "abort"
    stats: SpecStats


class Request:
    """A request from admission to finish."""

    def __init__(self, req_id: str, prompt_ids: list[int], params: SamplingParams, policy: str,
                 detokenizer: IncrementalDetokenizer, eos_ids: frozenset[int], seed: int,
                 device: torch.device):
        self.req_id = req_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.policy = policy
        self.keeps_context = policy != "ar"
        """Whether the target's features at this request's committed positions extend its
        draft context (the planner clears it for a `prefix` request that will not draft again:
        `Planner.dormant_after`)."""
        self.output_ids: list[int] = []
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.stats = SpecStats(prompt_tokens=len(prompt_ids))
        self._detok = detokenizer
        self._eos_ids = eos_ids
        self._text = ""            # all detokenized output text
        self._sent_text = 0        # chars of _text already streamed
        self._sent_tokens = 0      # tokens already streamed
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def resume(self, resume) -> None:
        """Continue after `resume.token_ids` (already part of `prompt_ids`): their text is known
        to the client up to `resume.num_chars`; the rest is streamed first."""
        self._text = "".join(self._detok.add([tok]) for tok in resume.token_ids)  # as commit()
        if resume.num_chars > len(self._text):
            raise ValueError(f"resume.num_chars: {resume.num_chars} exceeds the "
                             f"{len(self._text)} characters that resume.token_ids decode to")
        self._sent_text = resume.num_chars

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def commit(self, token_ids: list[int]) -> None:
        """Append generated tokens one by one, stopping at the first finish condition."""
        for tok in token_ids:
            self.output_ids.append(tok)
            checked = len(self._text)
            self._text += self._detok.add([tok])
            if tok in self._eos_ids and not self.params.ignore_eos:
                return self.finish("stop")
            if self._cut_at_stop_string(checked):
                return self.finish("stop", flush=False)
            if self.remaining <= 0:
                return self.finish("length")

    def _cut_at_stop_string(self, checked: int) -> bool:
        """Cut the text before the earliest stop string that ends in the newly added text."""
        cut = stop_cut(self._text, checked, self.params.stop)
        if cut is not None:
            self._text = self._text[:cut]
        return cut is not None

    def finish(self, reason: str, flush: bool = True) -> None:
        if self.status is Status.FINISHED:
            return
        if flush:  # text held back for an incomplete character; never after a stop string
            self._text += self._detok.finish()
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stats.completion_tokens = len(self.output_ids)

    def take_output(self) -> RequestOutput:
        """The increment since the last call (text held back while it may begin a stop string)."""
        hold = 0 if self.finished else max((len(s) - 1 for s in self.params.stop), default=0)
        end = max(self._sent_text, len(self._text) - hold)
        text = self._text[self._sent_text:end]
        tokens = self.output_ids[self._sent_tokens:]
        self._sent_text, self._sent_tokens = end, len(self.output_ids)
        self.stats.completion_tokens = len(self.output_ids)
        return RequestOutput(self.req_id, tokens, text, self.finished, self.finish_reason,
                             self.stats)
