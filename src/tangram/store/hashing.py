"""Content hashing of tensor bytes (xxh3-128: fast, 128-bit, good enough as an identity).

A tensor's identity hash covers all its bytes in order, so checking it is one
sequential pass. Tensors larger than one block also carry the hash of each
`BLOCK_BYTES` block (`block_hashes`): a load checks those instead, each block
by whichever reader thread holds its bytes, so a 272 MB embedding is verified
by every thread at once, while its bytes are still in that core's cache.
"""

from __future__ import annotations

import torch
import xxhash

BLOCK_BYTES = 4 << 20  # a multiple of the format's alignment and a divisor of every probed chunk size


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


def block_hashes(data: torch.Tensor, block_bytes: int = BLOCK_BYTES) -> list[str]:
    """Hex xxh3-128 of each `block_bytes` block of a flat uint8 CPU tensor (the last one may be shorter);
    empty when the tensor fits in one block (its identity hash checks it as fast)."""
    n = data.numel()
    if n <= block_bytes:
        return []
    return [hash_bytes(data[at : at + block_bytes]) for at in range(0, n, block_bytes)]
