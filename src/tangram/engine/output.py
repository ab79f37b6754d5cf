"""The engine's output processor: sample the step's next tokens, detokenize, apply stops, emit or finish.

One batched sampling call per step; if it raises, each row is sampled alone
and only the rows whose own sampling raises fail (logprobs likewise: one
log-softmax per step over the rows that ask, `logprobs.py`). Detokenizing and stop
checks of one request failing fail only that request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from tangram.engine import constrain, logprobs, sampling
from tangram.engine.batch import SeqWork
from tangram.engine.logprobs import Decoder, TokenLogprob
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
        self.decoder: Decoder | None = None  # token strings of logprobs, made on first use

    def process(self, work: list[SeqWork], logits: torch.Tensor, now: float) -> None:
        """Advance the step's sequences from their rows of `logits` (`SeqWork.logit_rows` each, in order):
        prompt logprobs of those that return every position, a token for each sampled one (and for the other
        sequences of an n > 1 request whose prompt is now in, from the same row)."""
        rows: list[int] = []
        reqs: list[Request] = []
        scored: list[tuple[Request, int, int, int]] = []  # (request, first position, first row, rows)
        at = 0
        for w in work:
            n = w.logit_rows
            if w.all_logits:
                scored.append((w.request, w.start, at, n))
            if w.sample:
                seqs, w.request.forks = [w.request, *w.request.forks], []
                reqs += seqs
                rows += [at + n - 1] * len(seqs)
            at += n
        if scored:
            self._prompt_logprobs(scored, logits)
        if rows != list(range(at)):  # only when prompt rows or n > 1 forks are in the step
            logits = logits.index_select(0, torch.tensor(rows, dtype=torch.int64, device=logits.device))
        live = [i for i, r in enumerate(reqs) if r.status is not Status.FINISHED]
        if len(live) < len(reqs):
            reqs = [reqs[i] for i in live]
            logits = logits.index_select(0, torch.tensor(live, dtype=torch.int64, device=logits.device))
        raw = self._constrain(reqs, logits)
        tokens = self.sample(reqs, logits)
        self._logprobs(reqs, raw, tokens)
        for req, tok in zip(reqs, tokens):
            if tok is None or req.status is Status.FINISHED:
                continue  # its sampling failed: it is finished with the error
            try:
                self.advance(req, tok, now)
            except Exception as exc:  # noqa: BLE001 - detokenizing or stop checks of one request failed
                log.exception("postprocessing %s failed", req.id)
                if req.status is not Status.FINISHED:
                    self.finish(req, "error", error=f"postprocess failed: {type(exc).__name__}: {exc}")

    def _constrain(self, reqs: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """Mask, in place, the rows of constrained requests to their grammar (structured output); the logits as
        they were, for logprobs (a copy only when a constrained request also asks for logprobs)."""
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if not rows:
            return logits
        raw = logits.clone() if any(reqs[i].params.logprobs is not None for i in rows) else logits
        try:
            failed = constrain.apply_masks(rows, [reqs[i].grammar for i in rows], logits)
        except Exception as exc:  # noqa: BLE001 - fails the constrained rows only
            log.exception("structured-output masks of %s failed", [reqs[i].id for i in rows])
            failed = {i: f"{type(exc).__name__}: {exc}" for i in rows}
        for i, why in failed.items():
            self.finish(reqs[i], "error", error=f"structured output failed: {why}")
        return raw

    def _decoder(self, req: Request) -> Decoder:
        if self.decoder is None:  # every request of an engine has its tokenizer
            self.decoder = Decoder(req.text.tokenizer)
        return self.decoder

    def _each(self, reqs: list[Request], what: str, batched: Callable[[list[int]], None]) -> None:
        """`batched(indices)` over all of `reqs`; when it raises, over each alone, failing those that raise."""
        try:
            batched(list(range(len(reqs))))
            return
        except Exception:  # noqa: BLE001
            log.warning("batched %s of %s failed; each alone", what, [r.id for r in reqs], exc_info=True)
        for i, req in enumerate(reqs):
            try:
                batched([i])
            except Exception as exc:  # noqa: BLE001
                self.finish(req, "error", error=f"{what} failed: {type(exc).__name__}: {exc}")

    def _prompt_logprobs(self, scored: list[tuple[Request, int, int, int]], logits: torch.Tensor) -> None:
        """Logprobs of the prompt tokens these rows predict (row j of a chunk at `start`: position start + j + 1),
        stored by position (entry 0, the first token, has none; a recomputed prompt overwrites)."""
        def run(sel: list[int]) -> None:
            rows: list[int] = []
            targets: list[int] = []
            ks: list[int] = []
            spans: list[tuple[Request, int, int]] = []
            for i in sel:
                req, start, first, n = scored[i]
                valid = max(0, min(n, len(req.prompt_ids) - 1 - start))
                rows += range(first, first + valid)
                targets += req.prompt_ids[start + 1:start + 1 + valid]
                ks += [req.params.prompt_logprobs] * valid
                spans.append((req, start, valid))
            index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
            out = iter(logprobs.score(logits.index_select(0, index), targets, ks)) if rows else iter(())
            tok = iter(targets)
            for req, start, valid in spans:
                dec = self._decoder(req)
                if start == 0:  # the first token has no context: no logprob
                    req.prompt_logprobs = [TokenLogprob(req.prompt_ids[0], dec(req.prompt_ids[0]), None)]
                del req.prompt_logprobs[start + 1:]
                req.prompt_logprobs += [dec.entry(next(tok), next(out)) for _ in range(valid)]

        self._each([s[0] for s in scored], "prompt logprobs", run)

    def _logprobs(self, reqs: list[Request], logits: torch.Tensor, tokens: list[int | None]) -> None:
        """Logprobs of the sampled tokens of the requests that ask for them (pending until streamed)."""
        want = [i for i, r in enumerate(reqs)
                if r.params.logprobs is not None and r.params.max_tokens > 0 and tokens[i] is not None]
        if not want:
            return

        def run(sel: list[int]) -> None:
            idx = [want[j] for j in sel]
            index = torch.tensor(idx, dtype=torch.int64, device=logits.device)
            out = logprobs.score(logits.index_select(0, index), [tokens[i] for i in idx],
                                 [reqs[i].params.logprobs for i in idx])
            for i, row in zip(idx, out):
                reqs[i].pending_logprobs.append(self._decoder(reqs[i]).entry(tokens[i], row))

        self._each([reqs[i] for i in want], "logprobs", run)

    def sample(self, reqs: list[Request], logits: torch.Tensor) -> list[int | None]:
        """Next token per request; when the batch's sampling raises, each request alone, failing those whose
        own sampling raises (one request's parameters must not fail the others of its batch)."""
        try:
            return sampling.sample(logits, [r.params for r in reqs], [r.generator for r in reqs],
                                   [(r.prompt_ids, r.output_ids) for r in reqs]).tolist()
        except Exception:  # noqa: BLE001
            log.warning("batched sampling of %s failed; sampling each alone", [r.id for r in reqs], exc_info=True)
        tokens: list[int | None] = []
        for i, req in enumerate(reqs):
            try:
                tokens.append(int(sampling.sample(logits[i:i + 1], [req.params], [req.generator],
                                                  [(req.prompt_ids, req.output_ids)])[0]))
            except Exception as exc:  # noqa: BLE001
                tokens.append(None)
                self.finish(req, "error", error=f"sampling failed: {type(exc).__name__}: {exc}")
        return tokens

    def advance(self, req: Request, tok: int, now: float) -> None:
        """Append a sampled token to `req`, then stream it or finish the request (max_tokens 0: the prompt was
        scored, nothing is generated)."""
        if req.params.max_tokens > 0:
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
        if p.max_tokens == 0:
            reason, delta = "length", ""
        elif req.grammar is not None and not req.grammar.accept(tok):
            self.finish(req, "error",
                        error=f"structured output: the grammar rejected token {tok}: {req.grammar.error}")
            return
        elif (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
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
                                         completion_tokens=len(req.output_ids), stages=req.stages,
                                         **req.take_extras()))
        else:
            self.finish(req, reason, delta=delta, new=[tok] if p.max_tokens > 0 else [])
