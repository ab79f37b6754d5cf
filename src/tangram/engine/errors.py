"""Errors the engine reports to callers."""


class RequestError(ValueError):
    """A request that cannot be served as given (too long for the context or for KV memory, bad prompt)."""


class EngineError(RuntimeError):
    """The engine cannot run a model (unsupported architecture, KV layout mismatch)."""
