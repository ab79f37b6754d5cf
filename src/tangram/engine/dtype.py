"""The compute dtype of an instance: the one rule per device, and what a deployment's `dtype` setting means.

A model computes in the dtype of its pooled tensors (`compute_dtype`:
the pool's bytes are used without a copy), so choosing a compute dtype means
choosing which copy of a checkpoint is loaded; a copy in another dtype is made
once, before any start (`tangram.resolve.with_dtype`), never per forward.

By capability, not by timing: on a CPU with native bf16 matmul (x86 AVX512-BF16
or AMX-BF16, Arm BF16) bf16 is the fastest dtype, else fp32; fp16 is the slowest
on CPUs (on an AVX512-BF16 machine a 32x576 @ 576x1536 matmul took 190 us in
bf16, 425 us in fp32 and 1,550 us in fp16). CUDA runs a checkpoint's own dtype.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)

DtypeSetting = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags, and the Arm feature


def fast_bf16_in(cpuinfo: str) -> bool:
    """Whether `/proc/cpuinfo` text lists native bf16 matmul support (`flags` on x86, `Features` on Arm)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and BF16_FLAGS & set(value.split()):
            return True
    return False


@functools.cache
def cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this machine's CPU computes bf16 natively (read once per process; False when unknown)."""
    try:
        fast = fast_bf16_in(cpuinfo.read_text())
    except OSError:
        fast = False
    log.info("CPU bf16 matmul: %s", "native" if fast else "not native (fp32 is faster)")
    return fast


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype that computes fastest on `device`: bf16 or fp32 on a CPU (see above); bf16 on a CUDA device
    that supports it, else fp16. What `tangram fetch-demo` stores the demo in."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


def compute_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype a model computes in, given its tensors' dtypes: the first floating one's (the pool's bytes are
    used without a copy), float32 when none is floating. A kept skeleton is found again only under this dtype."""
    return next((d for d in dtypes if d.is_floating_point), torch.float32)


def choose_dtype(setting: DtypeSetting, stored: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The compute dtype of a checkpoint stored in `stored` on `device` under a deployment's `setting`.

    An explicit setting wins. `auto`: the checkpoint's own dtype on CUDA (and on
    other accelerators); on a CPU a 16-bit checkpoint computes in the CPU's
    fastest dtype (an fp16 one in bf16 on a bf16-capable CPU), while a float32
    checkpoint stays float32: auto never lowers a full-precision model.
    """
    if setting != "auto":
        return DTYPES[setting]
    if torch.device(device).type != "cpu" or stored == torch.float32 or stored not in SHORT:
        return stored
    return default_compute_dtype(device)
