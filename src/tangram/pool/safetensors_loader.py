"""The conventional stack's loading: `PoolConfig(loader="safetensors")`, the baseline of bench coldstart.

`safetensors.torch.load_file` of the model's original Hugging Face files (every
tensor of a file is read, as an engine loading a checkpoint does), then a copy
of each needed tensor into its device-pool destination.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from tangram.store import Checkpoint, LoadStats


class SafetensorsLoader:
    """Loader-compatible (`load_into`) reading each Tangram checkpoint's source safetensors files."""

    cache = None  # no host DRAM cache tier

    def __init__(self, sources: Mapping[str, Path]) -> None:
        self.sources = {str(Path(k).resolve()): Path(v) for k, v in sources.items()}

    def load_into(self, checkpoint: Checkpoint | str | Path, dests: Mapping[str, torch.Tensor], **_) -> LoadStats:
        """Fill `dests` (tensor name -> flat uint8 destination) from the source files."""
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        source = self.sources[str(ckpt.path.resolve())]
        t0 = time.perf_counter()
        stats = LoadStats(method="safetensors", threads=1)
        left = dict(dests)
        for f in sorted(source.glob("*.safetensors")):
            if not left:
                break
            state = load_file(f)
            stats.bytes_from_disk += sum(t.numel() * t.element_size() for t in state.values())
            for name in [n for n in left if n in state]:
                left.pop(name).copy_(state[name].contiguous().view(-1).view(torch.uint8))
                stats.tensors += 1
        if left:
            raise KeyError(f"{source}: no tensors {sorted(left)[:3]} in its safetensors files")
        stats.seconds = time.perf_counter() - t0
        return stats
