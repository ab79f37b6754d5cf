"""Recording a template during a model's first prefill: the first use of each weight, in order."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

_LAYER = re.compile(r"^(.*?\.\d+)\.")


def group_of(name: str) -> str:
    """The load group of a tensor: its numbered block (`model.layers.3`), else its module path."""
    m = _LAYER.match(name)
    return m.group(1) if m else name.rsplit(".", 1)[0]


class Recorder:
    """Context manager around one forward: which checkpoint tensors each module used first, in order."""

    def __init__(self, model: torch.nn.Module, names_of: Mapping[int, list[str]]) -> None:
        self.model, self.names_of = model, names_of
        self.order: list[str] = []
        self._seen: set[int] = set()
        self._handles: list = []

    def _pre(self, module: torch.nn.Module, args) -> None:
        for p in module.parameters(recurse=False):
            if id(p) not in self._seen:
                self._seen.add(id(p))
                self.order.extend(self.names_of.get(id(p), []))

    def __enter__(self) -> Recorder:
        for m in self.model.modules():
            if any(True for _ in m.parameters(recurse=False)):
                self._handles.append(m.register_forward_pre_hook(self._pre))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def groups(self, all_names: list[str]) -> list[list[str]]:
        """First-use order grouped by block; tensors the forward never touched go last."""
        out: dict[str, list[str]] = {}
        for name in self.order + [n for n in all_names if n not in set(self.order)]:
            out.setdefault(group_of(name), []).append(name)
        return list(out.values())


def names_by_param(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[int, list[str]]:
    """Parameter object id -> the checkpoint names bound to it (tied weights have several)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in tensors:
            out.setdefault(id(p), []).append(name)
    return out
