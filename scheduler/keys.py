"""API keys and tenant names: their format, how a key is made, and how it is checked.

A key reads `sg_<key_id>_<secret>`: `key_id` is 12 lowercase hex characters that name the key
(they may be shown and logged), `secret` is `secrets.token_urlsafe(32)` (43 characters of
A-Z a-z 0-9 `_` `-`). Only a SHA-256 of the whole key is stored: the secret carries 256 bits of
entropy, so a plain hash cannot be guessed back and a slow password hash would buy nothing.
The secret may itself contain `_`, so the key id is read by position, never by splitting.

Knows: the key format, hashing, tenant names. Does not know: where keys are stored (see
`redis_store.py`), which tenant a key belongs to, gRPC.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from scheduler.errors import InvalidArgument, Unauthenticated

KEY_ID_LENGTH = 12
"""Hex characters of a key id: 48 bits, so ids of one deployment practically never collide
(and the store refuses a duplicate anyway)."""

_KEY = re.compile(r"sg_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")
_KEY_ID = re.compile(r"[0-9a-f]{12}")
_TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
MALFORMED = "API key: malformed; expected sg_<id>_<secret>"


def new_key() -> tuple[str, str]:
    """A fresh (key_id, api_key). The api_key is shown once to its owner and never stored."""
    key_id = secrets.token_hex(KEY_ID_LENGTH // 2)
    return key_id, f"sg_{key_id}_{secrets.token_urlsafe(32)}"


def parse_key_id(api_key: str) -> str:
    """The key id of a well-formed key; `Unauthenticated` otherwise (the message never repeats
    the key, which may be a real secret pasted into the wrong place)."""
    match = _KEY.fullmatch(api_key) if isinstance(api_key, str) else None
    if match is None:
        raise Unauthenticated(MALFORMED)
    return match.group(1)


def is_key_id(key_id: str) -> bool:
    return isinstance(key_id, str) and _KEY_ID.fullmatch(key_id) is not None


def hash_key(api_key: str) -> str:
    """The SHA-256 hex digest of the whole key: what the store keeps instead of the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def matches(api_key: str, stored_hash: str) -> bool:
    """Whether `api_key` hashes to `stored_hash`, compared in constant time."""
    return hmac.compare_digest(hash_key(api_key).encode(), stored_hash.encode())


def check_tenant(name: str) -> None:
    """Raises `InvalidArgument("tenant", ...)` unless `name` is 1-64 characters of
    A-Z a-z 0-9 `.` `_` `-` (no `:`, so a tenant can sit inside a Redis key unambiguously)."""
    if not isinstance(name, str) or _TENANT.fullmatch(name) is None:
        shown = (repr(name) if not isinstance(name, str) or len(name) <= 80
                 else repr(name[:80] + "..."))
        raise InvalidArgument("tenant",
                              f"expected 1-64 characters of A-Z a-z 0-9 . _ -; got {shown}")
