"""Who is calling: principals from bearer tokens, and which orgs they may see.

A member of one org can neither read, change nor detect another org's resources: every
read is filtered by the principal's scope, and anything outside it answers the same 404
as something absent.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from cove import errors, security
from cove.ids import new_id
from cove.model.resource import now_iso
from cove.store import Store, Tx
from cove.store import schema as t
from cove.store.db import Scope

SESSION_DAYS = 30
# the cluster operator: the first account signed up on a cluster (it changes nodes)
OPERATOR_SETTING = "operator_user_id"


@dataclass(frozen=True)
class Principal:
    kind: str  # "user" | "node"
    token_id: str
    token_kind: str  # session | api | node
    user_id: str | None = None
    email: str | None = None
    node_id: str | None = None
    roles: tuple[tuple[str, str], ...] = ()  # (org_id, role) the principal may act in
    operator: bool = False  # may change cluster resources (nodes)

    @property
    def org_ids(self) -> frozenset[str]:
        return frozenset(o for o, _ in self.roles)

    def role_in(self, org_id: str) -> str | None:
        for o, r in self.roles:
            if o == org_id:
                return r
        return None

    def scope(self) -> Scope:
        return Scope(self.org_ids, cluster=True)

    def require_node(self, node_id: str | None = None) -> str:
        """This node's ID; Forbidden for users, and for a node acting for another node."""
        if self.kind != "node" or self.node_id is None:
            raise errors.Forbidden("only node agents make this call")
        if node_id is not None and node_id != self.node_id:
            raise errors.Forbidden("a node may only act for itself")
        return self.node_id


def _parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# built once: every request of every agent runs it
_TOKEN_BY_HASH = sa.select(t.tokens).where(t.tokens.c.token_hash == sa.bindparam("b_hash"))


class NodeTokens:
    """Node tokens this server found valid in the last ``ttl`` seconds. 500 agents make
    hundreds of requests a second, and reading each one's token row was a twelfth of what
    the server did while 10,000 instances started. A node's tokens are revoked when it
    registers again: the register route then forgets them here at once; a rejoin through
    another replica is seen here within ``ttl`` seconds. User tokens are always read."""

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self.lock = threading.Lock()
        self.seen: dict[str, tuple[float, str | None, Principal]] = {}  # hash -> (at, expiry, who)

    def get(self, token_hash: str) -> Principal | None:
        with self.lock:
            hit = self.seen.get(token_hash)
        if hit is None:
            return None
        at, expires, who = hit
        if time.monotonic() - at > self.ttl or (
            expires is not None and _parse_ts(expires) < datetime.now(UTC)
        ):
            return None
        return who

    def put(self, token_hash: str, expires: str | None, who: Principal) -> None:
        with self.lock:
            if len(self.seen) > 100_000:  # only valid tokens get here; bound it anyway
                self.seen.clear()
            self.seen[token_hash] = (time.monotonic(), expires, who)

    def forget(self, node_id: str) -> None:
        with self.lock:
            for h in [h for h, (_, _, who) in self.seen.items() if who.node_id == node_id]:
                del self.seen[h]


def authenticate(
    store: Store, authorization: str | None, node_tokens: NodeTokens | None = None
) -> Principal:
    if not authorization:
        raise errors.Unauthenticated(
            "this call needs a token", hint="sign in with `cove auth login` or pass a token"
        )
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 200:
        raise errors.Unauthenticated(
            "the Authorization header must be 'Bearer <token>'",
            hint="sign in again with `cove auth login`",
        )
    h = security.hash_token(token)
    if node_tokens is not None and (known := node_tokens.get(h)) is not None:
        return known
    with store.read() as conn:
        row = conn.execute(_TOKEN_BY_HASH, {"b_hash": h}).mappings().first()
        if row is None or row["revoked_at"] is not None:
            raise errors.Unauthenticated(
                "the token is not valid (unknown, revoked or signed out)",
                hint="sign in again with `cove auth login`",
            )
        if row["expires_at"] and _parse_ts(row["expires_at"]) < datetime.now(UTC):
            raise errors.Unauthenticated(
                "the token has expired", hint="sign in again with `cove auth login`"
            )
        if row["kind"] == "node":
            node = Principal("node", row["id"], "node", node_id=row["node_id"])
            if node_tokens is not None:
                node_tokens.put(h, row["expires_at"], node)
            return node
        user = (
            conn.execute(sa.select(t.users).where(t.users.c.id == row["user_id"])).mappings().one()
        )
        mq = sa.select(t.memberships.c.org_id, t.memberships.c.role).where(
            t.memberships.c.user_id == row["user_id"]
        )
        if row["org_id"]:
            mq = mq.where(t.memberships.c.org_id == row["org_id"])
        roles = tuple((str(o), str(r)) for o, r in conn.execute(mq))
        operator = (
            conn.execute(
                sa.select(t.cluster_settings.c.value).where(
                    t.cluster_settings.c.key == OPERATOR_SETTING
                )
            ).scalar()
            == row["user_id"]
        )
    if row["last_used_at"] is None or (
        datetime.now(UTC) - _parse_ts(row["last_used_at"]) > timedelta(minutes=1)
    ):
        with store.write() as tx:  # no revision: token bookkeeping is not a resource
            tx.conn.execute(
                sa.update(t.tokens).where(t.tokens.c.id == row["id"]).values(last_used_at=now_iso())
            )
    return Principal(
        "user",
        row["id"],
        row["kind"],
        user_id=row["user_id"],
        email=user["email"],
        roles=roles,
        operator=operator,
    )


