"""Registrations: how a worker becomes one the scheduler routes to, and operator tokens.

An operator (a party that runs workers and is paid for them) holds one token, made by
`sparkgrid operators add NAME` and shown once: `sgo_<token_id>_<secret>`, where `token_id` is
12 lowercase hex characters (shown and logged) and `secret` is 43 URL-safe characters. The
platform stores only the token's SHA-256.

The launcher, which runs on the operator's machine with the token, builds the worker's
`Registration` (name, model, hashes of the tokenizer and weights, GPU type, price per hour) and
signs it: an HMAC-SHA256 of the record's canonical JSON, keyed with the token's SHA-256. The
scheduler, which knows that hash, checks the signature and the record against what the worker
serves, then writes the record to Redis under the operator (a name once registered belongs to
that operator). So the worker's own reports can never rename it, change its price or make it
trusted: those come from the signed record and the platform's configuration. Whoever reads a
signed record off a worker can only replay it for that same name.

Knows: the token format, the record, its signature, hashing files. Does not know: Redis, Ray,
gRPC, where the record travels.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

TOKEN_ID_LENGTH = 12
_TOKEN = re.compile(r"sgo_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")
MALFORMED_TOKEN = "operator token: malformed; expected sgo_<id>_<secret>"
KINDS = ("in-cluster", "linked")
"""How a worker reaches the scheduler: a Ray actor in the platform's cluster, or a worker link."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MAX_PRICE_PER_HOUR = 1e6
"""As `sparkgrid worker --price-per-hour` allows."""


def new_token() -> tuple[str, str]:
    """A fresh (token_id, token). The token is shown once to its operator and never stored."""
    token_id = secrets.token_hex(TOKEN_ID_LENGTH // 2)
    return token_id, f"sgo_{token_id}_{secrets.token_urlsafe(32)}"


def token_id_of(token: str) -> str:
    """The id of a well-formed token; ValueError (never repeating the token) otherwise."""
    match = _TOKEN.fullmatch(token) if isinstance(token, str) else None
    if match is None:
        raise ValueError(MALFORMED_TOKEN)
    return match.group(1)


def token_sha256(token: str) -> str:
    """What the platform stores of a token, and the key its registrations are signed with."""
    return hashlib.sha256(token.encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(*model_dirs: str | None) -> str:
    """One SHA-256 over the weight files of the given model directories (target, then draft),
    each file's name and digest in name order: the same weights give the same hash on any
    machine, whatever the directories are called."""
    digest = hashlib.sha256()
    for i, directory in enumerate(d for d in model_dirs if d):
        files = sorted(p for p in Path(directory).iterdir()
                       if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        if not files:
            raise ValueError(f"{directory}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
        for p in files:
            digest.update(f"{i}:{p.name}:{file_sha256(p)}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Registration:
    """What an operator declares of one worker, signed with its token."""

    worker: str
    token_id: str
    """Names the operator's token (the scheduler looks the operator up by it)."""
    model_id: str
    tokenizer_sha256: str
    weights_sha256: str
    gpu_type: str
    price_per_hour: float
    kind: str = "in-cluster"
    issued_at: float = 0.0

    def __post_init__(self):
        for name in ("worker", "token_id", "model_id", "gpu_type", "kind"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > 256:
                raise ValueError(f"registration.{name}: expected a non-empty string of at most "
                                 f"256 characters, got {value!r:.80}")
        for name in ("tokenizer_sha256", "weights_sha256"):
            value = getattr(self, name)
            if not isinstance(value, str) or re.fullmatch(r"[0-9a-f]{64}", value) is None:
                raise ValueError(f"registration.{name}: expected a SHA-256 in hex, "
                                 f"got {value!r:.80}")
        price = self.price_per_hour
        if (isinstance(price, bool) or not isinstance(price, (int, float))
                or not math.isfinite(price) or not 0 <= price <= MAX_PRICE_PER_HOUR):
            raise ValueError(f"registration.price_per_hour: expected USD in [0, "
                             f"{MAX_PRICE_PER_HOUR:g}], got {price!r:.80}")
        if self.kind not in KINDS:
            raise ValueError(f"registration.kind: expected one of {', '.join(KINDS)}, "
                             f"got {self.kind!r:.80}")
        if (isinstance(self.issued_at, bool) or not isinstance(self.issued_at, (int, float))
                or not math.isfinite(self.issued_at)):
            raise ValueError(f"registration.issued_at: expected unix seconds, "
                             f"got {self.issued_at!r:.80}")

    def canonical(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    def sign(self, token: str) -> dict:
        """The signed record, as it travels: the record's fields plus `signature`."""
        if token_id_of(token) != self.token_id:
            raise ValueError("registration.token_id: not the id of the token it is signed with")
        return {**asdict(self), "signature": _mac(token_sha256(token), self.canonical())}

    @classmethod
    def from_signed(cls, raw, stored_sha256: str) -> Registration:
        """The record of a signed registration whose signature is good for the token whose
        SHA-256 is `stored_sha256`; ValueError saying what is wrong otherwise."""
        if not isinstance(raw, dict):
            raise ValueError(f"registration: expected a mapping, got {type(raw).__name__}")
        fields = dict(raw)
        signature = fields.pop("signature", None)
        try:
            record = cls(**fields)
        except TypeError as err:
            raise ValueError(f"registration: {err}") from None
        if not isinstance(signature, str) or not hmac.compare_digest(
                signature.encode(), _mac(stored_sha256, record.canonical()).encode()):
            raise ValueError("registration.signature: not made with the operator's current "
                             "token")
        return record

    @staticmethod
    def token_id_in(raw) -> str:
        """The token id a signed registration names (to look its operator up); ValueError."""
        token_id = raw.get("token_id") if isinstance(raw, dict) else None
        if not isinstance(token_id, str) or re.fullmatch(r"[0-9a-f]{12}", token_id) is None:
            raise ValueError(f"registration.token_id: expected {TOKEN_ID_LENGTH} lowercase hex "
                             f"characters, got {token_id!r:.80}")
        return token_id


def _mac(key_hex: str, message: bytes) -> str:
    return hmac.new(bytes.fromhex(key_hex), message, hashlib.sha256).hexdigest()
