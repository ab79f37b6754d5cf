"""Tangram's sampling parameters as vLLM SamplingParams keywords (pure; no vLLM import).

Semantics match: vLLM is the reference Tangram's own sampler follows (penalties, min_p, logit_bias, raw
logprobs, stop strings not returned). What the vLLM backend does not serve is a RequestError naming it.
"""

from __future__ import annotations

import json
from typing import Any

from tangram.engine.errors import RequestError
from tangram.engine.sampling import SamplingParams


def vllm_sampling(params: SamplingParams) -> dict[str, Any]:
    """vLLM `SamplingParams(**kw)` keywords for `params` (the shell adds `output_kind=DELTA`); `structured_outputs`
    is a dict of `StructuredOutputsParams` keywords. Raises RequestError for what this backend cannot serve."""
    if params.prompt_logprobs is not None:
        raise RequestError("prompt logprobs (echo with logprobs) are not served by the vllm backend yet")
    kw: dict[str, Any] = {
        "n": params.n, "max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1, "min_p": params.min_p, "seed": params.seed,
        "stop": list(params.stop), "stop_token_ids": list(params.stop_token_ids), "ignore_eos": params.ignore_eos,
        "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty, "logprobs": params.logprobs,
    }
    if params.logit_bias:
        kw["logit_bias"] = dict(params.logit_bias)
    if params.structured is not None:
        s = params.structured
        if s.kind == "json_object":
            kw["structured_outputs"] = {"json_object": True}
        elif s.kind == "json_schema":
            kw["structured_outputs"] = {"json": json.loads(s.schema_text or "{}")}
        else:
            raise RequestError("tool_choice 'required' or a named tool is not served by the vllm backend yet "
                               "(tool_choice 'auto' is)")
    return kw
