"""Content hashing of tensor bytes (xxh3-128: fast, 128-bit, good enough as an identity)."""

from __future__ import annotations

import torch
import xxhash


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's bytes on the CPU (copies only if not contiguous / not on CPU)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8)


def hash_bytes(data: torch.Tensor | memoryview | bytes) -> str:
    """Hex xxh3-128 of a uint8 tensor (CPU) or a bytes-like object."""
    if isinstance(data, torch.Tensor):
        if data.numel() == 0:
            return xxhash.xxh3_128_hexdigest(b"")
        data = memoryview(data.numpy())
    return xxhash.xxh3_128_hexdigest(data)
