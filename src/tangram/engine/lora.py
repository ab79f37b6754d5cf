"""LoRA adapters applied per token inside one packed step (each sequence its own adapter or none).

Each target module of the base is *wrapped*, whatever `nn.Module` it is (a
plain, packed or fused linear): a forward hook adds, for the step's tokens of
each adapter a, `scaling_a * B_a(A_a(x))` to the module's output, as PEFT's
`lora.Linear` does (x cast to the adapter's work dtype, the sum cast back to
the output's). The base weights are never read or changed, nothing is merged,
and there is one forward per step whatever the mix of adapters. The step's
tokens are grouped per adapter once (`plan`) and every module reuses the
groups, the segmented idea of punica's SGMV: a prompt chunk alone is a slice
of the packed step (two linears on it, in place); gathered rows (decodes,
several adapters) are one batch: the rows of each adapter padded to the
longest group, A and B of the step's adapters stacked once per adapter set
(host copies in the work dtype, the scaling folded into B), two bmms and one
index_add per module.

The runner sets the step's groups in a context (`active`) around its forward;
outside one, or for a module no adapter of the step targets, a hook returns
at once, and a module that no adapter this instance served targets has no
hook at all, so a step without adapters computes exactly what it computed
before.

Adapters are bound from the device pool (`AdapterSet`): the first request for
one acquires its tensors through the pool (content hash, loader, DRAM tier);
the binding is released when its last request ends and the tensors stay
retained, so the next use is a re-bind (a pool hit). The hooks stay until the
instance closes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tangram.pool import Binding, DevicePool
from tangram.store import Checkpoint
from tangram.store.adapter import AdapterError, AdapterInfo, check_adapter

log = logging.getLogger(__name__)
BATCH_ROWS = 512  # a step batches its adapters' updates when groups x longest group fit this


@dataclass(frozen=True)
class LoraPair:
    """One module's update: A [r, in] and B [out, r], views of the pool arena."""

    a: torch.Tensor
    b: torch.Tensor


@dataclass(eq=False)
class Adapter:
    """An adapter bound on one instance: its pooled tensors by base module, and its scaling."""

    key: str  # the adapter checkpoint's path
    name: str
    scaling: float
    modules: dict[str, LoraPair]
    binding: Binding
    users: int = 0


@dataclass(frozen=True)
class Group:
    """The tokens of one adapter in a step: a slice of the flattened step, or their row indices."""

    adapter: Adapter
    rows: slice | torch.Tensor


@dataclass(frozen=True)
class Batched:
    """A step's groups as one batch (decodes over several adapters): group g's rows are gathered at
    `gather[g * width:(g + 1) * width]` (short groups padded with their first row); `valid` picks the real
    positions of the [groups x width] result (None: no padding), whose token rows are `rows`."""

    adapters: tuple[Adapter, ...]
    gather: torch.Tensor
    width: int
    valid: torch.Tensor | None
    rows: torch.Tensor
    key: tuple[int, ...] = ()  # the adapters, by identity
    order: torch.Tensor | None = None  # when every token of the step has an adapter: the [groups x width]
    # position of each token, in token order (the update is then gathered and added, no scatter)
    last: list = field(default_factory=lambda: [None], compare=False)  # (input, its gathered rows) of the step
    shares: dict = field(default_factory=dict, compare=False)  # module -> (input, its x @ A) from its group


@dataclass(frozen=True)
class LoraStep:
    """The adapters of one step's tokens (tokens of no adapter are in no group)."""

    groups: list[Group] = field(default_factory=list)
    batched: Batched | None = None


_ACTIVE: ContextVar[LoraStep | None] = ContextVar("tangram_lora_step", default=None)


