"""A chat prompt with the tools its template renders: what travels from the API to an engine's intake."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatPrompt:
    """Messages (as the chat template sees them) and the tools (OpenAI `tools` entries) to render with them."""

    messages: list[dict]
    tools: list[dict] | None = None


Prompt = str | list[int] | list[dict] | ChatPrompt  # text, token ids, chat messages, or messages with tools
