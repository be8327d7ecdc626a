"""The one field check every settings class uses: an error that names the field.

Knows: how a bad value is reported. Does not know: any field.
"""

from __future__ import annotations


def require(ok: bool, field: str, expected: str, value) -> None:
    """Raise `ValueError("<field>: expected <expected>, got <value>")` unless `ok`."""
    if not ok:
        raise ValueError(f"{field}: expected {expected}, got {value!r}")
