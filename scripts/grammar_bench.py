"""Per-token cost of a JSON-schema token mask on the CPU for the grammar libraries Tangram could use.

Usage: python scripts/grammar_bench.py TOKENIZER_DIR [TOKENIZER_DIR ...]
(llguidance is a dependency; `pip install "torch==2.13.0" xgrammar outlines-core` to compare the others: a
library that is missing is reported as failed.)

For each tokenizer and library: the one-off cost (tokenizer preparation, grammar compile), then a
generation replayed token by token (a valid instance of the schema, tokenized by the tokenizer itself):
per token, fill the mask of allowed tokens and advance the matcher with the token. Prints medians and
p90 in microseconds. Single-threaded: what one constrained row costs the output processor per step.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from transformers import AutoTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "role", "tags", "address"],
    "additionalProperties": False,
}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "role": "admin",
            "tags": ["math", "engines", "poetry of science"], "address": {"city": "London", "zip": "W1"}}


def stats(xs: list[float]) -> str:
    us = sorted(x * 1e6 for x in xs)
    return f"median {statistics.median(us):7.1f} us  p90 {us[int(0.9 * (len(us) - 1))]:7.1f} us  max {us[-1]:8.1f} us"


def time_steps(ids: list[int], fill, advance) -> tuple[str, str]:
    """Per token: `fill()` (the mask) then `advance(token)` (falsy: the grammar rejected it), each timed."""
    fills, steps = [], []
    for t in ids:
        a = time.perf_counter()
        fill()
        b = time.perf_counter()
        ok = advance(t)
        c = time.perf_counter()
        assert ok is not False, t
        fills.append(b - a)
        steps.append(c - b)
    return stats(fills), stats(steps)


def bench_llguidance(tok, ids: list[int], vocab: int) -> None:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    m = llguidance.LLMatcher(lltok, grammar)
    t2 = time.perf_counter()
    assert not m.is_error(), m.get_error()
    mask = lt.allocate_token_bitmask(1, vocab)
    fill, step = time_steps(ids, lambda: lt.fill_next_token_bitmask(m, mask, 0), m.consume_token)
    print(f"  llguidance   tokenizer {1e3 * (t1 - t0):8.1f} ms  compile {1e3 * (t2 - t1):8.1f} ms  "
          f"accepting={m.is_accepting()}")
    print(f"    mask:    {fill}\n    advance: {step}")


def bench_xgrammar(tok, ids: list[int], vocab: int) -> None:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    t1 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    t2 = time.perf_counter()
    m = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, vocab)
    fill, step = time_steps(ids, lambda: m.fill_next_token_bitmask(mask, 0), m.accept_token)
    print(f"  xgrammar     tokenizer {1e3 * (t1 - t0):8.1f} ms  compile {1e3 * (t2 - t1):8.1f} ms  "
          f"completed={m.is_completed()}")
    print(f"    mask:    {fill}\n    advance: {step}")


def bench_outlines(tok, ids: list[int], vocab: int) -> None:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from outlines_core.kernels.torch import allocate_token_bitmask, fill_next_token_bitmask

    t0 = time.perf_counter()
    words: dict[str, list[int]] = {}
    specials = set(tok.all_special_ids)
    for i in range(len(tok)):
        if i != tok.eos_token_id and i not in specials:
            words.setdefault(tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)]), []).append(i)
    words.pop("", None)
    voc = Vocabulary(tok.eos_token_id, words)
    t1 = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), voc)
    t2 = time.perf_counter()
    g = Guide(index)
    mask = allocate_token_bitmask(vocab)
    fill, step = time_steps(ids, lambda: fill_next_token_bitmask(g, mask), g.advance)
    print(f"  outlines-core vocabulary {1e3 * (t1 - t0):7.1f} ms  compile {1e3 * (t2 - t1):8.1f} ms  "
          f"finished={g.is_finished()}")
    print(f"    mask:    {fill}\n    advance: {step}")


def main(dirs: list[str]) -> None:
    torch.set_num_threads(1)
    text = json.dumps(INSTANCE, separators=(",", ":"))
    for d in dirs:
        tok = AutoTokenizer.from_pretrained(d)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        vocab = len(tok)
        print(f"{d}: vocab {vocab}, {len(ids)} tokens of JSON")
        for bench in (bench_llguidance, bench_xgrammar, bench_outlines):
            try:
                bench(tok, ids, vocab)
            except Exception as exc:  # noqa: BLE001 - report and go on with the next library
                print(f"  {bench.__name__}: failed: {type(exc).__name__}: {exc}")
        logits = torch.randn(1, vocab)
        mask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
        import llguidance.torch as lt
        ts = []
        for _ in range(200):
            a = time.perf_counter()
            lt.apply_token_bitmask_inplace(logits, mask)
            ts.append(time.perf_counter() - a)
        print(f"  apply a bitmask to one logits row: {stats(ts)}")


if __name__ == "__main__":
    main(sys.argv[1:])
