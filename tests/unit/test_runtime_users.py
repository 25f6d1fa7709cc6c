"""Resolving the image user against the image's own /etc/passwd and /etc/group."""

from __future__ import annotations

import pytest

from cove.errors import UserError
from cove.runtime.users import Identity, resolve_user

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
# a comment
app:x:1000:1000:app:/home/app:/bin/sh
www-data:x:33:33:www:/var/www:/usr/sbin/nologin
broken line
"""
GROUP = "root:x:0:\napp:x:1000:\nstaff:x:50:app,www-data\naudio:x:29:app\nwheel:x:10:\n"


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("0", Identity(0, 0, (), "root", "/root")),
        ("", Identity(0, 0, (), "root", "/root")),
        ("app", Identity(1000, 1000, (50, 29), "app", "/home/app")),
        ("1000", Identity(1000, 1000, (50, 29), "app", "/home/app")),
        ("app:wheel", Identity(1000, 10, (), "app", "/home/app")),
        ("app:77", Identity(1000, 77, (), "app", "/home/app")),
        ("4242", Identity(4242, 0)),  # unknown numeric uid: gid 0, like OCI runtimes
        ("4242:4343", Identity(4242, 4343)),
        ("www-data", Identity(33, 33, (50,), "www-data", "/var/www")),
    ],
)
def test_resolves(user: str, expected: Identity) -> None:
    assert resolve_user(user, PASSWD, GROUP) == expected


def test_numeric_ids_work_without_passwd_files() -> None:
    assert resolve_user("1000:1000", None, None) == Identity(1000, 1000)


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("ghost", "not in the image's /etc/passwd"),
        ("app:nogroup", "not in the image's /etc/group"),
        ("70000", "out of range"),
        ("app:70000", "out of range"),
        (":1000", "bad user"),
        ("app:", "bad user"),
        ("-1", "not in the image's /etc/passwd"),
    ],
)
def test_bad_users_are_user_errors(user: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        resolve_user(user, PASSWD, GROUP)


def test_names_need_a_passwd_file() -> None:
    with pytest.raises(UserError):
        resolve_user("app", None, None)
