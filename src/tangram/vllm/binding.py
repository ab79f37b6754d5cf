"""Where an acquired model's tensors lie for a vLLM shell to map them (`BindSpec`), and their content identity."""

from __future__ import annotations

import hashlib
import logging
import os

import torch

from tangram.pool import DevicePool
from tangram.pool.records import Binding
from tangram.store.format import ALIGNMENT, align_up
from tangram.store.io import fd_path, shared_host_buffer
from tangram.vllm.messages import BindSpec, TensorRef

log = logging.getLogger(__name__)


def weights_identity(index) -> str:
    """The content identity of a checkpoint's weights: every tensor name with its content key, as one digest."""
    pairs = sorted(f"{name}={entry.key}" for name, entry in index.tensors.items())
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()[:32]


Staging = tuple[torch.Tensor, int] | None  # a private arena's shared-memory copy and its descriptor, until bound


def bind_spec(pool: DevicePool, binding: Binding, identity: str) -> tuple[BindSpec, Staging]:
    """Where each tensor of an acquired model lies for the shell to map, and what must live until it has bound.

    A shared CPU arena (`pool.shared`) or a CUDA arena is mapped as it is, no copy. A private CPU arena cannot be
    mapped by another process: the tensors are staged through a shared-memory buffer (one host copy per start).
    """
    arena = pool.arena
    tensors = binding.tensors

    def ref(name: str, t: torch.Tensor, offset: int) -> TensorRef:
        return TensorRef(name, offset, t.numel() * t.element_size(), str(t.dtype).removeprefix("torch."),
                         tuple(t.shape))

    if arena.device.type == "cpu" and arena.share_path is None:
        total = sum(align_up(t.numel() * t.element_size(), ALIGNMENT) for t in tensors.values())
        buf, fd = shared_host_buffer(total)
        refs, at = [], 0
        for name, t in tensors.items():
            r = ref(name, t, at)
            buf[at : at + r.nbytes].copy_(t.reshape(-1).view(torch.uint8))
            refs.append(r)
            at += align_up(r.nbytes, ALIGNMENT)
        log.info("pool arena is private: staged %d bytes through shared memory (pool.shared = true maps it "
                 "without this copy)", total)
        return BindSpec(tuple(refs), total, fd_path(fd), None, key=identity), (buf, fd)
    refs = [ref(name, t, arena.offset_of(t)) for name, t in tensors.items()]
    return BindSpec(tuple(refs), arena.capacity, arena.share_path, arena.buffer if arena.device.type == "cuda"
                    else None, key=identity), None


def unstage(staging: Staging) -> None:
    """Let go of a staging copy once the shell has mapped it."""
    if staging is not None:
        os.close(staging[1])  # the shell's mapping keeps what it still reads
