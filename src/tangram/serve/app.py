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
from jinja2.exceptions import TemplateError  # chat templates are jinja (torch and transformers depend on it)
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tangram.control import Controller, Deployment, DeploymentUnavailable, UnknownDeployment
from tangram.engine import RequestError, RequestOutput, SamplingParams
from tangram.serve import dashboard, schemas
from tangram.serve.auth import APIKeyMiddleware
from tangram.serve.errors import APIError, ErrorGuard, validation_message
from tangram.serve.metrics import Metrics
from tangram.store import CheckpointError


_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
               405: "invalid_request_error"}


def create_app(controller: Controller, *, admin_token: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI application over a controller; with `api_key`, every /v1/* route needs it as a bearer key."""
    app = FastAPI(title="Tangram", version="0.1")
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    metrics = Metrics(controller.status, controller.names)
    app.state.metrics = metrics
    app.add_middleware(ErrorGuard, on_response=metrics.response)  # outermost: counts every response, 401s too

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        body = exc.body if isinstance(exc.body, dict) else {}
        request.state.deployment = metrics.label(body.get("model"))
        message, param = validation_message(list(exc.errors()))
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404 and exc.detail == "Not Found":
            message = f"unknown route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        err = APIError(exc.status_code, message, _HTTP_TYPES.get(exc.status_code, "invalid_request_error"))
        response = err.response()
        response.headers.update(exc.headers or {})
        return response

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
        except TemplateError as exc:  # e.g. raise_exception("roles must alternate"): the messages' fault
            raise APIError(400, f"the model's chat template rejects these messages: {exc}", param="messages") from None

    def sampling(body: schemas.SamplingFields, max_tokens: int) -> SamplingParams:
        try:
            return body.sampling(max_tokens)
        except ValidationError as exc:
            message, param = validation_message(exc.errors())
            raise APIError(400, message, param=param) from None

    async def respond(request: Request, body: schemas.SamplingFields, prompt, max_tokens: int, chat: bool):
        started = time.perf_counter()
        name = body.model
        label = request.state.deployment = metrics.label(name)  # the guard counts the response under it
        first, agen = await open_stream(name, prompt, sampling(body, max_tokens), chat)
        first_at = time.perf_counter()
        metrics.first_token(label, first)

        def done(final: RequestOutput) -> None:
            now = time.perf_counter()
            metrics.finished(label, now - started, final.completion_tokens, now - first_at,
                             final.completion_tokens - first.completion_tokens)

        rid, created = schemas.new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        if not body.stream:
            outs = [first] + [o async for o in agen]
            final = outs[-1]
            if final.finish_reason == "error":
                raise APIError(500, f"the request failed after {final.completion_tokens} tokens: {final.error}",
                               "server_error")
            text = "".join(o.delta for o in outs)
            done(final)
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
                done(out)
            finally:
                with anyio.CancelScope(shield=True):  # a disconnect cancels us: still abort and free KV blocks
                    await agen.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request):
        messages = [m.template_message() for m in body.messages]
        return await respond(request, body, messages, body.limit(), chat=True)

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest, request: Request):
        return await respond(request, body, body.prompt, body.max_tokens, chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "tangram",
                                            "parent": controller.describe(n).get("parent")}  # as vLLM lists it
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
        before = controller.describe(spec.name) if spec.name in controller.names() else None
        if before is not None:
            metrics.observe(spec.name, before)
        try:
            after = await controller.deploy(spec)
        except (CheckpointError, OSError, ValueError) as exc:
            param = getattr(exc, "param", None) or ("adapter" if spec.adapter else "checkpoint")
            raise APIError(400, f"cannot deploy {spec.name!r}: {exc}", param=param) from None
        if before is not None and before["resolved_checkpoint"] != after["resolved_checkpoint"]:
            metrics.retire(spec.name)  # replaced: the new one counts from zero, on top of the old one's counts
        return after

    @app.delete("/admin/deployments/{name}", dependencies=[Depends(admin)])
    async def remove(name: str):
        if name in controller.names():
            metrics.observe(name, controller.describe(name))
        try:
            await controller.remove(name)
        except UnknownDeployment:
            raise APIError(404, f"no deployment {name!r}", code="model_not_found") from None
        metrics.retire(name)  # its counters keep their value
        return {"removed": name}

    @app.get("/admin/status", dependencies=[Depends(admin)])
    async def status():
        return await controller.status_now()

    dashboard.mount(app, controller, admin)  # GET /dashboard (page) and /admin/pool-map (its data)

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
