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
from tangram.control.migrate import MigrateRequest
from tangram.engine import RequestError, RequestOutput, SamplingParams
from tangram.engine.prompt import ChatPrompt
from tangram.engine.structured import StructuredOutput
from tangram.serve import choices, dashboard, extras, schemas, tools
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

    def sampling(body: schemas.ChatCompletionRequest | schemas.CompletionRequest) -> SamplingParams:
        try:
            return body.engine_params()
        except ValidationError as exc:
            message, param = validation_message(exc.errors())
            raise APIError(400, message, param=param) from None

    def constraint(body: schemas.SamplingFields) -> StructuredOutput | None:
        try:
            return body.constraint()
        except ValueError as exc:
            raise APIError(400, str(exc), param=str(exc).split(":")[0]) from None

    async def respond(request: Request, body: schemas.ChatCompletionRequest | schemas.CompletionRequest, prompt,
                      chat: bool, parse_tools: bool = False):
        started = time.perf_counter()
        name = body.model
        label = request.state.deployment = metrics.label(name)  # the guard counts the response under it
        params, structured = sampling(body), constraint(body)
        if structured is not None:
            params = params.model_copy(update={"structured": structured})
        first, agen = await open_stream(name, prompt, params, chat)
        first_at = time.perf_counter()
        metrics.first_token(label, first)

        def done(final: RequestOutput) -> None:
            now = time.perf_counter()
            metrics.finished(label, now - started, final.completion_tokens, now - first_at,
                             final.completion_tokens - first.completion_tokens)

        rid, created = schemas.new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        top = (body.top_logprobs or 0) if chat and body.logprobs else None  # chat: top logprobs per token
        text_lps = not chat and body.logprobs is not None  # completions: the logprobs object
        echo = "" if chat or not body.echo else choices.prompt_text(first, prompt)
        if not body.stream:
            outs = [first] + [o async for o in agen]
            final = outs[-1]
            failed = next((o for o in outs if o.finish_reason == "error"), None)
            if failed is not None:
                raise APIError(500, f"the request failed after {final.completion_tokens} tokens: {failed.error}",
                               "server_error")
            done(final)
            seqs = choices.collect(outs, params.n)
            if chat:
                payload = schemas.chat_body(rid, name, seqs, final, top)
                if parse_tools:
                    for choice, seq in zip(payload["choices"], seqs):
                        tools.answer_with_calls(choice, seq.text)
            else:
                items = []
                for c in seqs:
                    lp = None
                    if text_lps:
                        lp = choices.TextLogprobs()
                        lp.add((first.prompt_logprobs or []) if body.echo else [])
                        lp.add(c.entries)
                    items.append((echo + c.text, lp, c.finish_reason))
                payload = schemas.completion_body(rid, name, created, items, final)
            headers = {"x-tangram-start": first.stages.start, "x-tangram-ttft": f"{first.stages.ttft_s:.6f}"}
            return JSONResponse(payload, headers=headers)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            out = first
            lps = [choices.TextLogprobs() for _ in range(params.n)] if text_lps else None
            calls = [tools.ToolCallStream() for _ in range(params.n)] if parse_tools else None
            try:
                for i in range(params.n):
                    if chat:
                        yield _sse(schemas.chat_chunk(rid, name, created, {"role": "assistant", "content": ""},
                                                      index=i))
                    elif body.echo:
                        part = lps[i].add(first.prompt_logprobs or []).body() if lps else None
                        yield _sse(schemas.completion_chunk(rid, name, created, echo, index=i, logprobs=part))
                while True:
                    if out.delta or out.finish_reason is not None or out.logprobs:
                        reason = schemas.finish(out)
                        extra = {"tangram": schemas.extension(out)} if out.finished else {}
                        if calls is not None:
                            ended = out.finish_reason is not None
                            delta, reason = calls[out.index].delta(out.delta, reason, final=ended)
                            if delta or ended:
                                yield _sse(schemas.chat_chunk(rid, name, created, delta, reason, index=out.index,
                                                              **extra))
                        elif chat:
                            delta = {"content": out.delta} if out.delta else {}
                            lp = choices.chat_logprobs(out.logprobs, top) if top is not None else None
                            yield _sse(schemas.chat_chunk(rid, name, created, delta, reason, index=out.index,
                                                          logprobs=lp, **extra))
                        else:
                            lp = lps[out.index].add(out.logprobs or []).body() if lps else None
                            yield _sse(schemas.completion_chunk(rid, name, created, out.delta, reason,
                                                                index=out.index, logprobs=lp, **extra))
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
        prompt = ChatPrompt(messages, [t.model_dump(exclude_none=True) for t in body.tools]) if body.tools else messages
        return await respond(request, body, prompt, chat=True,
                             parse_tools=bool(body.tools) and body.tool_choice != "none")

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest, request: Request):
        return await respond(request, body, body.prompt, chat=False)

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

    @app.post("/admin/migrate", dependencies=[Depends(admin)])
    async def migrate(body: MigrateRequest):
        try:
            return await controller.migrator.migrate(body.deployment, body.to)
        except UnknownDeployment:
            raise APIError(404, f"no deployment {body.deployment!r}", code="model_not_found",
                           param="deployment") from None
        except ValueError as exc:
            raise APIError(400, str(exc), param="to") from None
        except RuntimeError as exc:  # no instance could start on the destination
            raise APIError(503, str(exc), "server_error") from None

    @app.get("/admin/status", dependencies=[Depends(admin)])
    async def status():
        return await controller.status_now()

    dashboard.mount(app, controller, admin)  # GET /dashboard (page) and /admin/pool-map (its data)
    extras.mount(app, controller)  # GET /v1/models/{id}, POST /tokenize, /detokenize, GET /version (vLLM's)

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
