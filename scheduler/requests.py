"""A client's generation request, checked field by field before any work is done.

`JobRequest.check(fields, config, models)` takes the request's raw fields (the gRPC edge turns
the protobuf message into a dict) and either returns a request the workers can run or raises
InvalidArgument naming the first bad field. The prompt is tokenized here, with the model's own
tokenizer, so that its length is checked against the model's context and the scheduler counts
(and bills) prompt tokens itself.

Knows: limits, sampling ranges, tokenizers. Does not know: gRPC, Ray, Redis.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

from scheduler.config import SchedulerConfig
from scheduler.errors import InvalidArgument, Unavailable
from sparkgrid.contract import GREEDY_BELOW, SamplingParams

MAX_MODEL_NAME_CHARS = 256
MAX_SEED = 2**63
REQUEST_ID_CHARS = frozenset(string.ascii_letters + string.digits + "-_.:/@+=")


@dataclass(frozen=True)
class JobRequest:
    """A request as it will run: defaults applied, every field in range."""

    prompt: str
    prompt_ids: tuple[int, ...]
    """The prompt as the model's tokenizer splits it (what is billed as prompt tokens)."""
    model: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    request_id: str
    """The client's idempotency key; "" for none."""

    def params(self, max_tokens: int | None = None) -> SamplingParams:
        """What a worker runs this with (`max_tokens`: what is left)."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              seed=self.seed, stop=self.stop,
                              max_tokens=self.max_tokens if max_tokens is None else max_tokens)

    @classmethod
    def check(cls, fields: dict, config: SchedulerConfig, catalog) -> JobRequest:
        """`fields`: prompt, max_tokens (0: default), temperature/top_p/seed (None: unset),
        top_k, stop, request_id, model ("" : default). `catalog.model(name)` is the model's
        `ModelInfo` (None when no worker serves it), `catalog.models()` the served names."""
        prompt = _prompt(fields.get("prompt"), config)
        request_id = _request_id(fields.get("request_id") or "", config)
        stop = _stop(fields.get("stop") or (), config)
        temperature = _number(fields.get("temperature"), "temperature", 1.0, 0.0, 2.0)
        temperature = 0.0 if temperature < GREEDY_BELOW else temperature  # see GREEDY_BELOW
        top_p = _number(fields.get("top_p"), "top_p", 1.0, 0.0, 1.0, open_low=True)
        seed = fields.get("seed")
        if seed is not None and not (isinstance(seed, int) and 0 <= seed < MAX_SEED):
            raise InvalidArgument("seed", f"expected an integer in [0, 2**63), got {seed!r}")
        model_name = _model_name(fields.get("model") or "", config, catalog)
        info = catalog.model(model_name)
        top_k = fields.get("top_k") or 0
        if not isinstance(top_k, int) or not 0 <= top_k <= info.vocab_size:
            raise InvalidArgument("top_k", f"expected 0 (off) or at most the vocabulary size "
                                           f"({info.vocab_size}), got {top_k!r}")
        prompt_ids = tuple(info.tokenizer.encode(prompt))
        if not prompt_ids:
            raise InvalidArgument("prompt", "tokenizes to no tokens")
        max_tokens = _max_tokens(fields.get("max_tokens") or 0, len(prompt_ids), info.max_context,
                                 config)
        return cls(prompt, prompt_ids, model_name, max_tokens, temperature, top_p, top_k, seed,
                   stop, request_id)


def _prompt(prompt, config: SchedulerConfig) -> str:
    if not isinstance(prompt, str) or not prompt:
        raise InvalidArgument("prompt", "must be a non-empty string")
    if len(prompt) > config.max_prompt_chars:
        raise InvalidArgument("prompt", f"{len(prompt)} characters; at most "
                                        f"{config.max_prompt_chars} are accepted")
    return prompt


def _request_id(request_id: str, config: SchedulerConfig) -> str:
    if len(request_id) > config.max_request_id_chars:
        raise InvalidArgument("request_id", f"{len(request_id)} characters; at most "
                                            f"{config.max_request_id_chars}")
    bad = sorted(set(request_id) - REQUEST_ID_CHARS)
    if bad:
        raise InvalidArgument("request_id", f"may hold letters, digits and -_.:/@+= only; "
                                            f"got {''.join(bad)!r}")
    return request_id


def _stop(stop, config: SchedulerConfig) -> tuple[str, ...]:
    stop = tuple(stop)
    if len(stop) > config.max_stop_strings:
        raise InvalidArgument("stop", f"{len(stop)} strings; at most {config.max_stop_strings}")
    for s in stop:
        if not s or len(s) > config.max_stop_chars:
            raise InvalidArgument("stop", f"each string must have 1 to {config.max_stop_chars} "
                                          f"characters, got {s[:80]!r}")
    return stop


def _number(value, field: str, default: float, low: float, high: float,
            open_low: bool = False) -> float:
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and math.isfinite(value) and value <= high and (
        value > low if open_low else value >= low)
    if not ok:
        bracket = "(" if open_low else "["
        raise InvalidArgument(field, f"expected a number in {bracket}{low:g}, {high:g}], "
                                     f"got {value!r}")
    return float(value)


def _model_name(name: str, config: SchedulerConfig, catalog) -> str:
    if len(name) > MAX_MODEL_NAME_CHARS:
        raise InvalidArgument("model", f"at most {MAX_MODEL_NAME_CHARS} characters")
    if not name:
        name = config.default_model or ""
    if name and catalog.model(name) is not None:
        return name
    served = catalog.models()
    if not served:
        raise Unavailable("no live worker serves any model; start one with `sparkgrid worker`")
    if not name:
        if len(served) > 1:
            raise InvalidArgument("model", f"several models are served, name one of {served}")
        return served[0]
    raise InvalidArgument("model", f"unknown model {name!r}; served: {served}")


def _max_tokens(max_tokens, num_prompt: int, max_context: int, config: SchedulerConfig) -> int:
    room = max_context - num_prompt
    if room < 1:
        raise InvalidArgument("prompt", f"{num_prompt} tokens leave no room in the model's "
                                        f"context of {max_context} tokens")
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise InvalidArgument("max_tokens", f"expected an integer >= 0, got {max_tokens!r}")
    if max_tokens == 0:
        return min(config.default_max_tokens, room)
    if max_tokens > config.max_tokens_cap:
        raise InvalidArgument("max_tokens", f"{max_tokens} exceeds the cap of "
                                            f"{config.max_tokens_cap}")
    if max_tokens > room:
        raise InvalidArgument("max_tokens", f"prompt ({num_prompt} tokens) + max_tokens "
                                            f"({max_tokens}) exceeds the model's context of "
                                            f"{max_context} tokens")
    return max_tokens
