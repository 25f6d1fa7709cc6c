"""Envelope encryption for secrets at rest (ARCHITECTURE §3).

Each sealed value gets a fresh AES-256-GCM data key; the data key is wrapped with the
server's master key (AES-256-GCM too). The master key comes from ``COVE_MASTER_KEY``
(base64, 32 bytes) or from ``DATA/master.key`` (created 0600 on first start). Associated
data binds a ciphertext to its row, so a ciphertext copied to another bundle won't open.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cove import errors

_b64e = base64.b64encode
_b64d = base64.b64decode


@dataclass(frozen=True)
class Sealed:
    wrapped_key: str  # base64(nonce || AESGCM(master, data_key))
    nonce: str  # base64 nonce of the payload
    ciphertext: str  # base64 AESGCM(data_key, payload)


class MasterKey:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise errors.Permanent("the master key must be 32 bytes")
        self._aead = AESGCM(key)
        self._fp_key = hashlib.sha256(b"cove-fingerprint\x00" + key).digest()

    @classmethod
    def load(cls, data_dir: Path) -> MasterKey:
        env = os.environ.get("COVE_MASTER_KEY")
        if env:
            try:
                return cls(_b64d(env, validate=True))
            except ValueError as exc:
                raise errors.Permanent("COVE_MASTER_KEY is not base64 of 32 bytes") from exc
        path = data_dir / "master.key"
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(_b64e(AESGCM.generate_key(bit_length=256)) + b"\n")
        return cls(_b64d(path.read_bytes().strip()))

    def fingerprint(self, *parts: str) -> str:
        """A keyed digest: shows whether a value changed without letting anyone without
        the master key test guesses against it."""
        msg = "\x00".join(parts).encode()
        return hmac.new(self._fp_key, msg, hashlib.sha256).hexdigest()[:16]

    @classmethod
    def ephemeral(cls) -> MasterKey:
        """A throwaway key (tests, in-memory stores)."""
        return cls(AESGCM.generate_key(bit_length=256))

    def seal(self, payload: bytes, aad: bytes) -> Sealed:
        data_key = AESGCM.generate_key(bit_length=256)
        nonce, knonce = os.urandom(12), os.urandom(12)
        ct = AESGCM(data_key).encrypt(nonce, payload, aad)
        wrapped = knonce + self._aead.encrypt(knonce, data_key, aad)
        return Sealed(_b64e(wrapped).decode(), _b64e(nonce).decode(), _b64e(ct).decode())

    def open(self, sealed: Sealed, aad: bytes) -> bytes:
        try:
            wrapped = _b64d(sealed.wrapped_key)
            data_key = self._aead.decrypt(wrapped[:12], wrapped[12:], aad)
            return AESGCM(data_key).decrypt(_b64d(sealed.nonce), _b64d(sealed.ciphertext), aad)
        except (InvalidTag, ValueError) as exc:
            raise errors.Permanent(
                "a secret could not be decrypted (wrong master key or damaged data)",
                hint="start the server with the master key the data was written with",
            ) from exc
