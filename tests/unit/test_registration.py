"""Operator tokens and signed registrations: a signature holds for exactly the record its
operator signed, with the operator's current token."""

from __future__ import annotations

import dataclasses

import pytest

from sparkgrid.registration import (
    Registration,
    new_token,
    token_id_of,
    token_sha256,
    weights_sha256,
)

SHA = "ab" * 32


def record(token: str, **changes) -> Registration:
    fields = {"worker": "gpu-7", "token_id": token_id_of(token), "model_id": "org/model",
              "tokenizer_sha256": SHA, "weights_sha256": "cd" * 32, "gpu_type": "RTX 4090",
              "price_per_hour": 0.45, "issued_at": 1.0}
    return Registration(**{**fields, **changes})


def test_a_signed_record_verifies_with_its_tokens_hash_and_no_other():
    token_id, token = new_token()
    assert token_id_of(token) == token_id
    signed = record(token).sign(token)
    assert Registration.from_signed(signed, token_sha256(token)) == record(token)
    _, other = new_token()
    with pytest.raises(ValueError, match="registration.signature"):
        Registration.from_signed(signed, token_sha256(other))


@pytest.mark.parametrize("field,value", [("worker", "gpu-8"), ("price_per_hour", 0.01),
                                         ("gpu_type", "H200"), ("model_id", "org/other"),
                                         ("kind", "linked")])
def test_any_change_to_a_signed_field_breaks_the_signature(field, value):
    _, token = new_token()
    signed = {**record(token).sign(token), field: value}
    with pytest.raises(ValueError, match="registration.signature"):
        Registration.from_signed(signed, token_sha256(token))


def test_a_record_is_signed_only_with_the_token_it_names():
    _, token = new_token()
    _, other = new_token()
    with pytest.raises(ValueError, match="registration.token_id"):
        record(token).sign(other)


@pytest.mark.parametrize("changes,field", [
    ({"price_per_hour": -1}, "price_per_hour"), ({"price_per_hour": float("nan")},
                                                 "price_per_hour"),
    ({"price_per_hour": True}, "price_per_hour"), ({"tokenizer_sha256": "xyz"},
                                                   "tokenizer_sha256"),
    ({"worker": ""}, "worker"), ({"kind": "elsewhere"}, "kind"),
    ({"issued_at": float("inf")}, "issued_at")])
def test_bad_fields_are_named(changes, field):
    _, token = new_token()
    with pytest.raises(ValueError, match=f"registration.{field}"):
        record(token, **changes)


@pytest.mark.parametrize("raw", [None, [], {"token_id": "short"}, {"token_id": 12}])
def test_what_a_worker_sends_is_checked_before_any_lookup(raw):
    with pytest.raises(ValueError, match="registration"):
        Registration.token_id_in(raw)


def test_unknown_fields_and_missing_ones_are_refused_not_crashed():
    _, token = new_token()
    signed = record(token).sign(token)
    for raw in ({**signed, "trusted": True}, {k: v for k, v in signed.items() if k != "model_id"}):
        with pytest.raises(ValueError, match="registration"):
            Registration.from_signed(raw, token_sha256(token))


@pytest.mark.parametrize("bad", ["", "sgo_abc", "sg_0123456789ab_" + "x" * 43, None, 5])
def test_malformed_tokens_are_refused_without_echoing_them(bad):
    with pytest.raises(ValueError) as err:
        token_id_of(bad)
    assert "malformed" in str(err.value) and "x" * 43 not in str(err.value)


def test_weights_hash_follows_the_files_not_the_directory_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"weights")
        (d / "config.json").write_text("{}")  # not a weight file: not hashed
    assert weights_sha256(str(a)) == weights_sha256(str(b))
    (b / "model.safetensors").write_bytes(b"weightz")
    assert weights_sha256(str(a)) != weights_sha256(str(b))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no weight files"):
        weights_sha256(str(tmp_path / "empty"))


def test_the_signed_form_carries_every_field():
    _, token = new_token()
    signed = record(token).sign(token)
    assert set(signed) == {f.name for f in dataclasses.fields(Registration)} | {"signature"}
