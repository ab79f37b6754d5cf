"""The LoRA update of one step: each token's adapter applied to a target module's output, in one forward.

A target module's forward hook adds, for the step's tokens of each adapter a,
`scaling_a * B_a(A_a(x))` to the module's output, as PEFT's `lora.Linear`
does (x cast to the adapter's work dtype, the sum rounded to the output's
dtype once). The base weights are never read or changed and nothing is
merged. The step's tokens are grouped per adapter once (`plan`) and every
module reuses the groups, the segmented idea of punica's SGMV; the runner
orders a step's sequences by adapter, so each adapter's tokens are one slice.

Per module, A and B of the step's adapters are stacked once per adapter set
(host copies in the work dtype, the scaling folded into B; `Stack`), and
modules reading one input (q/k/v, gate/up) share one x @ A. Groups of a few
tokens (decodes) are one batch: two bmms and one in-place add, on the
groups' slice when they are adjacent and of one size, else on rows gathered
and padded to the longest group. Longer groups (prompt chunks) run two
matmuls each on their slice: a CPU bmm of [4, 64+, 16] x [4, 16, 4864] takes
3-7x the time of the four matmuls.

The runner sets the step in a context (`active`) around its forward; outside
one, or for a module no adapter of the step targets, a hook returns at once,
so a step without adapters computes exactly what it computed before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tangram.pool import Binding

BATCH_WIDTH = 32  # a step batches its adapters' updates when its longest group has at most this many tokens
# modules that read the same input as the first of their group (transformers' Llama / Qwen2 code calls them in
# this order): the first computes x @ A for the whole group and leaves each sibling its share
SIBLINGS = {"q_proj": ("k_proj", "v_proj"), "gate_proj": ("up_proj",)}


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
    """A step's groups as one batch (decodes over several adapters): the [groups x width] rows are the
    step's tokens `span` when the groups are adjacent slices of one width (`full`: every token of the step);
    else group g's rows are gathered at `gather[g * width:(g + 1) * width]` (short groups padded with their
    first row), `valid` picks the real positions of the result (None: no padding), whose token rows are
    `rows`, and `order` (every token has an adapter) is the result's position of each token."""

    width: int
    span: slice | None = None
    full: bool = False
    gather: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    order: torch.Tensor | None = None


@dataclass(frozen=True)
class LoraStep:
    """The adapters of one step's tokens (tokens of no adapter are in no group; group g is adapter g's)."""

    groups: list[Group] = field(default_factory=list)
    batched: Batched | None = None
    adapters: tuple[Adapter, ...] = ()
    last: list = field(default_factory=lambda: [None], compare=False)  # (input, its rows cast) of the step
    shares: dict = field(default_factory=dict, compare=False)  # (module, group) -> (input, its x @ A)


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
    segments = list(segments)
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
    tokens = max(end for _, end, _ in segments)
    return LoraStep(groups, _batched(list(ranges.values()), device, tokens), tuple(g.adapter for g in groups))


def _batched(ranges: list[tuple[Adapter, list[tuple[int, int]]]], device: torch.device, tokens: int
             ) -> Batched | None:
    """The batched form of a step whose adapters have few tokens each (decodes) and are not one slice alone,
    else None."""
    if len(ranges) == 1 and len(ranges[0][1]) == 1:
        return None  # one contiguous slice: the per-group path reads it in place
    members = [[i for b, e in spans for i in range(b, e)] for _, spans in ranges]
    width = max(len(m) for m in members)
    if width > BATCH_WIDTH:
        return None
    first = ranges[0][1][0][0]
    if all(len(spans) == 1 and spans[0] == (first + g * width, first + (g + 1) * width)
           for g, (_, spans) in enumerate(ranges)):  # adjacent slices of one width: no gather, no scatter
        end = first + width * len(ranges)
        return Batched(width, span=slice(first, end), full=first == 0 and end == tokens)
    gather = [row for m in members for row in m + [m[0]] * (width - len(m))]
    valid = [g * width + j for g, m in enumerate(members) for j in range(len(m))]
    rows = [row for m in members for row in m]
    order = None
    if len(rows) == tokens:  # every token has an adapter (rows: a permutation of them)
        position = dict(zip(rows, valid))
        order = torch.tensor([position[t] for t in range(tokens)], device=device)
    return Batched(width, gather=torch.tensor(gather, device=device),
                   valid=None if len(valid) == len(gather) else torch.tensor(valid, device=device),
                   rows=torch.tensor(rows, device=device), order=order)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an adapter's update is computed in: float32 for 16-bit adapters, as PEFT computes them by
    default (`autocast_adapter_dtype`; on a CPU a 16-bit bmm over a long input dimension also runs a slow
    kernel: 0.9 ms against 20 us in float32 for [4, 4, 4864] x [4, 4864, 16]), else their own."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


@dataclass(frozen=True)
class Stack:
    """Module `name`'s update for a step's adapters, in their work dtype: A^T [G, in, r x (1 + siblings)]
    (the siblings' A too, when every adapter targets them with the same rank) and B^T * scaling [G, r, out],
    both transposed views of row-major stacks (a CPU bmm streams them faster so); None when not every adapter
    targets the module with one rank. `adapters` (compared by identity) are the set it was stacked for."""

    adapters: tuple[Adapter, ...]
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    siblings: tuple[str, ...] = ()


