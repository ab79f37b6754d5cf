"""The engine's output processor: sample the step's next tokens, detokenize, apply stops, emit or finish.

One batched sampling call per step; if it raises, each row is sampled alone
and only the rows whose own sampling raises fail. Detokenizing and stop
checks of one request failing fail only that request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from tangram.engine import constrain, sampling
from tangram.engine.batch import SeqWork
from tangram.engine.request import Request, RequestOutput, Status

log = logging.getLogger(__name__)

Finish = Callable[..., None]  # Engine.finish(req, reason, *, delta, new, error)


class OutputProcessor:
    """Turns a step's logits into tokens and outputs for its requests."""

    def __init__(self, *, eos_token_ids: Iterable[int], max_model_len: int, emit: Callable[[Request, RequestOutput],
                 None], finish: Finish, on_first_token: Callable[[Request], None] | None = None) -> None:
        self.eos = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.emit, self.finish = emit, finish
        self.on_first_token = on_first_token

    def process(self, sampled: list[SeqWork], logits: torch.Tensor, now: float) -> None:
        """Sample a token for each of `sampled` (rows of `logits`, in order) and advance its request."""
        reqs = [w.request for w in sampled]
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if rows:  # structured output: constrained rows sample within their grammar's mask
            try:
                failed = constrain.apply_masks(rows, [reqs[i].grammar for i in rows], logits)
            except Exception as exc:  # noqa: BLE001 - fails the constrained rows only
                log.exception("structured-output masks of %s failed", [reqs[i].id for i in rows])
                failed = {i: f"{type(exc).__name__}: {exc}" for i in rows}
            for i, why in failed.items():
                self.finish(reqs[i], "error", error=f"structured output failed: {why}")
        for req, tok in zip(reqs, self.sample(reqs, logits)):
            if tok is None or req.status is Status.FINISHED:
                continue  # its sampling failed: it is finished with the error
            try:
                self.advance(req, tok, now)
            except Exception as exc:  # noqa: BLE001 - detokenizing or stop checks of one request failed
                log.exception("postprocessing %s failed", req.id)
                if req.status is not Status.FINISHED:
                    self.finish(req, "error", error=f"postprocess failed: {type(exc).__name__}: {exc}")

    def sample(self, reqs: list[Request], logits: torch.Tensor) -> list[int | None]:
        """Next token per request; when the batch's sampling raises, each request alone, failing those whose
        own sampling raises (one request's parameters must not fail the others of its batch)."""
        try:
            return sampling.sample(logits, [r.params for r in reqs], [r.generator for r in reqs]).tolist()
        except Exception:  # noqa: BLE001
            log.warning("batched sampling of %s failed; sampling each alone", [r.id for r in reqs], exc_info=True)
        tokens: list[int | None] = []
        for i, req in enumerate(reqs):
            try:
                tokens.append(int(sampling.sample(logits[i:i + 1], [req.params], [req.generator])[0]))
            except Exception as exc:  # noqa: BLE001
                tokens.append(None)
                self.finish(req, "error", error=f"sampling failed: {type(exc).__name__}: {exc}")
        return tokens

    def advance(self, req: Request, tok: int, now: float) -> None:
        """Append a sampled token to `req`, then stream it or finish the request."""
        req.append(tok)
        if req.first_token_at is None:
            req.first_token_at = now
            st = req.stages
            st.ttft_s = now - req.arrival
            if req.prefill_began is not None:
                st.prefill_s = now - req.prefill_began
                st.prefill_interval = (req.prefill_began - req.arrival, now - req.arrival)
            if self.on_first_token is not None:
                self.on_first_token(req)
        p = req.params
        reason = None
        if req.grammar is not None and not req.grammar.accept(tok):
            self.finish(req, "error", error=f"structured output: the grammar rejected token {tok}: {req.grammar.error}")
            return
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            reason, delta = "stop", req.text.flush()  # the stop token is not part of the text
        else:
            delta = req.text.push([tok])
            if req.text.stopped:
                reason = "stop"
            elif req.grammar is not None and req.grammar.done:  # the structured output is complete
                reason = "stop"
                delta += req.text.flush()
            elif len(req.output_ids) >= p.max_tokens or len(req.ids) >= self.max_model_len:
                reason = "length"
                delta += req.text.flush()
        if reason is None:
            self.emit(req, RequestOutput(req.id, delta, [tok], req.text.text, prompt_tokens=len(req.prompt_ids),
                                         completion_tokens=len(req.output_ids), stages=req.stages))
        else:
            self.finish(req, reason, delta=delta, new=[tok])
