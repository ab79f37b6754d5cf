"""vLLM's utility endpoints beside the OpenAI API: `GET /v1/models/{id}`, `POST /tokenize`, `POST /detokenize`,
`GET /version`, in vLLM's shapes. Tokenizing reads a deployment's own tokenizer (the one its instances use,
loaded once per checkpoint version) and runs off the event loop: a chat template or a long prompt is CPU work.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from jinja2.exceptions import TemplateError
import tangram
from tangram.control import Controller, UnknownDeployment
from tangram.serve.errors import APIError
from tangram.serve.schemas import DetokenizeRequest, TokenizeRequest


@functools.lru_cache(maxsize=64)
def context_length(path: Path, max_model_len: int | None) -> int | None:
    """The longest sequence a deployment's instances take: its model's context, or its engine's limit."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(path).get_text_config()
    context = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    lengths = [x for x in (context, max_model_len) if x is not None]
    return min(lengths) if lengths else None


def tokenize(tokenizer: Any, body: TokenizeRequest) -> list[int]:
    """The token ids of a /tokenize body (with the defaults the engine itself encodes with)."""
    if body.messages is None:
        return list(tokenizer(body.prompt, add_special_tokens=body.add_special_tokens is not False)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; send a prompt", param="messages")
    messages = [m.template_message() for m in body.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt, tokenize=False)
    return list(tokenizer(text, add_special_tokens=bool(body.add_special_tokens))["input_ids"])


async def _off_loop(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


def mount(app: FastAPI, controller: Controller) -> None:
    """Add the endpoints to `app`."""
    from tangram.engine.skeleton import RUNTIME  # the worker's cache: one tokenizer per checkpoint version

    def deployment(name: str) -> dict:
        try:
            return controller.describe(name)
        except UnknownDeployment:
            raise APIError(404, f"the model {name!r} does not exist", code="model_not_found", param="model") from None

    def model_card(name: str) -> dict:
        d = deployment(name)
        path = Path(d["resolved_checkpoint"])
        return {"id": name, "object": "model", "created": 0, "owned_by": "tangram", "root": str(path),
                "parent": None, "max_model_len": context_length(path, d["engine"].get("max_model_len"))}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        deployment(name)  # a 404 before any work
        return await _off_loop(model_card, name)

    def run_tokenize(body: TokenizeRequest) -> dict:
        d = deployment(body.model)
        path = Path(d["resolved_checkpoint"])
        tokenizer = RUNTIME.tokenizer(path)
        try:
            ids = tokenize(tokenizer, body)
        except TemplateError as exc:
            raise APIError(400, f"the model's chat template rejects these messages: {exc}",
                           param="messages") from None
        return {"count": len(ids), "max_model_len": context_length(path, d["engine"].get("max_model_len")),
                "tokens": ids, "token_strs": tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None}

    @app.post("/tokenize")
    async def tokenize_endpoint(body: TokenizeRequest):
        return await _off_loop(run_tokenize, body)

    def run_detokenize(body: DetokenizeRequest) -> dict:
        tokenizer = RUNTIME.tokenizer(Path(deployment(body.model)["resolved_checkpoint"]))
        if body.tokens and max(body.tokens) >= len(tokenizer):
            raise APIError(400, f"tokens: ids must be in [0, {len(tokenizer)})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.post("/detokenize")
    async def detokenize_endpoint(body: DetokenizeRequest):
        return await _off_loop(run_detokenize, body)

    @app.get("/version")
    async def version():
        return {"version": tangram.__version__}
