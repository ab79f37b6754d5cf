"""Recording a template during a model's first prefill: first use of each weight, operators, shapes."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_LAYER = re.compile(r"^(.*?\.\d+)\.")


def group_of(name: str) -> str:
    """The load group of a tensor: its numbered block (`model.layers.3`), else its module path."""
    m = _LAYER.match(name)
    return m.group(1) if m else name.rsplit(".", 1)[0]


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, None] = {}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.setdefault(str(func.overloadpacket.__name__), None)
        aliases = bool(func._schema.returns) and func._schema.returns[0].alias_info is not None
        if isinstance(out, torch.Tensor) and not aliases:  # views of inputs (or of the arena) are no workspace
            self.largest = max(self.largest, out.numel() * out.element_size())
        return out


class Recorder:
    """Context manager around one forward: which checkpoint tensors each module used first, in order."""

    def __init__(self, model: torch.nn.Module, names_of: Mapping[int, list[str]]) -> None:
        self.model, self.names_of = model, names_of
        self.order: list[str] = []
        self._seen: set[int] = set()
        self._handles: list = []
        self._ops = _Ops()
        self.hidden_shape: list[int] = []

    def _pre(self, module: torch.nn.Module, args) -> None:
        for p in module.parameters(recurse=False):
            if id(p) not in self._seen:
                self._seen.add(id(p))
                self.order.extend(self.names_of.get(id(p), []))
        if not self.hidden_shape and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            self.hidden_shape = list(args[0].shape)

    def __enter__(self) -> Recorder:
        for m in self.model.modules():
            if any(True for _ in m.parameters(recurse=False)):
                self._handles.append(m.register_forward_pre_hook(self._pre))
        self._ops.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ops.__exit__(*exc)
        for h in self._handles:
            h.remove()

    def groups(self, all_names: list[str]) -> list[list[str]]:
        """First-use order grouped by block; tensors the forward never touched go last."""
        out: dict[str, list[str]] = {}
        for name in self.order + [n for n in all_names if n not in set(self.order)]:
            out.setdefault(group_of(name), []).append(name)
        return list(out.values())

    @property
    def ops(self) -> list[str]:
        """Operators in first-run order."""
        return list(self._ops.ops)

    @property
    def workspace_bytes(self) -> int:
        """Largest tensor an operator produced."""
        return self._ops.largest


def names_by_param(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[int, list[str]]:
    """Parameter object id -> the checkpoint names bound to it (tied weights have several)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in tensors:
            out.setdefault(id(p), []).append(name)
    return out
