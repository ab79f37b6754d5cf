"""HTTP serving: the OpenAI-compatible API, admin API and metrics, and the embedded server."""

from tangram.serve.server import Server

__all__ = ["Server"]
