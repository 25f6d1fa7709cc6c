"""Helpers for API tests: signed-up users, problem assertions, driving controllers."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import httpx
import sqlalchemy as sa
from fastapi.testclient import TestClient

from cove import security
from cove.control.controllers import foundation_controllers
from cove.store import Store
from cove.store import schema as t

PROBLEM = "application/problem+json"
PASSWORD = "correct-horse-battery"
_seq = itertools.count(1)


@dataclass
class User:
    email: str
    password: str
    token: str
    token_id: str
    user_id: str
    org: dict[str, Any]
    signup: dict[str, Any] = field(repr=False)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def signup(client: TestClient, org: str, email: str | None = None) -> User:
    email = email or f"user{next(_seq)}@{org}.example"
    r = client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD, "org": org})
    assert r.status_code == 202, r.text
    body = r.json()
    return User(
        email=email,
        password=PASSWORD,
        token=body["token"],
        token_id=body["token_id"],
        user_id=body["user"]["id"],
        org=body["org"],
        signup=body,
    )


def ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return r.json()


def problem(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """Assert *r* is an RFC 9457 problem with *status* (and *code*); return the document."""
    where = f"{r.request.method} {r.request.url}"
    assert r.status_code == status, f"{where}: expected {status}, got {r.status_code} {r.text}"
    assert r.headers["content-type"].startswith(PROBLEM), f"{where}: {r.headers['content-type']}"
    doc = r.json()
    assert doc["status"] == status, doc
    assert isinstance(doc["detail"], str) and doc["detail"], doc
    assert isinstance(doc["code"], str) and doc["code"], doc
    assert doc["type"].endswith("/" + doc["code"]), doc
    if code is not None:
        assert doc["code"] == code, f"{where}: expected code {code}, got {doc}"
    return dict(doc)


def create(client: TestClient, user: User, plural: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a create; return the receipt (asserting 202)."""
    return dict(ok(client.post(f"/v1/{plural}", json=body, headers=user.headers), 202))


def get(client: TestClient, user: User, path: str, **params: Any) -> Any:
    return ok(client.get(path, params=params, headers=user.headers))


def settle(store: Store, rounds: int = 50) -> None:
    """Drive the foundation controllers the way the Manager does, but deterministically
    on this thread: a first pass over every resource of their kinds (the Manager's
    resync), then rounds over what changed since (and its parent) plus whatever asked to
    be looked at again, until a round writes nothing."""
    controllers = foundation_controllers(store)
    by_kind: dict[str, list[Any]] = {}
    for c in controllers:
        for kind in c.kinds:
            by_kind.setdefault(kind, []).append(c)
    todo = [
        (i, rid) for i, c in enumerate(controllers) for k in c.kinds for rid in store.ids_of_kind(k)
    ]
    for _ in range(rounds):
        before = store.head_revision()
        again = set()
        for i, rid in sorted(set(todo)):
            if controllers[i].reconcile(rid) is not None:
                again.add((i, rid))
        if store.head_revision() == before:
            return
        todo = list(again)
        for ch in store.changes_since(before, limit=100_000):
            for rid in (ch["id"], ch["parent_id"]):
                row = store.get_row(rid) if rid else None
                for c in by_kind.get(row["kind"] if row else "", []):
                    todo.append((controllers.index(c), rid))
    raise AssertionError(f"controllers still writing after {rounds} rounds")


def set_join_token(store: Store) -> str:
    """What ``cove.server.ensure_join_token`` does, without a data directory."""
    token = security.new_token("join")
    with store.write() as tx:
        tx.set_setting("join_token_hash", security.hash_token(token))
    return token


def snapshot(store: Store) -> dict[str, Any]:
    """Everything a bad request could have written: the revision counter plus the row
    counts and contents of the tables that change without a revision."""
    with store.read() as conn:
        counts = {
            name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for name, table in t.metadata.tables.items()
        }
        users = sorted(tuple(r) for r in conn.execute(sa.select(t.users)))
        memberships = sorted(tuple(r) for r in conn.execute(sa.select(t.memberships)))
        tokens = sorted((r.id, r.revoked_at, r.org_id) for r in conn.execute(sa.select(t.tokens)))
        settings = sorted(tuple(r) for r in conn.execute(sa.select(t.cluster_settings)))
    return {
        "revision": store.head_revision(),
        "counts": counts,
        "users": users,
        "memberships": memberships,
        "tokens": tokens,
        "settings": settings,
    }
