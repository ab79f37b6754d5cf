"""Sibling projections that read the same input run as one packed matmul: q/k/v, and gate/up.

Transformers' model code calls `q_proj(x)`, `k_proj(x)` and `v_proj(x)` on one
hidden-state tensor (and `gate_proj(x)`, `up_proj(x)` in the MLP). On a CPU each
oneDNN call has a fixed cost that dominates at decode sizes; measured on the
2-core VM (SmolLM2-135M shapes, bf16, 16 rows) three q/k/v matmuls take 162 us
against 89 us for one over the concatenated weight. A group packs the
concatenated weight once (the process-wide `PackedCache`, under the joined
identities of its members), and each member's forward returns its slice of the
group's output for that input: the first member called computes it, the others
find it by the input's identity. A member called with another input (a model
whose siblings read different tensors) or whose packed weight was evicted
runs its own plain `linear`, so outputs never depend on the call order.
The model's modules and the pool's weights are not changed. The held input and
output are per thread: instances of one checkpoint on one pool share a skeleton
(`skeleton.RuntimeCache`) and each steps on its own thread.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # transformers' names across families


@dataclass
class Group:
    """Sibling `nn.Linear`s of one parent that can share a matmul, with the pool identities of their weights."""

    members: list[torch.nn.Linear]
    idents: list[str]

    @property
    def ident(self) -> str:
        """The packed cache key of the concatenated weight."""
        return "fused:" + "+".join(self.idents)

    def weight(self) -> torch.Tensor:
        """The members' weights stacked along the output features (a copy; built only to be packed)."""
        return torch.cat([m.weight.detach() for m in self.members])

    def bias(self) -> torch.Tensor | None:
        """The members' biases stacked (all have one), or None (none has)."""
        if self.members[0].bias is None:
            return None
        return torch.cat([m.bias.detach() for m in self.members])


def groups(model: torch.nn.Module, identities: Mapping[int, str], packable: tuple[torch.dtype, ...]) -> list[Group]:
    """Every group of sibling projections in `model` whose members are plain CPU `nn.Linear`s of one dtype,
    input size and bias presence, each weight with an identity (by `data_ptr`)."""
    found: list[Group] = []
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SIBLINGS:
            members = [children.get(n) for n in names]
            if not all(type(m) is torch.nn.Linear for m in members):
                continue
            first = members[0]
            if first.weight.dtype not in packable or any(
                    m.weight.device.type != "cpu" or m.weight.dtype != first.weight.dtype
                    or m.in_features != first.in_features or (m.bias is None) != (first.bias is None)
                    for m in members):
                continue
            idents = [identities.get(m.weight.data_ptr()) for m in members]
            if all(i is not None for i in idents):
                found.append(Group(members, idents))
    return found


class FusedProjection:
    """One packed matmul for a group; `part(i)` is the forward of member i."""

    def __init__(self, group: Group, cache, bias: torch.Tensor | None) -> None:
        self.group, self.cache, self.bias = group, cache, bias
        self.ident = group.ident
        bounds = [0]
        for m in group.members:
            bounds.append(bounds[-1] + m.out_features)
        self.bounds = bounds
        self._held = threading.local()  # this thread's input, the group's output for it, members served

    def part(self, i: int) -> FusedPart:
        """The forward of member `i`."""
        return FusedPart(self, i)

    def run(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Member `i`'s output for `x`: its slice of the group's output (computed once per input)."""
        held = self._held
        if getattr(held, "x", None) is not x:
            member = self.group.members[i]
            packed = self.cache.get(self.ident)
            if packed is None or x.dtype != member.weight.dtype:
                return F.linear(x, member.weight, member.bias)
            held.out = torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
            held.x, held.served = x, 0
        out = held.out[..., self.bounds[i]:self.bounds[i + 1]]
        held.served += 1
        if held.served == len(self.group.members):  # every member has its slice: hold no tensors between calls
            held.x = held.out = None
        return out


class FusedPart:
    """The forward of one member of a fused group (an instance attribute of that `nn.Linear`)."""

    def __init__(self, fused: FusedProjection, index: int) -> None:
        self.fused, self.index = fused, index

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.run(self.index, x)
