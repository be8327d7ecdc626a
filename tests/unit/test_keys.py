"""API keys: format, parsing, hashing; tenant names."""

from __future__ import annotations

import re

import pytest

from scheduler.errors import InvalidArgument, Unauthenticated
from scheduler.keys import check_tenant, hash_key, matches, new_key, parse_key_id


def test_new_key_round_trips_through_parse_and_hash():
    for _ in range(200):  # secrets with '_' and '-' in every position come up in 200 draws
        key_id, api_key = new_key()
        assert re.fullmatch(r"[0-9a-f]{12}", key_id)
        assert re.fullmatch(r"sg_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", api_key)
        assert parse_key_id(api_key) == key_id
        assert matches(api_key, hash_key(api_key))


def test_new_keys_are_distinct():
    keys = [new_key() for _ in range(100)]
    assert len({key_id for key_id, _ in keys}) == len({api_key for _, api_key in keys}) == 100


def test_secret_with_underscores_keeps_the_id_by_position():
    api_key = "sg_0123456789ab__" + "_-" * 21
    assert parse_key_id(api_key) == "0123456789ab"


def test_hash_is_sha256_hex_and_not_the_key():
    key_id, api_key = new_key()
    digest = hash_key(api_key)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert api_key not in digest and api_key.split("_", 2)[2] not in digest


def test_other_key_does_not_match():
    _, first = new_key()
    _, second = new_key()
    assert not matches(second, hash_key(first))
    tampered = first[:-1] + ("A" if first[-1] != "A" else "B")
    assert not matches(tampered, hash_key(first))


@pytest.mark.parametrize("bad", [
    "", "sg_", "sk_0123456789ab_" + "a" * 43, "sg_0123456789AB_" + "a" * 43,
    "sg_0123456789a_" + "a" * 44, "sg_0123456789abc" + "a" * 43, "sg_0123456789ab_" + "a" * 42,
    "sg_0123456789ab_" + "a" * 44, "sg_0123456789ab_" + "a" * 42 + "=",
    " sg_0123456789ab_" + "a" * 43,
    None, 12345,
])
def test_malformed_keys_are_refused_naming_the_api_key(bad):
    with pytest.raises(Unauthenticated, match=r"^API key: malformed; expected sg_<id>_<secret>$"):
        parse_key_id(bad)


def test_malformed_key_message_never_repeats_the_key():
    secretish = "sg_0123456789ab_" + "s3cr3t" * 7  # 42 chars: one short
    with pytest.raises(Unauthenticated) as info:
        parse_key_id(secretish)
    assert "s3cr3t" not in str(info.value)


@pytest.mark.parametrize("name", ["a", "acme", "Acme.Corp_2-x", "x" * 64, "0", "-._"])
def test_valid_tenants_pass(name):
    check_tenant(name)


@pytest.mark.parametrize("name", ["", "x" * 65, "a:b", "a b", "é", "a/b", "a\n", None, 7])
def test_invalid_tenants_are_refused_naming_the_field(name):
    with pytest.raises(InvalidArgument, match=r"^tenant: expected 1-64 characters") as info:
        check_tenant(name)
    assert info.value.field == "tenant"
