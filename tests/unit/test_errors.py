"""The exception tree and problem+json documents survive a round trip through the wire."""

from __future__ import annotations

import json

import pytest

from cove import errors

CASES = [
    errors.CoveError("boom"),
    errors.UserError("name is wrong", hint="use lower case", extra={"errors": [{"field": "name"}]}),
    errors.BadRequest("not JSON", code="bad_json", hint="send JSON"),
    errors.Unauthenticated("no token", hint="sign in"),
    errors.Forbidden("owners only"),
    errors.TooLarge("too big"),
    errors.NotInV1(
        "no autoscaling", hint="scale", extra={"feature": "autoscaling", "instead": "x"}
    ),
    errors.NotFound("no project p1", hint="list them"),
    errors.Conflict("changed", code="stale_revision", extra={"current_revision": 7}),
    errors.Conflict("taken", code="already_exists"),
    errors.WaitTimeout("too slow", extra={"resource": {"id": "op_x"}}),
    errors.WaitFailed("failed", extra={"resource": None}),
    errors.Transient("busy", hint="retry"),
    errors.Permanent("bug"),
    errors.UserError("which org?", code="org_required"),
]


@pytest.mark.parametrize("err", CASES, ids=lambda e: f"{type(e).__name__}-{e.code}")
def test_problem_round_trip(err: errors.CoveError) -> None:
    doc = json.loads(json.dumps(err.problem()))  # what actually crosses the wire
    assert doc["status"] == err.status
    assert doc["code"] == err.code
    assert doc["detail"] == err.detail
    assert doc["type"].endswith("/" + err.code)
    assert doc["title"]
    back = errors.from_problem(doc, err.status)
    assert type(back) is type(err)
    assert (back.code, back.detail, back.hint, back.status) == (
        err.code,
        err.detail,
        err.hint,
        err.status,
    )
    assert back.extra == err.extra
    assert back.exit_code == err.exit_code


def test_hint_is_omitted_when_absent() -> None:
    assert "hint" not in errors.NotFound("gone").problem()


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, errors.BadRequest),
        (401, errors.Unauthenticated),
        (403, errors.Forbidden),
        (404, errors.NotFound),
        (408, errors.WaitTimeout),
        (409, errors.Conflict),
        (413, errors.TooLarge),
        (422, errors.UserError),
        (503, errors.Transient),
        (502, errors.CoveError),
    ],
)
def test_unknown_code_falls_back_on_status(status: int, cls: type[errors.CoveError]) -> None:
    err = errors.from_problem({"code": "something_new", "detail": "d"}, status)
    assert type(err) is cls
    assert err.status == status
    assert err.code == "something_new"


def test_document_without_detail_still_says_something() -> None:
    err = errors.from_problem({}, 502)
    assert err.detail == "HTTP 502"
    assert err.code == "error"


def test_exit_codes_follow_the_error_kind() -> None:
    assert errors.NotFound("x").exit_code == errors.EXIT_NOT_FOUND
    assert errors.Conflict("x").exit_code == errors.EXIT_CONFLICT
    assert errors.WaitTimeout("x").exit_code == errors.EXIT_TIMEOUT
    assert errors.NotInV1("x").exit_code == errors.EXIT_NOT_IN_V1
