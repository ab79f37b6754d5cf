"""Access control of the inference API: a bearer API key on every `/v1/*` route (vLLM's `--api-key` convention)."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import JSONResponse

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PREFIX = "/v1"


def bearer(value: bytes | str | None) -> bytes | None:
    """The credential of an `Authorization: Bearer <credential>` header value (scheme case-insensitive), or None."""
    if value is None:
        return None
    raw = value.encode("latin-1") if isinstance(value, str) else value
    scheme, _, credential = raw.strip().partition(b" ")
    credential = credential.strip()
    return credential if scheme.lower() == b"bearer" and credential else None


def key_matches(header: bytes | str | None, key: str) -> bool:
    """Whether an Authorization header value carries exactly `key` (constant-time comparison)."""
    given = bearer(header)
    return given is not None and secrets.compare_digest(given, key.encode())


def guarded(path: str, prefix: str = PREFIX) -> bool:
    """Whether a request path is under the inference API prefix (so needs the key)."""
    return path == prefix or path.startswith(prefix + "/")


def _unauthorized(message: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "authentication_error", "param": None, "code": "invalid_api_key"}}
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


class APIKeyMiddleware:
    """Pure ASGI middleware: `/v1/*` requests without `Authorization: Bearer <key>` get a 401 OpenAI error object.

    Every other path (/health, /metrics, /admin/* with its own token) passes through untouched. Being pure ASGI
    (not BaseHTTPMiddleware), it leaves streaming responses and client-disconnect cancellation as they are.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        """Wrap `app`; `api_key` is the one accepted key."""
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the key of a guarded HTTP request, then hand over to the wrapped app."""
        if scope["type"] != "http" or not guarded(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        if key_matches(header, self.api_key):
            await self.app(scope, receive, send)
            return
        message = ("invalid API key" if header is not None and bearer(header) is not None else
                   "this server requires an API key: send `Authorization: Bearer <key>`")
        await _unauthorized(message)(scope, receive, send)
