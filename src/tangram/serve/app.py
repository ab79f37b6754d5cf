"""The HTTP API: OpenAI-compatible endpoints, admin endpoints (bearer token), Prometheus metrics."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator

import anyio
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from tangram.control import Controller, Deployment, DeploymentUnavailable, UnknownDeployment
from tangram.engine import RequestError, RequestOutput, SamplingParams
from tangram.serve import schemas
from tangram.serve.auth import APIKeyMiddleware
from tangram.serve.metrics import Metrics
from tangram.store import CheckpointError


class APIError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> JSONResponse:
        """The JSON response."""
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(loc) or None
    return f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}", param


def create_app(controller: Controller, *, admin_token: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI application over a controller; with `api_key`, every /v1/* route needs it as a bearer key."""
    app = FastAPI(title="Tangram", version="0.1")
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    metrics = Metrics(controller.status)
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return APIError(400, message, param=param).response()

    def admin(authorization: str | None = Header(None)) -> None:
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not given or not secrets.compare_digest(given.encode(), admin_token.encode()):
            raise APIError(401, "admin endpoints need `Authorization: Bearer <admin token>`", "authentication_error")

    async def open_stream(name: str, prompt, params: SamplingParams, chat: bool
                          ) -> tuple[RequestOutput, AsyncIterator[RequestOutput]]:
        agen = controller.generate(name, prompt, params, chat=chat)
        try:
            first = await agen.__anext__()
            if first.finished and first.finish_reason == "error":  # nothing sent yet: an HTTP error
                await agen.aclose()
                if first.instance_failed:
                    raise APIError(503, f"the model {name!r} could not be served: {first.error}",
                                   "service_unavailable", code="model_unavailable")
                raise APIError(500, f"the request failed: {first.error}", "server_error")
            return first, agen
        except UnknownDeployment:
            raise APIError(404, f"the model {name!r} does not exist", code="model_not_found", param="model") from None
        except DeploymentUnavailable as exc:
            raise APIError(503, str(exc), "service_unavailable", code="model_unavailable") from None
        except RequestError as exc:
            code = "context_length_exceeded" if "context" in str(exc) or "KV" in str(exc) else None
            raise APIError(400, str(exc), code=code) from None

    def sampling(body: schemas.SamplingFields, max_tokens: int) -> SamplingParams:
        try:
            return body.sampling(max_tokens)
        except ValidationError as exc:
            raise APIError(400, _validation_message(exc.errors())[0]) from None

    async def respond(endpoint: str, body: schemas.SamplingFields, prompt, max_tokens: int, chat: bool):
        started = time.perf_counter()
        name = body.model
        try:
            first, agen = await open_stream(name, prompt, sampling(body, max_tokens), chat)
        except APIError as exc:
            metrics.request(name, endpoint, exc.status)
            raise
        metrics.first_token(name, first.stages)
        rid, created = schemas.new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        if not body.stream:
            outs = [first] + [o async for o in agen]
            final = outs[-1]
            if final.finish_reason == "error":
                metrics.request(name, endpoint, 500)
                raise APIError(500, f"the request failed after {final.completion_tokens} tokens: {final.error}",
                               "server_error")
            text = "".join(o.delta for o in outs)
            metrics.request(name, endpoint, 200, time.perf_counter() - started)
            metrics.finished(name, final.completion_tokens)
            if chat:
                payload = schemas.chat_body(rid, name, text, final)
            else:
                payload = schemas.completion_chunk(rid, name, created, text, schemas.finish(final),
                                                   usage=schemas.usage(final), tangram=schemas.extension(final))
            headers = {"x-tangram-start": first.stages.start, "x-tangram-ttft": f"{first.stages.ttft_s:.6f}"}
            return JSONResponse(payload, headers=headers)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            out = first
            try:
                if chat:
                    yield _sse(schemas.chat_chunk(rid, name, created, {"role": "assistant", "content": ""}))
                while True:
                    if out.delta or out.finished:
                        reason = schemas.finish(out) if out.finished else None
                        extra = {"tangram": schemas.extension(out)} if out.finished else {}
                        if chat:
                            delta = {"content": out.delta} if out.delta else {}
                            yield _sse(schemas.chat_chunk(rid, name, created, delta, reason, **extra))
                        else:
                            yield _sse(schemas.completion_chunk(rid, name, created, out.delta, reason, **extra))
                    if out.finished:
                        break
                    out = await agen.__anext__()
                if include_usage:
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    yield _sse({"id": rid, "object": obj, "created": created, "model": name, "choices": [],
                                "usage": schemas.usage(out)})
                yield "data: [DONE]\n\n"
                metrics.request(name, endpoint, 200, time.perf_counter() - started)
                metrics.finished(name, out.completion_tokens)
            finally:
                with anyio.CancelScope(shield=True):  # a disconnect cancels us: still abort and free KV blocks
                    await agen.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletionRequest):
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in body.messages]
        return await respond("chat", body, messages, body.limit(), chat=True)

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest):
        return await respond("completions", body, body.prompt, body.max_tokens, chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "tangram"}
                                           for n in controller.names()]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/admin/deployments", dependencies=[Depends(admin)])
    async def list_deployments():
        return {"deployments": [controller.describe(n) for n in controller.names()]}

    @app.post("/admin/deployments", dependencies=[Depends(admin)])
    async def deploy(spec: Deployment):
        try:
            return await controller.deploy(spec)
        except (CheckpointError, OSError, ValueError) as exc:
            raise APIError(400, f"cannot deploy {spec.name!r}: {exc}", param="checkpoint") from None

    @app.delete("/admin/deployments/{name}", dependencies=[Depends(admin)])
    async def remove(name: str):
        try:
            await controller.remove(name)
        except UnknownDeployment:
            raise APIError(404, f"no deployment {name!r}", code="model_not_found") from None
        return {"removed": name}

    @app.get("/admin/status", dependencies=[Depends(admin)])
    async def status():
        return controller.status()

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
