"""OpenAI error objects for every failure of the HTTP API, and the guard that keeps unexpected errors JSON.

Every error the server answers is `{"error": {"message", "type", "param", "code"}}`: bad input (400),
unknown routes (404), wrong methods (405), and unexpected failures (a logged JSON 500). Error bodies are
rendered ASCII-only, so text echoed from a request (even invalid Unicode) can never break the response.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# the names pydantic gives the members of a union in an error's location (e.g. "function-after[...]")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "nullable"}


class ErrorResponse(JSONResponse):
    """A JSON response rendered with ASCII escapes (a lone surrogate in an echoed value cannot fail encoding)."""

    def render(self, content: Any) -> bytes:
        """The body bytes."""
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, type_: str = "invalid_request_error", *, code: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> ErrorResponse:
    """An OpenAI error object response."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return ErrorResponse(body, status_code=status, headers=headers)


class APIError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> ErrorResponse:
        """The JSON response."""
        return error_response(self.status, self.message, self.type, code=self.code, param=self.param)


def _location(loc: tuple | list) -> str | None:
    parts = [str(x) for x in loc if x != "body" and not (isinstance(x, str) and ("[" in x or x in _TYPE_TAGS))]
    return ".".join(parts) or None


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A readable message and the offending parameter of a pydantic/FastAPI validation error list.

    Of a union's member errors, the first that is not a plain type mismatch is the one that explains
    (`prompt: [5, 2**40]` is a token-id list with an id out of range, not "a valid string").
    """
    if not errors:
        return "invalid request", None
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON", None
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    param = _location(first.get("loc", ()))
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return f"{param + ': ' if param else ''}{msg}", param


class ErrorGuard:
    """Pure ASGI middleware around the app: an unexpected exception becomes a logged JSON 500 error object (the
    keep-alive connection stays usable), and every HTTP response's status goes to `on_response(scope, status)`.

    An exception after the response started (a stream that broke) can only close the connection: it is
    re-raised for the server to do so.
    """

    def __init__(self, app: ASGIApp, on_response: Callable[[Scope, int], None]) -> None:
        """Wrap `app`; `on_response` is called once per HTTP response (metrics)."""
        self.app, self.on_response = app, on_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one connection scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if status is not None:
                self._count(scope, status)
                raise
            log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            await error_response(500, f"internal server error ({type(exc).__name__}); the server logged the details",
                                 "server_error")(scope, receive, watch)
        self._count(scope, status if status is not None else 500)

    def _count(self, scope: Scope, status: int) -> None:
        try:
            self.on_response(scope, status)
        except Exception:  # noqa: BLE001 - metrics must never fail a response
            log.exception("counting a response failed")