@contextlib.contextmanager
def active(step: LoraStep | None) -> Iterator[None]:
    """Apply `step`'s adapters to the forwards run inside (on this thread); None: no adapter."""
    token = _ACTIVE.set(step)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def plan(segments: Iterable[tuple[int, int, Adapter | None]], device: torch.device) -> LoraStep | None:
    """Group a step's token ranges [begin, end) by adapter; None when no token has one."""
    ranges: dict[int, tuple[Adapter, list[tuple[int, int]]]] = {}
    for begin, end, adapter in segments:
        if adapter is None or end <= begin:
            continue
        spans = ranges.setdefault(id(adapter), (adapter, []))[1]
        if spans and spans[-1][1] == begin:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((begin, end))
    if not ranges:
        return None
    groups = []
    for adapter, spans in ranges.values():
        if len(spans) == 1:
            rows: slice | torch.Tensor = slice(*spans[0])
        else:
            rows = torch.cat([torch.arange(b, e) for b, e in spans]).to(device)
        groups.append(Group(adapter, rows))
    return LoraStep(groups, _batched(list(ranges.values()), device, max(end for _, end, _ in segments)))


def _batched(ranges: list[tuple[Adapter, list[tuple[int, int]]]], device: torch.device, tokens: int
             ) -> Batched | None:
    """The batched form of a step whose adapters' tokens are gathered rows (decodes; not one prompt chunk
    alone) and few, else None."""
    if len(ranges) == 1 and len(ranges[0][1]) == 1:
        return None  # one contiguous slice: the per-group path reads it in place
    members = [[i for b, e in spans for i in range(b, e)] for _, spans in ranges]
    width = max(len(m) for m in members)
    if width * len(members) > BATCH_ROWS:
        return None
    gather = [row for m in members for row in m + [m[0]] * (width - len(m))]
    valid = [g * width + j for g, m in enumerate(members) for j in range(len(m))]
    rows = [row for m in members for row in m]
    order = None
    if len(rows) == tokens:  # every token has an adapter (rows: a permutation of them)
        position = dict(zip(rows, valid))
        order = torch.tensor([position[t] for t in range(tokens)], device=device)
    return Batched(tuple(a for a, _ in ranges), torch.tensor(gather, device=device), width,
                   None if len(valid) == len(gather) else torch.tensor(valid, device=device),
                   torch.tensor(rows, device=device), tuple(id(a) for a, _ in ranges), order)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an adapter's update is computed in: float32 for 16-bit adapters, as PEFT computes them by
    default (`autocast_adapter_dtype`; on a CPU a 16-bit bmm over a long input dimension also runs a slow
    kernel: 0.9 ms against 20 us in float32 for [4, 4, 4864] x [4, 4864, 16]), else their own."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


# modules that read the same input as the first of their group (transformers' Llama / Qwen2 code calls them in
# this order): the first computes x @ A for the whole group in one bmm and leaves each sibling its share
SIBLINGS = {"q_proj": ("k_proj", "v_proj"), "gate_proj": ("up_proj",)}


def _stack(name: str, b: Batched) -> tuple:
    """(key, A^T [G, in, r], B^T * scaling [G, r, out], adapters, siblings) of module `name` for a batch's
    adapters, in their work dtype; A^T spans the siblings' A too ([G, in, r x (1 + siblings)]) when every
    adapter targets them with the same rank; (key, None, None, ...) when not every adapter targets `name`
    with one rank."""
    pairs = [a.modules.get(name) for a in b.adapters]
    if any(p is None for p in pairs) or len({(p.a.shape, p.a.dtype) for p in pairs}) != 1:
        return b.key, None, None, b.adapters, ()
    dtype = work_dtype(pairs[0].a.dtype)
    parent, _, leaf = name.rpartition(".")
    siblings = tuple(f"{parent}.{s}" for s in SIBLINGS.get(leaf, ()))
    extra = [[a.modules.get(s) for a in b.adapters] for s in siblings]
    if any(p is None or p.a.shape[0] != pairs[0].a.shape[0] or p.a.dtype != pairs[0].a.dtype
           for ps in extra for p in ps):
        siblings, extra = (), []
    a = torch.cat([torch.stack([p.a.t() for p in ps]) for ps in (pairs, *extra)], dim=2).to(dtype)
    return (b.key, a, torch.stack([p.b.t().to(dtype) * ad.scaling for p, ad in zip(pairs, b.adapters)]),
            b.adapters, siblings)


