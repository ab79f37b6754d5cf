"""Build a transformers model skeleton without allocating weights, then bind loaded tensors into it.

Parameters are created on the meta device (no memory, no random init) and the
loaded tensors are assigned in place (`load_state_dict(assign=True)`), so the
model uses the loader's buffers directly, with no copy.

Every bound parameter keeps `requires_grad=True`, as a fresh transformers model
has it (the forwards run under `torch.inference_mode`, so nothing is recorded):
`aten::matmul` folds the lm_head's `[B, 1, H]` input (the last position sliced
from a prefill's `[B, T, H]`) into one `mm` only when the weight requires grad;
otherwise it expands the weight to a batch and copies it on every prefill
(SmolLM2-135M: a 56 MB copy, each prefill of a re-bound skeleton 2x slower).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tangram.engine.dtype import compute_dtype
from tangram.store.errors import CheckpointError
from tangram.store.format import INDEX_FILE

# accelerate's init_empty_weights patches nn.Module.register_parameter process-wide, which would turn the
# tensors another thread assigns meanwhile into meta tensors: builds are serialised.
_BUILD_LOCK = threading.Lock()


def build_causal_lm(checkpoint: str | Path, tensors: Mapping[str, torch.Tensor]) -> PreTrainedModel:
    """A causal LM of the checkpoint's architecture whose parameters are exactly `tensors`."""
    path = Path(checkpoint)
    dtype = compute_dtype(t.dtype for t in tensors.values())
    return bind(skeleton(path, dtype), tensors, path)


