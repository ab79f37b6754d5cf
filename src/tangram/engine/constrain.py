"""Structured output in the engine: grammars compiled by llguidance, token masks applied before sampling.

Chosen by measurement (scripts/grammar_bench.py, docs/serving.md): llguidance's per-token mask was the
cheapest on a 151k vocabulary and within microseconds of xgrammar's on SmolLM2's 49k, and it depends on
nothing (xgrammar pulls in torch, triton and tvm-ffi).

- Intake (`GrammarCompiler.compile`, on the thread that submits the request, never the step's): the
  constraint becomes a grammar text; its matcher is compiled once per text (an LRU cache of pristine
  matchers, each request gets a deep copy) and the first token mask is filled at once.
- Per step (`apply_masks`, in the output processor before sampling): the constrained rows' logits outside
  their masks go to -inf. Unconstrained rows are not touched; a step with none pays nothing.
- After sampling (`GrammarState.accept`): the matcher consumes the token and the next mask is filled on the
  grammar thread (llguidance drops the GIL), overlapping the next forward: off the step's critical path.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from tangram.engine.errors import RequestError
from tangram.engine.structured import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, StructuredOutput

log = logging.getLogger(__name__)

# byte value -> the additive mask of its 8 tokens (0 allowed, -inf not): adding a gathered bias is several times
# faster than a boolean masked_fill on CPU (16 x 49,152 bf16: 0.33 ms against 3.4 ms with the bits unpacked)
_BYTE_BITS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool()
_biases: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
# JSON is written as Python's json.dumps and chat templates' tojson write it: a fixed ", " and ": ", no other
# whitespace (flexible whitespace lets a model emit blanks until max_tokens, which a random-weight one does)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_fill_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tangram-grammar")
# building llguidance's tokenizer takes 0.3-1.2 s: once per tokenizer object (kept by the runtime cache)
_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def _lltokenizer(tokenizer, vocab: int, eos: tuple[int, ...]) -> llguidance.LLTokenizer:
    with _tokenizers_lock:
        per = _tokenizers.setdefault(tokenizer, {})
        if (vocab, eos) not in per:
            per[(vocab, eos)] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=list(eos) or None)
        return per[(vocab, eos)]


class GrammarState:
    """One request's matcher and the mask of the tokens it may sample next."""

    def __init__(self, matcher: llguidance.LLMatcher, words: int) -> None:
        self.matcher = matcher
        self.mask = torch.full((1, words), -1, dtype=torch.int32)
        self._pending: Future | None = _fill_pool.submit(self._fill)

    def _fill(self) -> None:
        llguidance.torch.fill_next_token_bitmask(self.matcher, self.mask, 0)

    def next_mask(self) -> torch.Tensor:
        """The bitmask [1, words] of the allowed next tokens (waits for its fill if still running)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        return self.mask

    def accept(self, token: int) -> bool:
        """Advance with a sampled token; False if the grammar rejects it (the request must fail)."""
        self.next_mask()  # never consume while a fill reads the matcher
        if not self.matcher.consume_token(token):
            return False
        if not self.matcher.is_stopped():
            self._pending = _fill_pool.submit(self._fill)
        return True

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but the end can follow."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        """Why the matcher failed (empty while it has not)."""
        return self.matcher.get_error()


class GrammarCompiler:
    """Compiles `StructuredOutput`s for one tokenizer into `GrammarState`s, with compiled matchers cached by
    grammar text. Thread-safe. `vocab`: the width of the model's logits."""

    def __init__(self, tokenizer, *, vocab: int, eos_token_ids: Iterable[int] = (), cache_size: int = 256) -> None:
        self.tokenizer, self.vocab = tokenizer, vocab
        self.eos = tuple(sorted(eos_token_ids))
        self.cache_size = cache_size
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def cached(self) -> int:
        """Compiled grammars held."""
        return len(self._cache)

    def compile(self, spec: StructuredOutput) -> GrammarState:
        """A fresh matcher for `spec` (its first mask being filled); RequestError naming the parameter when
        the schema cannot be compiled."""
        param = "tools" if spec.kind == "tool_calls" else "response_format"
        try:
            lltok = _lltokenizer(self.tokenizer, self.vocab, self.eos)
        except (ValueError, TypeError, AttributeError) as exc:  # llguidance cannot read this tokenizer
            raise RequestError(f"{param}: this model's tokenizer cannot be used for structured output "
                               f"({type(exc).__name__}: {exc})") from None
        try:
            text = self.grammar_text(spec, lltok)
        except RequestError:
            raise
        except ValueError as exc:  # llguidance's own check of the schema
            raise RequestError(f"{param}: the schema cannot be used for structured output: {exc}") from None
        with self._lock:
            pristine = self._cache.get(text)
            if pristine is not None:
                self._cache.move_to_end(text)
        if pristine is None:
            pristine = llguidance.LLMatcher(lltok, text, log_level=0)  # drops the GIL while it compiles
            if pristine.is_error():
                raise RequestError(f"{param}: the schema cannot be used for structured output: "
                                   f"{pristine.get_error().splitlines()[0]}")
            with self._lock:
                self._cache[text] = pristine
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return GrammarState(pristine.deep_copy(), llguidance.torch.get_bitmask_shape(1, self.vocab)[1])

    def grammar_text(self, spec: StructuredOutput, lltok: llguidance.LLTokenizer) -> str:
        """llguidance's grammar for `spec`."""
        if spec.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        try:
            schema = json.loads(spec.schema_text or "")
        except ValueError:
            raise RequestError("response_format: the JSON schema is not valid JSON") from None
        if spec.kind == "json_schema":
            if not isinstance(schema, (dict, bool)):
                raise RequestError("response_format: the JSON schema must be an object")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if not isinstance(schema, dict):
            raise RequestError("tools: the tool-call schema must be a JSON object")
        schema = {**schema, "x-guidance": JSON_OPTIONS}
        open_tag, close_tag = self._tag(TOOL_CALL_OPEN, lltok), self._tag(TOOL_CALL_CLOSE, lltok)
        call = f'{open_tag} "\\n" %json {json.dumps(schema)} "\\n" {close_tag}'
        start = 'start: call ("\\n" call)*' if spec.multiple else "start: call"
        return llguidance.LLMatcher.grammar_from_lark(f"{start}\ncall: {call}\n")

    def _tag(self, tag: str, lltok: llguidance.LLTokenizer) -> str:
        """A tool-call tag in Lark: the token itself when the tokenizer has it as a special token, else text."""
        tid = self.tokenizer.convert_tokens_to_ids(tag)
        if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid < self.vocab \
                and lltok.is_special_token(tid):
            return f"<[{tid}]>"
        return json.dumps(tag)


