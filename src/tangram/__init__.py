"""Tangram: serverless LLM serving built around a short cold start."""

__version__ = "0.1.0"
