"""One exception tree for cove.

    CoveError                      base: code, detail, hint, HTTP status, CLI exit code
    ├── UserError                  the request is wrong (400 / 422): fix the input
    │   ├── Unauthenticated        no or bad credentials (401)
    │   ├── TooLarge               body over the limit (413)
    │   └── NotInV1                deliberately not supported in v1 (400, code not_in_v1)
    ├── NotFound                   absent, or not yours to see (404): the same answer for both
    ├── Conflict                   stale revision or name taken (409)
    ├── WaitTimeout                a wait ran out of time (408)
    ├── WaitFailed                 the awaited thing failed for good (409, code wait_failed)
    ├── Transient                  infrastructure hiccup, safe to retry (503)
    └── Permanent                  a failure retrying will not fix (500)

Third-party errors are translated to these at the adapter boundary with ``raise ... from exc``.
The CLI maps them to exit codes: 1 error, 2 usage, 3 timeout, 4 not found, 5 conflict, 6 not in v1.
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_NOT_FOUND = 4
EXIT_CONFLICT = 5
EXIT_NOT_IN_V1 = 6


class CoveError(Exception):
    """Base of every error cove raises on purpose."""

    status: int = 500
    code: str = "error"
    exit_code: int = EXIT_ERROR
    title: str = "Error"

    def __init__(
        self,
        detail: str,
        *,
        hint: str | None = None,
        code: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.hint = hint
        if code is not None:
            self.code = code
        self.extra: dict[str, Any] = extra or {}

    def problem(self) -> dict[str, Any]:
        """The RFC 9457 problem document for this error."""
        doc: dict[str, Any] = {
            "type": f"https://cove.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
        }
        if self.hint:
            doc["hint"] = self.hint
        doc.update(self.extra)
        return doc


class UserError(CoveError):
    status = 422
    code = "invalid"
    exit_code = EXIT_ERROR
    title = "Invalid request"


class BadRequest(UserError):
    status = 400
    code = "bad_request"
    title = "Bad request"


class Unauthenticated(UserError):
    status = 401
    code = "unauthenticated"
    title = "Not signed in"


class Forbidden(UserError):
    status = 403
    code = "forbidden"
    title = "Not allowed"


class TooLarge(UserError):
    status = 413
    code = "too_large"
    title = "Request too large"


class NotInV1(UserError):
    status = 400
    code = "not_in_v1"
    exit_code = EXIT_NOT_IN_V1
    title = "Not in v1"


class NotFound(CoveError):
    status = 404
    code = "not_found"
    exit_code = EXIT_NOT_FOUND
    title = "Not found"


class Conflict(CoveError):
    status = 409
    code = "conflict"
    exit_code = EXIT_CONFLICT
    title = "Conflict"


class WaitTimeout(CoveError):
    status = 408
    code = "timeout"
    exit_code = EXIT_TIMEOUT
    title = "Timed out"


class WaitFailed(CoveError):
    status = 409
    code = "wait_failed"
    exit_code = EXIT_ERROR
    title = "Failed"


class Transient(CoveError):
    status = 503
    code = "unavailable"
    title = "Temporarily unavailable"


class Permanent(CoveError):
    status = 500
    code = "internal"
    title = "Internal error"


_BY_CODE: dict[str, type[CoveError]] = {}
for _cls in (
    CoveError,
    UserError,
    BadRequest,
    Unauthenticated,
    Forbidden,
    TooLarge,
    NotInV1,
    NotFound,
    Conflict,
    WaitTimeout,
    WaitFailed,
    Transient,
    Permanent,
):
    _BY_CODE.setdefault(_cls.code, _cls)


def from_problem(doc: dict[str, Any], status: int) -> CoveError:
    """Rebuild an error from a problem+json document (the client side of ``problem``)."""
    code = str(doc.get("code") or "error")
    cls = _BY_CODE.get(code)
    if cls is None:
        cls = {
            400: BadRequest,
            401: Unauthenticated,
            403: Forbidden,
            404: NotFound,
            408: WaitTimeout,
            409: Conflict,
            413: TooLarge,
            422: UserError,
            503: Transient,
        }.get(status, CoveError)
    known = {"type", "title", "status", "code", "detail", "hint"}
    err = cls(
        str(doc.get("detail") or doc.get("title") or f"HTTP {status}"),
        hint=doc.get("hint"),
        code=code,
        extra={k: v for k, v in doc.items() if k not in known},
    )
    err.status = status
    return err