def skeleton(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The checkpoint's architecture with meta parameters (nothing allocated but the buffers)."""
    config = AutoConfig.from_pretrained(path)
    with _BUILD_LOCK:
        with init_empty_weights(include_buffers=False):  # buffers (rotary tables) stay real
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def bind(model: PreTrainedModel, tensors: Mapping[str, torch.Tensor], path: Path) -> PreTrainedModel:
    """Assign `tensors` as the model's parameters (no copy), re-tie, move buffers next to them."""
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    with _BUILD_LOCK:
        result = model.load_state_dict(dict(tensors), assign=True, strict=False)
        model.tie_weights()
    for p in model.parameters():  # a re-bound skeleton computes exactly as a fresh build (module docstring)
        if p.is_floating_point() and not p.requires_grad:
            p.requires_grad_(True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(path, f"checkpoint lacks {len(missing)} parameters of the model, e.g. {missing[:3]}")
    if result.unexpected_keys:
        raise CheckpointError(path, f"checkpoint has tensors the model does not use, e.g. {result.unexpected_keys[:3]}")
    for module in model.modules():  # move the (few, small) buffers next to the weights
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    return model.eval()


def unbind(model: PreTrainedModel) -> None:
    """Replace the parameters by meta tensors: the skeleton keeps no pool memory alive."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and not p.is_meta:
                module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                              requires_grad=p.requires_grad)


class Slots:
    """Where each bound tensor sits in one skeleton, learnt from a full `bind`: a re-bind of the same checkpoint
    assigns through it (no module walk, no `load_state_dict`: about 0.5 ms instead of 6 ms for SmolLM2) and an
    unbind puts back meta stand-ins made once, tied parameters staying tied."""

    def __init__(self, model: PreTrainedModel, tensors: Mapping[str, torch.Tensor]) -> None:
        name_of: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in tensors:
                name_of.setdefault(id(p), name)
        groups: dict[str, tuple[list[tuple[torch.nn.Module, str]], torch.nn.Parameter]] = {}
        self.complete = True  # every parameter came from a named tensor (else: no fast path)
        for module in model.modules():
            for pname, p in module._parameters.items():
                if p is None:
                    continue
                name = name_of.get(id(p))
                if name is None:
                    self.complete = False
                    continue
                if name not in groups:
                    meta = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                              requires_grad=p.requires_grad)
                    groups[name] = ([], meta)
                groups[name][0].append((module, pname))
        self.names = frozenset(tensors)
        self.groups = [(name, places, meta) for name, (places, meta) in groups.items()]

    def rebind(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Assign `tensors` through the slots; False (nothing changed) when they do not match the learnt ones."""
        if not self.complete or tensors.keys() != self.names:
            return False
        if any(tensors[n].shape != m.shape or tensors[n].dtype != m.dtype for n, _, m in self.groups):
            return False
        for name, places, _ in self.groups:
            t = tensors[name]
            p = torch.nn.Parameter(t, requires_grad=t.is_floating_point())  # as `bind` leaves them
            for module, pname in places:
                module._parameters[pname] = p
        return True

    def unbind(self) -> None:
        """Put the meta stand-ins back (what `unbind` does, without allocating)."""
        for _, places, meta in self.groups:
            for module, pname in places:
                module._parameters[pname] = meta


@dataclass
class _Entry:
    model: PreTrainedModel
    users: int = 0
    slots: Slots | None = None  # learnt at the first bind

    def bind(self, tensors: Mapping[str, torch.Tensor], path: Path) -> PreTrainedModel:
        """Bind through the slots when they fit `tensors`, else fully (and learn the slots)."""
        if self.slots is None or not self.slots.rebind(tensors):
            bind(self.model, tensors, path)
            self.slots = Slots(self.model, tensors)
        return self.model

    def unbind(self) -> None:
        """Strip the bound tensors: the skeleton keeps no pool memory alive."""
        if self.slots is not None:
            self.slots.unbind()
        else:
            unbind(self.model)


class RuntimeCache:
    """Model skeletons and tokenizers of checkpoints started before in this process (a long-lived worker).

    A restart re-binds the pooled tensors into the kept skeleton instead of
    building it again (about 0.3 s for SmolLM2) and reuses the tokenizer (another
    0.3 s). Instances of one checkpoint on one pool bind identical tensors and
    share one skeleton; an unused skeleton holds meta tensors only.
    """

    def __init__(self, max_idle: int = 16) -> None:
        self.max_idle = max_idle
        self._models: OrderedDict[tuple, list[_Entry]] = OrderedDict()
        self._tokenizers: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _stamp(path: Path) -> tuple:
        index = path / INDEX_FILE
        return str(path.resolve()), index.stat().st_mtime_ns if index.exists() else 0

    def model(self, path: Path, tensors: Mapping[str, torch.Tensor]) -> PreTrainedModel:
        """A model bound to `tensors`: a kept skeleton when there is one, else a new build."""
        device = next(iter(tensors.values())).device
        key = (*self._stamp(path), str(device), compute_dtype(t.dtype for t in tensors.values()))
        with self._lock:
            entries = self._models.setdefault(key, [])
            self._models.move_to_end(key)
            for e in entries:  # same pool and checkpoint: the same tensors are already bound
                if e.users and _same_tensors(e.model, tensors):
                    e.users += 1
                    return e.model
            idle = next((e for e in entries if e.users == 0), None)
            if idle is not None:
                idle.users = 1
        if idle is not None:
            try:
                return idle.bind(tensors, path)
            except BaseException:
                with self._lock:
                    entries.remove(idle)
                raise
        model = build_causal_lm(path, tensors)
        with self._lock:
            self._models.setdefault(key, []).append(_Entry(model, 1, Slots(model, tensors)))
        return model

    def prepare(self, path: Path, device: torch.device | str, dtype: torch.dtype) -> PreTrainedModel:
        """Keep an unbound skeleton and the tokenizer of a checkpoint expected here, so that its first start
        only binds (a worker warming up before traffic); returns the kept skeleton (built now if none was)."""
        key = (*self._stamp(path), str(torch.device(device)), dtype)
        with self._lock:
            if self._models.get(key):
                return self._models[key][0].model
        model = skeleton(path, dtype)
        self.tokenizer(path)
        with self._lock:
            self._models.setdefault(key, []).append(_Entry(model, 0))
            self._trim()
        return model

    def skeletons(self, path: Path) -> list[PreTrainedModel]:
        """The skeletons kept for a checkpoint (bound or not), on any device."""
        stamp = self._stamp(path)
        with self._lock:
            return [e.model for key, es in self._models.items() if key[:2] == stamp for e in es]

    def release(self, model: PreTrainedModel) -> None:
        """An instance no longer uses `model`; the last user strips it to meta tensors."""
        with self._lock:
            for entries in self._models.values():
                for e in entries:
                    if e.model is model:
                        e.users -= 1
                        if e.users == 0:
                            e.unbind()
                        self._trim()
                        return

    def _trim(self) -> None:
        idle = sum(1 for es in self._models.values() for e in es if e.users == 0)
        for key in list(self._models):
            if idle <= self.max_idle:
                break
            entries = self._models[key]
            for e in [e for e in entries if e.users == 0]:
                entries.remove(e)
                idle -= 1
            if not entries:
                del self._models[key]

    def tokenizer(self, path: Path):
        """The checkpoint's tokenizer (loaded once)."""
        key = self._stamp(path)
        with self._lock:
            tok = self._tokenizers.get(key)
        if tok is None:
            tok = AutoTokenizer.from_pretrained(path)
            with self._lock:
                self._tokenizers[key] = tok
                while len(self._tokenizers) > 4 * self.max_idle:
                    self._tokenizers.popitem(last=False)
        return tok


def _same_tensors(model: PreTrainedModel, tensors: Mapping[str, torch.Tensor]) -> bool:
    params = dict(model.named_parameters())
    return all(n not in params or params[n].data_ptr() == t.data_ptr() for n, t in tensors.items())


RUNTIME = RuntimeCache()
