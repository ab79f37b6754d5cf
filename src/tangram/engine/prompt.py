"""A chat prompt with the tools its template renders: what travels from the API to an engine's intake."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tangram.engine.errors import RequestError

if TYPE_CHECKING:
    from tangram.engine.sampling import SamplingParams


@dataclass(frozen=True)
class ChatPrompt:
    """Messages (as the chat template sees them) and the tools (OpenAI `tools` entries) to render with them."""

    messages: list[dict]
    tools: list[dict] | None = None


Prompt = str | list[int] | list[dict] | ChatPrompt  # text, token ids, chat messages, or messages with tools


def encode_prompt(tokenizer, prompt: Prompt, chat: bool = False) -> list[int]:
    """Prompt ids from text (chat: through the tokenizer's chat template), messages (with tools), or ids.
    Raises RequestError for a chat prompt the model's template cannot render."""
    tools = None
    if isinstance(prompt, ChatPrompt):
        chat, messages, tools = True, prompt.messages, prompt.tools
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        chat, messages = True, prompt
    elif isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        return list(prompt)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError("this model has no chat template; send a plain prompt")
        if tools and "tools" not in str(tokenizer.chat_template):
            raise RequestError("tools: this model's chat template does not render tools")
        enc = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True,
                                            tokenize=True, return_dict=True)
        return list(enc["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def check_prompt(ids: list[int], params: SamplingParams, *, vocab: int, max_model_len: int) -> None:
    """Raise RequestError for prompt ids or parameters an instance of this vocabulary and context cannot serve."""
    if not ids:
        raise RequestError("the prompt is empty")
    if min(ids) < 0 or max(ids) >= vocab:
        raise RequestError(f"prompt token ids must be in [0, {vocab})")
    if (why := params.vocab_errors(vocab)) is not None:
        raise RequestError(why)
    if len(ids) >= max_model_len:
        raise RequestError(f"the prompt has {len(ids)} tokens; the model's context is {max_model_len} "
                           "and at least one token must be generated")