def stack(name: str, step: LoraStep) -> Stack:
    """`Stack` of module `name` for `step`'s adapters."""
    pairs = [a.modules.get(name) for a in step.adapters]
    if any(p is None for p in pairs) or len({(p.a.shape, p.a.dtype) for p in pairs}) != 1:
        return Stack(step.adapters)
    dtype = work_dtype(pairs[0].a.dtype)
    parent, _, leaf = name.rpartition(".")
    siblings = tuple(f"{parent}.{s}" for s in SIBLINGS.get(leaf, ()))
    extra = [[a.modules.get(s) for a in step.adapters] for s in siblings]
    if any(p is None or p.a.shape[0] != pairs[0].a.shape[0] or p.a.dtype != pairs[0].a.dtype
           for ps in extra for p in ps):
        siblings, extra = (), []
    a = torch.cat([torch.stack([p.a for p in ps]) for ps in (pairs, *extra)], dim=1).to(dtype)
    b = torch.stack([p.b.to(dtype) * ad.scaling for p, ad in zip(pairs, step.adapters)])
    return Stack(step.adapters, a.transpose(1, 2), b.transpose(1, 2), siblings)


def _rows(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the module's output to return, a [tokens, features] view of it to add the updates into): the output
    itself when it can be viewed so (a fused group's member is a column slice of the group's output: its own
    columns, changed in place), else a contiguous copy."""
    try:
        return output, output.view(-1, output.shape[-1])
    except RuntimeError:
        output = output.contiguous()
        return output, output.view(-1, output.shape[-1])


def _share(step: LoraStep, st: Stack, x: torch.Tensor, h: torch.Tensor, group: int | None) -> torch.Tensor:
    """Leave each sibling its columns of x @ A (`h`, the group's own or the batch's); this module's columns."""
    if not st.siblings:
        return h
    r = st.b.shape[-2]
    for i, sibling in enumerate(st.siblings, 1):
        step.shares[sibling, group] = (x, h[..., i * r:(i + 1) * r])
    return h[..., :r]


def _batch(name: str, step: LoraStep, b: Batched, st: Stack, x: torch.Tensor, output: torch.Tensor
           ) -> torch.Tensor:
    """Add the update of a batched step to `output` (changed in place when it can be); the output."""
    groups = len(step.adapters)
    shared = step.shares.pop((name, None), None)
    if shared is not None and shared[0] is x:
        h = shared[1]  # this module's x @ A, computed by the first module of its group
    else:
        last = step.last[0]
        if last is not None and last[0] is x and last[1].dtype == st.a.dtype:
            xs = last[1]  # modules reading one input with different ranks: gathered and cast once
        elif b.full:
            xs = x.reshape(groups, b.width, -1).to(st.a.dtype)
        else:
            flat = x.reshape(-1, x.shape[-1])
            rows = flat[b.span] if b.gather is None else flat.index_select(0, b.gather)
            xs = rows.view(groups, b.width, -1).to(st.a.dtype)
        step.last[0] = (x, xs)
        h = _share(step, st, x, torch.bmm(xs, st.a), None)
    delta = torch.bmm(h, st.b)  # added in the work dtype and rounded once, as PEFT does
    if b.full:
        with contextlib.suppress(RuntimeError):  # [1, tokens, out] of any strides views as [G, width, out]
            output.view(groups, b.width, -1).add_(delta)
            return output
    output, out = _rows(output)
    delta = delta.flatten(0, 1)
    if b.span is not None:
        out[b.span].add_(delta)
    elif b.order is not None:
        out.add_(delta.index_select(0, b.order))
    else:
        out.index_add_(0, b.rows, (delta if b.valid is None else delta.index_select(0, b.valid)).to(out.dtype))
    return output


def _groups(name: str, step: LoraStep, st: Stack, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
    """Add each group's update to `output` (prompt chunks, or adapters of different ranks); the output, None
    when no adapter of the step targets the module."""
    pairs = [(g, group, group.adapter.modules.get(name)) for g, group in enumerate(step.groups)]
    pairs = [(g, group, p) for g, group, p in pairs if p is not None]
    if not pairs:
        return None
    flat = x.reshape(-1, x.shape[-1])
    output, out = _rows(output)
    for g, group, pair in pairs:
        if st.a is not None:  # the stacked copies (scaling in B), x @ A shared with the siblings
            shared = step.shares.pop((name, g), None)
            if shared is not None and shared[0] is x:
                h = shared[1]
            else:
                h = _share(step, st, x, flat[group.rows].to(st.a.dtype) @ st.a[g], g)
            delta = h @ st.b[g]
        else:
            dtype = work_dtype(pair.a.dtype)
            delta = F.linear(F.linear(flat[group.rows].to(dtype), pair.a.to(dtype)), pair.b.to(dtype))
            delta = delta * group.adapter.scaling
        if isinstance(group.rows, slice):
            out[group.rows].add_(delta)  # promoted as in PEFT, rounded once
        else:
            out.index_copy_(0, group.rows, (out.index_select(0, group.rows) + delta).to(out.dtype))
    return output


def hook(name: str) -> Callable[[torch.nn.Module, tuple, torch.Tensor], torch.Tensor | None]:
    """The forward hook of module `name` (module docstring)."""
    stacked: list[Stack | None] = [None]  # the last adapter set's (decodes keep their adapters many steps)

    def apply(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        step = _ACTIVE.get()
        if step is None:
            return None
        st = stacked[0]
        if st is None or st.adapters != step.adapters:  # Adapter compares by identity
            st = stacked[0] = stack(name, step)
        if step.batched is not None and st.a is not None:  # every adapter of the step, one rank: two bmms
            return _batch(name, step, step.batched, st, args[0], output)
        return _groups(name, step, st, args[0], output)

    return apply
