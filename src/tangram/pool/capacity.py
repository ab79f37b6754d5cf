"""How big a device pool is: what a user may write, and the default rule when they write nothing.

A capacity is given as bytes ("6GiB", "512MB", "2e9", 6442450944), as a
fraction of the device's memory ("0.25", "25%", 0.25), or not at all (None:
the default rule). A fraction means:

- on the CPU, of the host's *total* memory (the cgroup limit if lower): the
  arena's pages are touched as they are used, so a fraction of what happens to
  be free at start would only make the capacity depend on the moment;
- on CUDA, of the device's *free* memory: the arena is allocated (and touched)
  whole at start, so only free memory can be had.

Default rule (`default_capacity`): on the CPU min(25% of total memory, 8 GiB),
enough for every demo and for a 4B model in bf16 while an idle server costs a
laptop nothing it notices; on CUDA 80% of free device memory, leaving the rest
for the CUDA context, activations and operator workspaces outside the pool.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BeforeValidator, TypeAdapter, ValidationError

log = logging.getLogger(__name__)
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CPU_DEFAULT_FRACTION = 0.25  # of total host memory
CPU_DEFAULT_CAP = 8 * GiB
CUDA_DEFAULT_FRACTION = 0.8  # of free device memory
MIN_BYTES = 4 * KiB  # one arena alignment unit: a pool smaller holds nothing
ENV_CAPACITY = "TANGRAM_POOL_CAPACITY"

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1 << 40}
_TEXT = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z%]*)\s*$", re.IGNORECASE)
HELP = ('bytes with a unit ("6GiB", "512MB", "2e9") or a fraction of the device\'s memory ("0.25", "25%": of '
        "total memory on the CPU, of free memory on a GPU)")


def _parse(value: object) -> int | float | None:
    """Bytes (int), a fraction in (0, 1] (float), or None; ValueError naming the value otherwise."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = value, None
    elif isinstance(value, str):
        if not value.strip():
            return None
        m = _TEXT.match(value)
        if m is None:
            raise ValueError(f"pool capacity {value!r}: give {HELP}")
        number, unit = float(m.group(1)), m.group(2).lower() or None
        if unit is not None and unit != "%" and unit not in _UNITS:
            raise ValueError(f"pool capacity {value!r}: unknown unit {m.group(2)!r} (use B, KB, MB, GB, TB, "
                             "KiB, MiB, GiB, TiB or %)")
    else:
        raise ValueError(f"pool capacity {value!r}: give {HELP}")
    if number is None:
        return None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"pool capacity {value!r}: must be a positive, finite number")
    if unit == "%":
        if number > 100:
            raise ValueError(f"pool capacity {value!r}: a percentage is at most 100%")
        return number / 100
    if unit is not None:
        number *= _UNITS[unit]
    elif number <= 1:
        return float(number)  # a bare number up to 1 is a fraction
    if not float(number).is_integer():
        raise ValueError(f"pool capacity {value!r}: bytes must be a whole number (a fraction is at most 1)")
    if number < MIN_BYTES:
        hint = f"; did you mean '{value}GiB'?" if unit is None else ""
        raise ValueError(f"pool capacity {value!r}: {int(number)} bytes is too small (at least 4 KiB){hint}")
    return int(number)


PoolCapacity = Annotated[int | float | None, BeforeValidator(_parse)]
"""A pydantic field type: bytes, a fraction of the device's memory, or None for the default rule."""

_ADAPTER: TypeAdapter = TypeAdapter(PoolCapacity)


def parse_capacity(value: str | int | float | None) -> int | float | None:
    """Validate a pool capacity as given by a user: bytes (int), fraction (float in (0, 1]) or None (default).

    Raises ValueError with a readable message for a bad value.
    """
    try:
        return _ADAPTER.validate_python(value)
    except ValidationError as exc:
        raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None


def default_capacity(device_type: str, total: int, free: int) -> int:
    """The default pool bytes of one device from its memory: pure, so testable for any machine."""
    if device_type == "cuda":
        return int(free * CUDA_DEFAULT_FRACTION)
    return int(min(total * CPU_DEFAULT_FRACTION, CPU_DEFAULT_CAP))


def default_rule(device_type: str) -> str:
    """The default rule in words."""
    if device_type == "cuda":
        return f"{CUDA_DEFAULT_FRACTION:.0%} of free device memory"
    return f"min({CPU_DEFAULT_FRACTION:.0%} of total memory, {CPU_DEFAULT_CAP / GiB:g} GiB)"


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def device_memory(device: torch.device) -> tuple[int, int]:
    """(total, free) bytes of a device: CUDA's, or the host's physical memory (bounded by a cgroup limit)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    page = os.sysconf("SC_PAGE_SIZE")
    total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    limit = _cgroup_limit()
    if limit is not None and limit < total:
        total, free = limit, min(free, limit)
    return total, free


def resolve_capacity(capacity: int | float | None, device: torch.device, shares: int = 1) -> int:
    """Bytes for one pool on `device`: given bytes, a fraction of its memory, or the default rule (None).

    `shares`: pools that split one memory (logical CPU devices): a fraction or the default is divided among them.
    """
    return describe_capacity(capacity, device, shares)[0]


def describe_capacity(capacity: int | float | None, device: torch.device, shares: int = 1) -> tuple[int, str]:
    """(bytes, how they were chosen in words) for one pool on `device`; see `resolve_capacity`."""
    spec = parse_capacity(capacity)
    if isinstance(spec, int):
        return spec, "given"
    total, free = device_memory(device)
    split = f", split {shares} ways" if shares > 1 else ""
    if spec is None:
        rule = default_rule(device.type).replace("total memory", f"{total / GiB:.1f} GiB RAM")
        return default_capacity(device.type, total, free) // shares, f"default: {rule}{split}"
    if device.type == "cuda":
        return int(free * spec) // shares, f"{spec:.0%} of {free / GiB:.1f} GiB free{split}"
    return int(total * spec) // shares, f"{spec:.0%} of {total / GiB:.1f} GiB RAM{split}"


def format_bytes(n: int) -> str:
    """Bytes in GiB (or MiB below 1 GiB), two decimals."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.2f} MiB"


def configured_capacity(value: int | float | None) -> int | float | None:
    """The capacity a server uses: its configured value, else $TANGRAM_POOL_CAPACITY, else None (the default)."""
    if value is not None:
        return value
    text = os.environ.get(ENV_CAPACITY)
    if text is None:
        return None
    try:
        return parse_capacity(text)
    except ValueError as exc:
        raise ValueError(f"{ENV_CAPACITY}: {exc}") from None


def plan_capacities(capacity: int | float | None, devices: list[str]) -> list[tuple[int, str]]:
    """(bytes, how chosen) of each local device's pool; logical CPU devices split one memory (bytes given
    explicitly are per device). Warns when CPU pools add up to more than the memory available now."""
    cpus = sum(1 for d in devices if torch.device(d).type == "cpu")
    plan = [describe_capacity(capacity, torch.device(d), cpus if torch.device(d).type == "cpu" else 1)
            for d in devices]
    on_cpu = sum(n for d, (n, _) in zip(devices, plan) if torch.device(d).type == "cpu")
    if on_cpu:
        _, free = device_memory(torch.device("cpu"))
        if on_cpu > free:
            log.warning("CPU pools of %s exceed the %s of memory available now: they fill as models load, and "
                        "filling them may run the host out of memory", format_bytes(on_cpu), format_bytes(free))
    return plan
