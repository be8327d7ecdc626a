"""Checking a client's request before any work (no gRPC, Ray or Redis): defaults, every bound,
and errors that name the field. The tokenizer is a real one (the tiny test tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from scheduler.config import SchedulerConfig
from scheduler.errors import InvalidArgument, Unauthenticated, Unavailable
from scheduler.interceptors import bearer_key
from scheduler.model_info import ModelInfo, PromptTokenizer
from scheduler.requests import JobRequest
from sparkgrid.contract import SamplingParams

CONFIG = SchedulerConfig(max_tokens_cap=100, default_max_tokens=32, max_prompt_chars=2000)


class Catalog:
    def __init__(self, infos):
        self.infos = {i.name: i for i in infos}

    def model(self, name):
        return self.infos.get(name)

    def models(self):
        return sorted(self.infos)


@pytest.fixture(scope="module")
def catalog(tiny_tokenizer_dir):
    tok = PromptTokenizer((Path(tiny_tokenizer_dir) / "tokenizer.json").read_bytes())
    return Catalog([ModelInfo("org/code", tok, max_context=64, vocab_size=len(tok))])


@pytest.mark.parametrize("pair_dir", ["tiny", "shipped"])
def test_the_scheduler_splits_prompts_as_the_workers_tokenizer_does(pair_dir, tiny_tokenizer_dir):
    """The scheduler bills and resumes with `tokenizers` alone (no torch in its process); its
    ids must be the ones the worker's transformers tokenizer gives, specials included."""
    from worker.models import shipped_pair

    where = tiny_tokenizer_dir if pair_dir == "tiny" else (shipped_pair() or [None])[0]
    if where is None:
        pytest.skip("the shipped pair is not installed")
    ours = PromptTokenizer((Path(where) / "tokenizer.json").read_bytes())
    theirs = AutoTokenizer.from_pretrained(str(where))
    for text in ("def f(x):\n    return x", " leading space", "ünïcödé ✓ 😀", "", "a" * 300,
                 "<|endoftext|> in a prompt", "\t\ttabs\r\n"):
        assert ours.encode(text) == theirs(text).input_ids, text
    assert len(ours) == len(theirs)


def test_a_bad_tokenizer_json_is_an_error_naming_the_file():
    with pytest.raises(ValueError, match="tokenizer.json"):
        PromptTokenizer(b"{not json")


def check(catalog, **fields):
    return JobRequest.check({"prompt": "def f(x):\n", **fields}, CONFIG, catalog)


def test_defaults_fill_what_the_client_left_unset(catalog):
    req = check(catalog)
    assert (req.model, req.temperature, req.top_p, req.top_k, req.seed, req.stop) == \
           ("org/code", 1.0, 1.0, 0, None, ())
    assert req.max_tokens == 32 and req.prompt_ids and req.request_id == ""
    assert req.params(5) == SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=None,
                                           stop=(), max_tokens=5)


def test_default_max_tokens_shrinks_to_the_room_left_in_the_context(catalog):
    prompt = "x " * 20
    req = check(catalog, prompt=prompt)
    assert req.max_tokens == min(32, 64 - len(req.prompt_ids)) < 32


@pytest.mark.parametrize("fields, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": "word " * 80}, "prompt"),  # more tokens than the 64-token context
    ({"max_tokens": 101}, "max_tokens"),
    ({"max_tokens": 60}, "max_tokens"),  # prompt + 60 > 64
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.01}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 10**7}, "top_k"),
    ({"seed": 2**63}, "seed"),
    ({"stop": ["a"] * 9}, "stop"),
    ({"stop": ["y" * 65]}, "stop"),
    ({"request_id": "r" * 129}, "request_id"),
    ({"request_id": "tab\there"}, "request_id"),
    ({"model": "org/other"}, "model"),
    ({"model": "m" * 300}, "model"),
])
def test_each_bad_field_is_refused_naming_it(catalog, fields, field):
    with pytest.raises(InvalidArgument) as err:
        check(catalog, **fields)
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")


def test_bounds_themselves_are_accepted(catalog):
    req = check(catalog, temperature=2.0, top_p=1.0, top_k=len(catalog.model("org/code").tokenizer),
                seed=2**63 - 1, stop=["s" * 64] * 8, request_id="a" * 128, max_tokens=8)
    assert req.temperature == 2.0 and len(req.stop) == 8


def test_no_model_served_is_unavailable_and_several_need_a_name(catalog, tiny_tokenizer_dir):
    with pytest.raises(Unavailable):
        JobRequest.check({"prompt": "x"}, CONFIG, Catalog([]))
    tok = catalog.model("org/code").tokenizer
    two = Catalog([ModelInfo("a/one", tok, 64, len(tok)), ModelInfo("b/two", tok, 64, len(tok))])
    with pytest.raises(InvalidArgument, match="model: several models"):
        JobRequest.check({"prompt": "x"}, CONFIG, two)
    assert JobRequest.check({"prompt": "x", "model": "b/two"}, CONFIG, two).model == "b/two"


@pytest.mark.parametrize("metadata", [(), (("authorization", "Basic abc"),),
                                      (("authorization", "Bearer "),), (("x-other", "Bearer k"),)])
def test_missing_or_malformed_authorization_is_unauthenticated(metadata):
    with pytest.raises(Unauthenticated, match="authorization"):
        bearer_key(metadata)


def test_the_bearer_key_is_read_whatever_the_case_of_the_scheme():
    assert bearer_key((("authorization", "bearer sg_k"),)) == "sg_k"
    assert bearer_key((("Authorization", "Bearer  sg_k "),)) == "sg_k"


@pytest.mark.parametrize("changes, field", [
    ({"policy": "random"}, "policy"), ({"grpc_port": 70000}, "grpc_port"),
    ({"tls_cert": "c.pem"}, "tls_cert"), ({"redis_url": "http://x"}, "redis_url"),
    ({"max_attempts": 0}, "max_attempts"), ({"default_max_tokens": 5000}, "default_max_tokens"),
    ({"stall_timeout_s": 0}, "stall_timeout_s"),
])
def test_scheduler_config_names_the_bad_setting(changes, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SchedulerConfig(**changes)


def test_a_redis_password_never_shows_in_a_config_error():
    with pytest.raises(ValueError) as err:
        SchedulerConfig(redis_url="http://user:hunter2@host:6379")
    assert "hunter2" not in str(err.value)


def test_a_vanishing_temperature_is_run_and_recorded_as_greedy(catalog):
    req = JobRequest.check({"prompt": "def f():", "temperature": 1.4e-45}, CONFIG, catalog)
    assert req.temperature == 0.0 and req.params().temperature == 0.0
