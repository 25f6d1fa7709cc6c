"""Passwords are hashed with a salt and verified; tokens are stored as hashes."""

from __future__ import annotations

import hashlib

from cove import security


def test_password_hash_verifies_only_the_right_password() -> None:
    stored = security.hash_password("correct horse battery")
    assert "correct horse battery" not in stored
    assert stored.startswith("scrypt$")
    assert security.verify_password("correct horse battery", stored)
    assert not security.verify_password("correct horse batterY", stored)
    assert not security.verify_password("", stored)


def test_password_hashes_are_salted() -> None:
    a = security.hash_password("same password")
    b = security.hash_password("same password")
    assert a != b
    assert security.verify_password("same password", a)
    assert security.verify_password("same password", b)


def test_garbage_stored_hashes_never_verify() -> None:
    for stored in (
        "",
        "plain",
        "scrypt$x$y$z$a$b",
        "md5$1$1$1$AAAA$AAAA",
        "scrypt$16384$8$1$!!$!!",
    ):
        assert not security.verify_password("anything", stored), stored


def test_dummy_hash_rejects_guesses() -> None:
    assert not security.verify_password("password", security.DUMMY_PASSWORD_HASH)


def test_tokens_are_random_prefixed_and_hashed() -> None:
    tokens = {
        security.new_token(kind) for kind in ("session", "api", "node", "join") for _ in range(5)
    }
    assert len(tokens) == 20
    # the prefix tells a leaked token's kind (session, API, node, join) at a glance
    assert all(t.startswith("cove_") for t in tokens)
    assert len({t[:7] for t in tokens}) == 4
    for t in tokens:
        assert len(t) >= 7 + 43  # 256 bits of randomness after the prefix
        h = security.hash_token(t)
        assert h == hashlib.sha256(t.encode()).hexdigest()
        assert t not in h
        assert security.hash_token(t) == h  # deterministic: the lookup key
