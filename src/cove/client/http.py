"""A thin, typed wrapper over httpx: JSON in, JSON out, problem+json turned into CoveError."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import httpx

from cove import errors

T = TypeVar("T")


def unix_path(base_url: str) -> str | None:
    """The socket path of a ``unix:/path/api.sock`` API URL (None for http/https URLs)."""
    if base_url.startswith("unix:"):
        return base_url[len("unix:") :].removeprefix("//") or None
    return None


def _http_base(base_url: str) -> str:
    # over a unix socket the host part is only for the Host header
    return "http://cove" if unix_path(base_url) else base_url.rstrip("/")


class Client:
    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        headers = {"User-Agent": "cove-cli"}
        if token:
            if not (token.isascii() and token.isprintable()) or " " in token:
                # httpx would fail deep inside (UnicodeEncodeError, LocalProtocolError)
                raise errors.Unauthenticated(
                    "the token is not valid (it holds characters no cove token has)",
                    hint="sign in again with `cove auth login`, or check COVE_TOKEN",
                )
            headers["Authorization"] = f"Bearer {token}"
        try:
            uds = unix_path(base_url)
            self._http = httpx.Client(
                base_url=_http_base(base_url),
                headers=headers,
                timeout=timeout,
                transport=httpx.HTTPTransport(uds=uds) if uds else None,
            )
        except httpx.InvalidURL as exc:
            raise errors.UserError(
                f"{base_url!r} is not a valid cove API URL ({exc})",
                hint="use a URL such as http://127.0.0.1:8470 (--api-url or COVE_API_URL)",
                code="bad_api_url",
            ) from exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _params(params: dict[str, Any] | None) -> dict[str, Any]:
        return {k: v for k, v in (params or {}).items() if v is not None}

    def _unreachable(self, exc: Exception) -> errors.CoveError:
        return errors.Transient(
            f"can't reach the cove API at {self.base_url} ({type(exc).__name__})",
            hint="is cove running? start it with `cove up`, or set --api-url / COVE_API_URL",
            code="unreachable",
        )

    @staticmethod
    def _check_path(path: str) -> None:
        """Names and IDs are interpolated into paths: one holding '..', '?' or '#' would
        reach another route (``apps describe ../orgs/x``), so refuse it here."""
        if "?" in path or "#" in path or any(s in (".", "..") for s in path.split("/")):
            raise errors.UserError(
                f"invalid name or ID in {path!r}",
                hint="names and IDs never hold '..', '?' or '#'",
            )

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        self._check_path(path)
        try:
            resp = self._http.request(
                method,
                path,
                params=self._params(params),
                json=json_body,
                headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return self._decode(resp)

    @staticmethod
    def _decode(resp: httpx.Response) -> Any:
        if resp.status_code >= 400:
            try:
                doc = resp.json()
            except ValueError:
                doc = {"detail": resp.text[:500] or resp.reason_phrase}
            if not isinstance(doc, dict):
                doc = {"detail": str(doc)}
            raise errors.from_problem(doc, resp.status_code)
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as exc:
            raise errors.Permanent(
                f"the API answered something that is not JSON: {resp.text[:200]!r}"
            ) from exc

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None, **params: Any) -> Any:
        return self.request("POST", path, params=params, json_body=body)

    def patch(self, path: str, body: Any = None, **params: Any) -> Any:
        return self.request("PATCH", path, params=params, json_body=body)

    def put(self, path: str, body: Any = None, **params: Any) -> Any:
        return self.request("PUT", path, params=params, json_body=body)

    def delete(self, path: str, **params: Any) -> Any:
        return self.request("DELETE", path, params=params)

    def list_all(self, path: str, **params: Any) -> list[dict[str, Any]]:
        """Every item of a paginated list."""
        out: list[dict[str, Any]] = []
        after = None
        while True:
            page = self.get(path, **params, after=after, limit=1000)
            out.extend(page["items"])
            after = page.get("next")
            if not after:
                return out

    def stream_lines(
        self, path: str, *, params: dict[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """NDJSON documents from a streaming endpoint (blank keep-alive lines skipped)."""
        self._check_path(path)
        try:
            with self._http.stream("GET", path, params=self._params(params), timeout=None) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._decode(resp)
                for line in resp.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc


class AsyncClient:
    """The asyncio twin of :class:`Client` (used by the node agent).

    *base_url* may list several replicas' URLs, comma-separated: a request that can't connect
    to the current one (it never reached a server, so any method is safe to send again) goes
    to the next, and the client stays with the one that answered."""

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30.0) -> None:
        self.urls = [u.strip().rstrip("/") for u in base_url.split(",") if u.strip()] or [""]
        headers = {"User-Agent": "cove-agent"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._clients = []
        for url in self.urls:
            uds = unix_path(url)
            self._clients.append(
                httpx.AsyncClient(
                    base_url=_http_base(url),
                    headers=headers,
                    timeout=timeout,
                    transport=httpx.AsyncHTTPTransport(uds=uds) if uds else None,
                )
            )
        self._current = 0

    @property
    def base_url(self) -> str:
        """The replica this client talks to now."""
        return self.urls[self._current]

    async def aclose(self) -> None:
        for c in self._clients:
            await c.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        timeout: float | None = None,
    ) -> Any:
        for attempt in range(len(self._clients)):
            i = self._current
            try:
                resp = await self._clients[i].request(
                    method,
                    path,
                    params=Client._params(params),
                    json=json_body,
                    timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
                break
            except httpx.TransportError as exc:
                if len(self._clients) > 1 and self._current == i:
                    self._current = (i + 1) % len(self._clients)  # the next call goes there
                if isinstance(exc, httpx.ConnectError) and attempt + 1 < len(self._clients):
                    continue  # nothing was sent: try the next replica now
                raise errors.Transient(
                    f"can't reach the cove API at {self.urls[i]} ({type(exc).__name__})",
                    hint="is the server running?",
                    code="unreachable",
                ) from exc
        return Client._decode(resp)

    async def get(self, path: str, *, timeout: float | None = None, **params: Any) -> Any:
        return await self.request("GET", path, params=params, timeout=timeout)

    async def post(self, path: str, body: Any = None) -> Any:
        return await self.request("POST", path, json_body=body)

    async def put(self, path: str, body: Any = None) -> Any:
        return await self.request("PUT", path, json_body=body)


async def unless_reconnected(request: Awaitable[T], reconnected: asyncio.Event) -> T | None:
    """*request*'s answer, or None (and *request* cancelled) if *reconnected* is set first:
    then the caller asks again, on a fresh connection."""
    task = asyncio.ensure_future(request)
    flag = asyncio.ensure_future(reconnected.wait())
    try:
        await asyncio.wait({task, flag}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        flag.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, errors.CoveError):
        await task
    reconnected.clear()
    return None
