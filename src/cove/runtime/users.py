"""Resolve the image user (``"1000"``, ``"1000:1000"``, ``"app"``, ``"app:staff"``) to ids.

Names are looked up in the image's own /etc/passwd and /etc/group, never the host's. As with
OCI runtimes: a numeric uid that is not in /etc/passwd runs with gid 0 unless a gid is given;
supplementary groups are the groups that list the user name as a member.
"""

from __future__ import annotations

from dataclasses import dataclass

from cove.errors import UserError

MAX_ID = 65535  # an instance has 65536 ids (cove.runtime.idmap)


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    name: str | None = None
    home: str | None = None


def _parse(text: str, width: int) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) < width:
            continue
        rows.append(fields)
    return rows


def _as_id(value: str, what: str, user: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"bad {what} in user {user!r}: {value!r}") from None
    if not 0 <= n <= MAX_ID:
        raise UserError(
            f"{what} {n} in user {user!r} is out of range",
            hint=f"use ids between 0 and {MAX_ID}",
        )
    return n


def resolve_user(user: str, passwd: str | None, group: str | None) -> Identity:
    """Resolve *user* against the image's passwd/group file contents (None: file absent)."""
    spec = user.strip() or "0"
    name_part, sep, group_part = spec.partition(":")
    if not name_part or (sep and not group_part):
        raise UserError(f"bad user {user!r}", hint='use "uid", "uid:gid", "name" or "name:group"')
    pw_rows = _parse(passwd or "", 7)
    gr_rows = _parse(group or "", 4)

    name: str | None = None
    home: str | None = None
    gid: int | None = None
    if name_part.isdigit():
        uid = _as_id(name_part, "uid", user)
        for row in pw_rows:
            if row[2] == name_part:
                name, home = row[0], row[5]
                gid = _as_id(row[3], "gid", user)
                break
    else:
        for row in pw_rows:
            if row[0] == name_part:
                name, home = row[0], row[5]
                uid = _as_id(row[2], "uid", user)
                gid = _as_id(row[3], "gid", user)
                break
        else:
            raise UserError(
                f"user {name_part!r} is not in the image's /etc/passwd",
                hint="use a numeric uid or add the user to the image",
            )

    if group_part:
        if group_part.isdigit():
            gid = _as_id(group_part, "gid", user)
        else:
            for row in gr_rows:
                if row[0] == group_part:
                    gid = _as_id(row[2], "gid", user)
                    break
            else:
                raise UserError(
                    f"group {group_part!r} is not in the image's /etc/group",
                    hint="use a numeric gid or add the group to the image",
                )
    if gid is None:
        gid = 0

    groups: list[int] = []
    if name is not None and not group_part:
        for row in gr_rows:
            members = [m for m in row[3].split(",") if m]
            if name in members and row[2].isdigit():
                g = int(row[2])
                if 0 <= g <= MAX_ID and g != gid and g not in groups:
                    groups.append(g)
    return Identity(uid=uid, gid=gid, groups=tuple(groups), name=name, home=home)