def create_user(tx: Tx, email: str, password: str) -> dict[str, Any]:
    email = email.strip().lower()
    exists = tx.conn.execute(sa.select(t.users.c.id).where(t.users.c.email == email)).first()
    if exists:
        raise errors.Conflict(
            f"an account for {email} already exists",
            hint="sign in with `cove auth login`",
            code="already_exists",
        )
    uid = new_id("usr")
    if tx.conn.execute(sa.select(t.users.c.id).limit(1)).first() is None:
        tx.set_setting(OPERATOR_SETTING, uid)
    tx.conn.execute(
        sa.insert(t.users).values(
            id=uid,
            email=email,
            password_hash=security.hash_password(password),
            created_at=now_iso(),
        )
    )
    return {"id": uid, "email": email}


def add_member(tx: Tx, user_id: str, org_id: str, role: str) -> None:
    tx.conn.execute(
        sa.insert(t.memberships).values(
            user_id=user_id, org_id=org_id, role=role, created_at=now_iso()
        )
    )


def issue_token(
    tx: Tx,
    kind: str,
    *,
    name: str,
    user_id: str | None = None,
    org_id: str | None = None,
    node_id: str | None = None,
    expires_days: int | None = None,
) -> tuple[str, dict[str, Any]]:
    token = security.new_token(kind)
    tid = new_id("tok")
    now = datetime.now(UTC)
    expires = (
        (now + timedelta(days=expires_days)).isoformat(timespec="seconds").replace("+00:00", "Z")
        if expires_days
        else None
    )
    values = {
        "id": tid,
        "token_hash": security.hash_token(token),
        "kind": kind,
        "name": name,
        "user_id": user_id,
        "org_id": org_id,
        "node_id": node_id,
        "created_at": now_iso(),
        "expires_at": expires,
        "last_used_at": None,
        "revoked_at": None,
    }
    tx.conn.execute(sa.insert(t.tokens).values(**values))
    return token, token_view(values)


def revoke_node_tokens(tx: Tx, node_id: str) -> None:
    tx.conn.execute(
        sa.update(t.tokens)
        .where(t.tokens.c.node_id == node_id, t.tokens.c.revoked_at.is_(None))
        .values(revoked_at=now_iso())
    )


def token_view(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "kind": row["kind"],
        "org": row["org_id"],
        "created_at": row["created_at"],
        "expires_at": row["expires_at"],
        "last_used_at": row["last_used_at"],
        "revoked_at": row["revoked_at"],
    }


def check_login(store: Store, email: str, password: str) -> dict[str, Any]:
    with store.read() as conn:
        user = (
            conn.execute(sa.select(t.users).where(t.users.c.email == email.strip().lower()))
            .mappings()
            .first()
        )
    stored = user["password_hash"] if user else security.DUMMY_PASSWORD_HASH
    ok = security.verify_password(password, stored)
    if user is None or not ok:
        raise errors.Unauthenticated(
            "wrong email or password", hint="check both, or sign up with `cove auth signup`"
        )
    return {"id": user["id"], "email": user["email"]}


def user_orgs(store: Store, user_id: str) -> list[dict[str, Any]]:
    with store.read() as conn:
        rows = conn.execute(
            sa.select(t.memberships.c.org_id, t.memberships.c.role, t.resources.c.name)
            .join(t.resources, t.resources.c.id == t.memberships.c.org_id)
            .where(t.memberships.c.user_id == user_id)
            .order_by(t.resources.c.name)
        ).all()
    return [{"id": r[0], "role": r[1], "name": r[2]} for r in rows]
