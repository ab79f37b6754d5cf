"""Pool capacity: what a user may write, the default rule, and an arena that touches its pages as used."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import re
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from conftest import make_tensor
from tangram.control import ServeConfig
from tangram.pool import DevicePool, touch
from tangram.pool.arena import Arena
from tangram.pool.capacity import (
    CPU_DEFAULT_CAP, ENV_CAPACITY, GiB, MiB, configured_capacity, default_capacity, describe_capacity,
    device_memory, parse_capacity, plan_capacities, resolve_capacity,
)
from tangram.store import Loader, save

CPU = torch.device("cpu")
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@pytest.mark.parametrize("text, want", [
    ("6GiB", 6 * GiB), ("6 gib", 6 * GiB), ("512MB", 512 * 10**6), ("512MiB", 512 * MiB), ("2e9", 2 * 10**9),
    ("1.5GB", 15 * 10**8), ("4096", 4096), (6 * GiB, 6 * GiB), (2e9, 2 * 10**9), ("1TiB", 1 << 40),
    ("0.25", 0.25), ("25%", 0.25), ("1", 1.0), (0.5, 0.5), ("100%", 1.0), (None, None), ("", None),
])
def test_parse_bytes_with_units_and_fractions(text, want):
    got = parse_capacity(text)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("text, why", [
    ("lots", "give bytes with a unit"), ("6 GX", "unknown unit 'GX'"), ("-1", "positive"), ("0", "positive"),
    (0.0, "positive"), ("1.5", "whole number"), (2.5, "whole number"), ("8", "too small.*did you mean '8GiB'"),
    (float("inf"), "finite"), ("nan", "give bytes"), ("200%", "at most 100%"), (True, "give bytes"),
    ([1], "give bytes"), ("6GiB6", "give bytes"),
])
def test_bad_capacities_get_a_clear_error(text, why):
    with pytest.raises(ValueError, match=f"pool capacity .*{why}"):
        parse_capacity(text)


def test_serve_config_accepts_the_same_values_and_rejects_bad_ones():
    assert ServeConfig().pool_capacity is None  # the default rule
    assert ServeConfig(pool_capacity="6GiB").pool_capacity == 6 * GiB
    assert ServeConfig(pool_capacity="25%").pool_capacity == 0.25
    assert ServeConfig(pool_capacity=64 << 20).pool_capacity == 64 << 20
    with pytest.raises(ValidationError, match="unknown unit"):
        ServeConfig(pool_capacity="6 parsecs")


def test_config_file_takes_a_capacity_with_units(tmp_path):
    (tmp_path / "c.toml").write_text('pool_capacity = "512MiB"\n')
    assert ServeConfig.from_file(tmp_path / "c.toml").pool_capacity == 512 * MiB


def test_default_rule_is_a_bounded_share_of_total_memory_on_the_cpu_and_most_of_free_memory_on_cuda():
    assert default_capacity("cpu", total=16 * GiB, free=1 * GiB) == 4 * GiB  # of total, not of free
    assert default_capacity("cpu", total=24 * GiB, free=20 * GiB) == 6 * GiB
    assert default_capacity("cpu", total=256 * GiB, free=200 * GiB) == CPU_DEFAULT_CAP == 8 * GiB
    assert default_capacity("cuda", total=80 * GiB, free=70 * GiB) == int(70 * GiB * 0.8)


def test_resolution_on_this_machine_and_the_environment_variable(monkeypatch):
    total, _ = device_memory(CPU)
    nbytes, how = describe_capacity(None, CPU)
    assert nbytes == min(total // 4, 8 * GiB) and how.startswith("default: min(25% of ")
    assert resolve_capacity(0.1, CPU) == int(total * 0.1)  # a fraction is of total memory on the CPU
    assert resolve_capacity("1GiB", CPU) == GiB
    halves = plan_capacities(0.5, ["cpu", "cpu"])  # logical CPU devices split one memory
    assert [n for n, _ in halves] == [int(total * 0.5) // 2] * 2
    assert [n for n, _ in plan_capacities(64 << 20, ["cpu", "cpu"])] == [64 << 20] * 2  # bytes are per device
    monkeypatch.delenv(ENV_CAPACITY, raising=False)
    assert configured_capacity(None) is None
    monkeypatch.setenv(ENV_CAPACITY, "3GiB")
    assert configured_capacity(None) == 3 * GiB and configured_capacity(GiB) == GiB  # the config wins
    monkeypatch.setenv(ENV_CAPACITY, "three")
    with pytest.raises(ValueError, match=f"{ENV_CAPACITY}: pool capacity 'three'"):
        configured_capacity(None)


def resident(buf: torch.Tensor, offset: int, length: int) -> float:
    """Fraction of the pages of buf[offset:offset + length] resident in memory (mincore)."""
    page = mmap.PAGESIZE
    pages = -(-length // page)
    vec = (ctypes.c_ubyte * pages)()
    assert offset % page == 0
    rc = _LIBC.mincore(ctypes.c_void_p(buf.data_ptr() + offset), ctypes.c_size_t(length), vec)
    assert rc == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / pages


def vm_rss() -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024


def test_a_large_arena_does_not_touch_its_pages_at_construction():
    before = vm_rss()
    arena = Arena(2 * GiB, CPU, 4096, touch_ahead=16 * MiB)
    assert arena.toucher.idle.wait(30)
    grown = vm_rss() - before
    assert grown < 256 * MiB, f"building a 2 GiB arena made {grown / MiB:.0f} MiB resident"
    assert resident(arena.buffer, 0, 16 * MiB) == 1.0  # the touch-ahead is resident: the first load lands there
    assert resident(arena.buffer, 1 * GiB, 64 * MiB) == 0.0


def test_placed_memory_is_touched_ahead_of_the_highest_placement():
    arena = Arena(1 * GiB, CPU, 4096, touch_ahead=8 * MiB)
    assert arena.toucher.idle.wait(30) and arena.toucher.mark == 8 * MiB
    arena.place(0, 4 * MiB, "first")  # lands in touched memory; the touching runs on beyond it
    assert resident(arena.buffer, 0, 4 * MiB) == 1.0
    assert arena.toucher.idle.wait(30) and arena.toucher.mark == 12 * MiB
    assert resident(arena.buffer, 0, 12 * MiB) == 1.0 and resident(arena.buffer, 64 * MiB, 64 * MiB) == 0.0
    arena.place(256 * MiB, 32 * MiB, "far")  # beyond the frontier: its own pages are left to its writer
    assert arena.toucher.idle.wait(30) and arena.toucher.mark == 296 * MiB
    assert resident(arena.buffer, 288 * MiB, 8 * MiB) == 1.0  # the touch-ahead above it
    assert resident(arena.buffer, 256 * MiB, 32 * MiB) == 0.0  # not raced while its load writes it
    assert resident(arena.buffer, 512 * MiB, 64 * MiB) == 0.0  # nothing far beyond
    arena.free(256 * MiB)
    arena.place(4 * MiB, 4096, "small")  # below the frontier: no more touching
    assert arena.toucher.idle.is_set() and arena.toucher.target == 296 * MiB


def test_touch_all_makes_the_whole_arena_resident_and_keeps_its_bytes():
    arena = Arena(64 * MiB, CPU, 4096, touch_ahead=4 * MiB)
    assert arena.toucher.idle.wait(30) and resident(arena.buffer, 32 * MiB, 32 * MiB) == 0.0
    arena.buffer[:4096] = 7
    arena.toucher.touch_all()
    assert arena.toucher.idle.wait(30) and arena.toucher.mark == 64 * MiB
    assert resident(arena.buffer, 0, 64 * MiB) == 1.0 and bool((arena.buffer[:4096] == 7).all())


def test_loads_land_intact_in_memory_touched_while_they_write(tmp_path, monkeypatch):
    monkeypatch.setattr(touch, "TOUCH_AHEAD_BYTES", 64 << 10)  # every placement runs ahead of the touched mark
    monkeypatch.setattr(touch, "CHUNK_BYTES", 64 << 10)  # many small populates racing the load's writes
    state = {f"w{i}": make_tensor((1 << 18,), torch.float32, seed=i) for i in range(8)}  # 8 MiB
    save(state, tmp_path / "m")
    pool = DevicePool(64 << 20, loader=Loader(method="pread"))
    region = pool.kv_region(16 << 20, torch.uint8)
    kv = region.allocate(1)  # the model lands above 16 MiB, beyond the touch-ahead
    binding = pool.acquire(tmp_path / "m")
    for name, want in state.items():
        assert torch.equal(binding.tensors[name].view(torch.uint8), want.view(torch.uint8)), name
    assert pool.arena.toucher.idle.wait(30)
    assert pool.arena.toucher.mark >= pool.arena.blocks()[-1].offset + pool.arena.blocks()[-1].size
    pool.release(binding)
    region.free(kv)
