"""Prefixed, sortable IDs: ``ins_01J9Z3…`` (a ULID after the kind's prefix)."""

from __future__ import annotations

import os
import re
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
_ID_RE = re.compile(r"^([a-z]{2,4})_([0-9a-hjkmnp-tv-z]{26})$")


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(prefix: str, *, now: float | None = None) -> str:
    """A new ID: 48 bits of milliseconds then 80 random bits, so IDs sort by creation time."""
    ms = int((time.time() if now is None else now) * 1000)
    rand = int.from_bytes(os.urandom(10), "big")
    return f"{prefix}_{_b32(ms, 10)}{_b32(rand, 16)}"


def split_id(value: str) -> tuple[str, str] | None:
    """``(prefix, ulid)`` when *value* looks like an ID, else None."""
    m = _ID_RE.match(value)
    if m is None:
        return None
    return m.group(1), m.group(2)


def looks_like_id(value: str) -> bool:
    return _ID_RE.match(value) is not None