def _hook(name: str) -> Callable[[torch.nn.Module, tuple, torch.Tensor], torch.Tensor | None]:
    """The forward hook of module `name` (module docstring)."""
    stacked: list = [None]  # the last batch's `_stack` (decodes keep their adapters for many steps)

    def batch(b: Batched, entry: tuple, x: torch.Tensor, out: torch.Tensor) -> None:
        _, a, bw, _, siblings = entry
        shared = b.shares.pop(name, None)
        if shared is not None and shared[0] is x:
            h = shared[1]  # this module's x @ A, computed by the first module of its group
        else:
            last = b.last[0]
            if last is not None and last[0] is x and last[1].dtype == a.dtype:
                xs = last[1]  # q/k/v (and gate/up) read the same input: gathered and cast once
            else:
                xs = x.reshape(-1, x.shape[-1]).index_select(0, b.gather).to(a.dtype)
                b.last[0] = (x, xs)
            h = torch.bmm(xs.view(len(b.adapters), b.width, -1), a)
            r = bw.shape[1]
            for i, sibling in enumerate(siblings, 1):
                b.shares[sibling] = (x, h[..., i * r:(i + 1) * r])
            h = h[..., :r]
        delta = torch.bmm(h, bw).flatten(0, 1)
        if b.order is not None:  # in token order, added in the work dtype and rounded once, as PEFT does
            out.view(-1, out.shape[-1]).add_(delta.index_select(0, b.order))
            return
        if b.valid is not None:
            delta = delta.index_select(0, b.valid)
        out.view(-1, out.shape[-1]).index_add_(0, b.rows, delta.to(out.dtype))  # few ops: decodes are op-bound

    def apply(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        step = _ACTIVE.get()
        if step is None:
            return None
        b = step.batched
        if b is not None:
            entry = stacked[0]
            if entry is None or entry[0] != b.key:
                entry = stacked[0] = _stack(name, b)
            if entry[1] is not None:  # every adapter of the step, one rank: two bmms
                out = output if output.is_contiguous() else output.contiguous()
                batch(b, entry, args[0], out)
                return out
        pairs = [(g, g.adapter.modules.get(name)) for g in step.groups]
        pairs = [(g, p) for g, p in pairs if p is not None]
        if not pairs:
            return None
        x = args[0]
        flat = x.reshape(-1, x.shape[-1])
        out = output if output.is_contiguous() else output.contiguous()
        rows = out.view(-1, out.shape[-1])
        for group, pair in pairs:
            dtype = work_dtype(pair.a.dtype)
            xs = flat[group.rows].to(dtype)
            delta = F.linear(F.linear(xs, pair.a.to(dtype)), pair.b.to(dtype)) * group.adapter.scaling
            if isinstance(group.rows, slice):
                rows[group.rows] = rows[group.rows] + delta  # promoted as in PEFT, cast back on assignment
            else:
                rows.index_copy_(0, group.rows, (rows.index_select(0, group.rows) + delta).to(rows.dtype))
        return out

    return apply


class _Wrapped:
    """The hooks on one model's modules, counted by the adapter sets (instances) that hold each (instances
    sharing a skeleton share its hooks). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: dict[tuple[int, str], tuple[torch.utils.hooks.RemovableHandle, int]] = {}

    def hold(self, model: torch.nn.Module, names: Iterable[str]) -> None:
        """Wrap the named modules of `model` (once per module, counted)."""
        with self._lock:
            for name in names:
                key = (id(model), name)
                handle, users = self._hooks.get(key, (None, 0))
                if handle is None:
                    handle = model.get_submodule(name).register_forward_hook(_hook(name))
                self._hooks[key] = (handle, users + 1)

    def drop(self, model: torch.nn.Module, names: Iterable[str]) -> None:
        """Undo one `hold`; a module no adapter set holds any more loses its hook."""
        with self._lock:
            for name in names:
                key = (id(model), name)
                handle, users = self._hooks[key]
                if users <= 1:
                    handle.remove()
                    del self._hooks[key]
                else:
                    self._hooks[key] = (handle, users - 1)

    def wrapped(self, model: torch.nn.Module) -> list[str]:
        """Names of the modules of `model` that carry a hook."""
        with self._lock:
            return sorted(name for mid, name in self._hooks if mid == id(model))


WRAPPED = _Wrapped()


class AdapterSet:
    """The adapters one instance serves, bound from its pool on first use and released when unused."""

    def __init__(self, pool: DevicePool, model: torch.nn.Module, base: Checkpoint, *, owner: str) -> None:
        self.pool, self.model, self.base, self.owner = pool, model, base, owner
        self._lock = threading.Lock()
        self._bound: dict[str, Adapter] = {}
        self._checked: dict[str, tuple[Checkpoint, AdapterInfo]] = {}
        self._wrapped: set[str] = set()  # modules this set holds a hook on (until it closes)
        self._device = next(model.parameters()).device

    def acquire(self, path: str | Path, name: str | None = None) -> Adapter:
        """The adapter at `path` bound for one more request (acquired from the pool unless bound already).
        A load runs outside the set's lock: the engine thread releasing other adapters never waits for it."""
        key = str(path)
        with self._lock:
            adapter = self._bound.get(key)
            if adapter is not None:
                adapter.users += 1
                return adapter
            checked = self._checked.get(key)
        ckpt, info = checked or self._check(key)
        binding = self.pool.acquire(ckpt, model=name or key)
        try:
            modules = {}
            for module in info.modules:
                a, b = (binding.tensors[n] for n in AdapterInfo.tensor_names(module))
                if a.device != self._device:
                    raise AdapterError(ckpt.path, f"adapter tensors are on {a.device}, the model on {self._device}")
                modules[module] = LoraPair(a, b)
            with self._lock:
                other = self._bound.get(key)  # bound by a concurrent request meanwhile: use that binding
                if other is not None:
                    other.users += 1
                else:
                    new = modules.keys() - self._wrapped  # hooks stay until close: a re-bind registers none
                    WRAPPED.hold(self.model, new)
                    self._wrapped |= new
                    adapter = Adapter(key, name or Path(key).name, info.scaling, modules, binding, users=1)
                    self._bound[key] = adapter
        except BaseException:
            self.pool.release(binding)
            raise
        if other is not None:
            self.pool.release(binding)
            return other
        log.debug("bound adapter %s on %s (%d B loaded, %d B reused)", adapter.name, self.owner,
                  binding.bytes_loaded, binding.bytes_reused)
        return adapter

    def _check(self, key: str) -> tuple[Checkpoint, AdapterInfo]:
        ckpt = Checkpoint(key)
        info = check_adapter(ckpt.index, self.base.index, ckpt.path)
        with self._lock:
            self._checked[key] = (ckpt, info)
        return ckpt, info

    def release(self, adapter: Adapter) -> None:
        """One request of `adapter` ended; the last one unbinds it (its tensors stay retained in the pool)."""
        with self._lock:
            adapter.users -= 1
            if adapter.users > 0 or self._bound.get(adapter.key) is not adapter:
                return
            del self._bound[adapter.key]
        self._unbind(adapter)

    def _unbind(self, adapter: Adapter) -> None:
        self.pool.release(adapter.binding)

    def bound(self) -> list[str]:
        """Names of the adapters bound now."""
        with self._lock:
            return sorted(a.name for a in self._bound.values())

    def close(self) -> None:
        """Unbind every adapter and unwrap the modules (the instance stops)."""
        with self._lock:
            adapters, self._bound = list(self._bound.values()), {}
            wrapped, self._wrapped = self._wrapped, set()
        for adapter in adapters:
            self._unbind(adapter)
        WRAPPED.drop(self.model, wrapped)
