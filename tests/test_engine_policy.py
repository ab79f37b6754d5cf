"""Pure parts of the engine with hand-made inputs: admission, preemption choice, block needs, detokenized stops."""

from __future__ import annotations

from tangram.engine.detok import TextStream
from tangram.engine.scheduler import admit, blocks_short, victim


def test_admit_is_fifo_within_batch_and_token_budget():
    assert admit([10, 10, 10], running=0, max_batch=8, token_budget=25) == 2
    assert admit([10, 10, 10], running=7, max_batch=8, token_budget=100) == 1
    assert admit([10], running=8, max_batch=8, token_budget=100) == 0
    assert admit([500, 1], running=0, max_batch=8, token_budget=100) == 1  # a long prompt still runs alone
    assert admit([], running=0, max_batch=8, token_budget=100) == 0


def test_admit_counts_the_padding_of_a_batched_prefill():
    # one forward pads every admitted prompt to the longest: 3 x 40 > 100, though 10 + 40 + 10 is not
    assert admit([10, 40, 10], running=0, max_batch=8, token_budget=100) == 2
    assert admit([40, 10, 10], running=0, max_batch=8, token_budget=120) == 3


def test_victim_is_the_most_recent():
    assert victim(["a", "b", "c"]) == "c"


def test_blocks_short():
    assert blocks_short(cached_tokens=0, blocks_held=0, block_tokens=16) == 1
    assert blocks_short(cached_tokens=15, blocks_held=1, block_tokens=16) == 0
    assert blocks_short(cached_tokens=16, blocks_held=1, block_tokens=16) == 1
    assert blocks_short(cached_tokens=3, blocks_held=0, block_tokens=4, new_tokens=9) == 3


class CharTokenizer:
    """One token per character; ids are code points (enough to test text handling)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def feed(stream, text):
    out, ids = [], []
    for ch in text:
        ids.append(ord(ch))
        out.append(stream.push(ids))
        if stream.stopped:
            break
    return out, ids


def test_stop_string_is_cut_and_never_streamed():
    s = TextStream(CharTokenizer(), ["END"])
    deltas, ids = feed(s, "hello ENDING")
    assert s.stopped and "".join(deltas) == "hello " and s.text == "hello "
    assert deltas[-3:] == ["", "", ""] or "E" not in "".join(deltas)


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    s = TextStream(CharTokenizer(), ["END"])
    deltas, ids = feed(s, "an EN")
    assert "".join(deltas) == "an "  # "EN" held back: it may become END
    assert s.flush(ids) == "EN" and s.text == "an EN"


def test_incomplete_utf8_is_held_back():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    s = TextStream(Bytes(), [])
    euro = "€".encode()
    assert s.push([ord("a"), euro[0]]) == "a"
    assert s.push([ord("a"), euro[0], euro[1]]) == ""
    assert s.push([ord("a"), *euro]) == "€"