@torch.inference_mode()  # the runner's logits are inference tensors
def apply_masks(rows: list[int], states: list[GrammarState], logits: torch.Tensor) -> dict[int, str]:
    """Set to -inf, in place, the logits of `rows` outside their states' masks; the rows whose mask could not be
    computed, with why (those rows are left as they are: their requests must fail)."""
    failed: dict[int, str] = {}
    masks: list[torch.Tensor] = []
    for row, state in zip(rows, states):
        try:
            masks.append(state.next_mask())
        except Exception as exc:  # noqa: BLE001 - one request's matcher failing fails only that request
            failed[row] = f"{type(exc).__name__}: {exc}"
    rows = [r for r in rows if r not in failed]
    if rows:
        _mask_rows(rows, masks, logits)
    return failed


def _mask_rows(rows: list[int], masks: list[torch.Tensor], logits: torch.Tensor) -> None:
    dev, vocab = logits.device, logits.shape[-1]
    key = (logits.dtype, dev)
    if key not in _biases:
        _biases[key] = torch.zeros(256, 8, dtype=logits.dtype).masked_fill_(~_BYTE_BITS, float("-inf")).to(dev)
    # [n, words] int32 -> bytes (little-endian: byte k of a word holds its tokens 8k..8k+7); one bit a token
    # crosses to a GPU
    raw = torch.cat(masks).to(dev).view(torch.uint8)
    bias = _biases[key].index_select(0, raw.flatten().int()).view(len(rows), -1)[:, :vocab]
    idx = torch.tensor(rows, device=dev)
    logits.index_copy_(0, idx, logits.index_select(0, idx).add_(bias))
