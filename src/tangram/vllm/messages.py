"""What travels between a vLLM shell process and its parent: typed, picklable records (no vLLM import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorRef:
    """One checkpoint tensor in the pool's arena: its name (the checkpoint's), byte offset, dtype and shape."""

    name: str
    offset: int
    nbytes: int
    dtype: str  # torch dtype name without the prefix, e.g. "bfloat16"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BindSpec:
    """The weights of one model as the shell finds them: where the arena is and each tensor in it.

    CPU: `arena_path` is the shared-memory file the shell maps. CUDA: `arena` is the arena tensor itself, sent
    through the connection (torch's multiprocessing reductions turn it into a CUDA IPC handle)."""

    tensors: tuple[TensorRef, ...]
    arena_bytes: int
    arena_path: str | None = None
    arena: Any = None  # a CUDA tensor, or None on CPU
    key: str = ""  # content identity of the weights: names and content keys (a shell holding them needs no bind)


@dataclass(frozen=True)
class ShellSetup:
    """How to build the shell's engine: vLLM EngineArgs keywords and the first weights to bind (None: none)."""

    engine_args: dict[str, Any]
    bind: BindSpec | None


@dataclass(frozen=True)
class Ready:
    """The shell's engine is built: `seconds` since the shell began, `import_s` of them importing vLLM, `load_s`
    filling vLLM's parameters from the pool."""

    seconds: float
    import_s: float
    load_s: float
    vllm_version: str
    kv_tokens: int


@dataclass(frozen=True)
class Bind:
    """Load new weights into the built engine in place (vLLM's layerwise reload)."""

    spec: BindSpec


@dataclass(frozen=True)
class Bound:
    """A `Bind` is done in `seconds`."""

    seconds: float


@dataclass(frozen=True)
class LoraRef:
    """A LoRA adapter bound in a shell: vLLM's `lora_int_id` (unique per binding, never reused in a shell), the
    name vLLM knows it by (unique too: vLLM compares LoRA requests by name), the converted adapter's directory
    (its `adapter_config.json` is read there; its tensors never: they come from the pool)."""

    lora_id: int
    name: str
    path: str


@dataclass(frozen=True)
class BindLora:
    """Make an adapter's tensors (views of the pool's arena, `spec`) known to vLLM under `lora`."""

    lora: LoraRef
    spec: BindSpec


@dataclass(frozen=True)
class LoraBound:
    """A `BindLora` is done: vLLM checked and loaded the adapter, in `seconds`."""

    lora_id: int
    seconds: float


@dataclass(frozen=True)
class DropLora:
    """Remove an adapter from vLLM and forget its tensors (its pool binding is then released)."""

    lora_id: int


@dataclass(frozen=True)
class LoraDropped:
    """A `DropLora` is done: the shell holds no view of the adapter's tensors any more."""

    lora_id: int


@dataclass(frozen=True)
class Add:
    """Queue a request: prompt ids and vLLM SamplingParams keywords (`tangram.vllm.params`); `lora`: the bound
    adapter it runs with."""

    request_id: str
    prompt_ids: list[int]
    sampling: dict[str, Any]
    lora: LoraRef | None = None


@dataclass(frozen=True)
class Abort:
    """Stop a request."""

    request_id: str


@dataclass(frozen=True)
class Stop:
    """Exit the shell."""


@dataclass
class Delta:
    """New output of one sequence of a request since its last delta."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    finished: bool = False  # the whole request is over
    prompt_tokens: int = 0
    logprobs: list[tuple[int, str, float, list[tuple[int, str, float]]]] | None = None
    error: str | None = None


@dataclass
class Deltas:
    """Everything one engine step produced."""

    items: list[Delta] = field(default_factory=list)


@dataclass(frozen=True)
class Failed:
    """A command failed in the shell (`error` says why); `fatal`: the shell exits after it."""

    error: str
    fatal: bool = False
