"""RFC 9457 problem+json for every error, including the framework's own."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cove import deferred, errors
from cove.model.kinds import kind_by_plural

PROBLEM = "application/problem+json"


def problem_response(err: errors.CoveError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.problem(), status_code=err.status, media_type=PROBLEM, headers=headers)


def _kind_from_path(path: str) -> str | None:
    parts = path.strip("/").split("/")
    if len(parts) >= 2 and parts[0] == "v1":
        k = kind_by_plural(parts[1])
        return k.name if k else None
    return None


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    msg = str(err.get("msg", "invalid"))
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    return f"{loc or 'body'}: {msg}"


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details with cove's stable `code` and a `hint`",
    "required": ["type", "title", "status", "code", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "code": {"type": "string"},
        "detail": {"type": "string"},
        "hint": {"type": "string"},
    },
    "additionalProperties": True,
}


def document(app: FastAPI) -> None:
    """Describe validation failures (422) in the OpenAPI document as what they are:
    problem+json, not FastAPI's default ``HTTPValidationError``."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()
            doc.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
            ref = {"$ref": "#/components/schemas/Problem"}
            for item in doc.get("paths", {}).values():
                for op in item.values():
                    if "422" in op.get("responses", {}):
                        op["responses"]["422"] = {
                            "description": "Invalid request",
                            "content": {PROBLEM: {"schema": ref}},
                        }
            for unused in ("HTTPValidationError", "ValidationError"):
                doc["components"]["schemas"].pop(unused, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI) -> None:
    document(app)

    @app.exception_handler(errors.CoveError)
    async def _cove(_req: Request, exc: errors.CoveError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return problem_response(exc, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(req: Request, exc: RequestValidationError) -> JSONResponse:
        errs = list(exc.errors())
        kind = _kind_from_path(req.url.path)
        for e in errs:
            loc = [str(p) for p in e.get("loc", ())]
            if e.get("type") == "extra_forbidden" and kind and loc[:1] == ["body"]:
                d = deferred.for_field(kind, ".".join(loc[1:]))
                if d is not None:
                    return problem_response(d.error(f"{kind} field {'.'.join(loc[1:])}"))
            if e.get("type") == "extra_forbidden" and loc[:2] == ["body", "endpoints"]:
                # a deploy's endpoints (from cove.toml): body.endpoints.NAME.FIELD
                d = deferred.for_field("endpoint", "spec." + ".".join(loc[3:]))
                if d is not None:
                    return problem_response(d.error(f"endpoint {loc[2]}: {'.'.join(loc[3:])}"))
        if any(e.get("type") == "json_invalid" for e in errs):
            return problem_response(
                errors.BadRequest(
                    "the request body is not valid JSON",
                    code="bad_json",
                    hint="send a JSON object with Content-Type: application/json",
                )
            )
        details = [_describe(e) for e in errs[:20]]
        return problem_response(
            errors.UserError(
                "; ".join(details),
                hint="fix the fields named above; GET /openapi.json describes every body",
                extra={
                    "errors": [
                        {"field": d.split(":", 1)[0], "problem": d.split(": ", 1)[-1]}
                        for d in details
                    ]
                },
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            d = deferred.for_route(req.url.path)
            if d is not None:
                return problem_response(d.error(req.url.path))
            err: errors.CoveError = errors.NotFound(
                f"no such API path: {req.method} {req.url.path}",
                hint="GET /openapi.json lists every path",
            )
        elif exc.status_code == 405:
            err = errors.CoveError(
                f"{req.method} is not allowed on {req.url.path}",
                code="method_not_allowed",
                hint="GET /openapi.json lists the methods of every path",
            )
            err.status = 405
        else:
            err = errors.CoveError(str(exc.detail), code=f"http_{exc.status_code}")
            err.status = exc.status_code
        return problem_response(err, dict(exc.headers) if exc.headers else None)

    @app.exception_handler(Exception)
    async def _crash(_req: Request, exc: Exception) -> JSONResponse:  # pragma: no cover
        import logging

        logging.getLogger("cove.api").exception("unhandled error")
        return problem_response(
            errors.Permanent(
                "the server failed to handle this request",
                hint="this is a bug in cove; the server log has the details",
            )
        )
