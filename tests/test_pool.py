"""The device pool on CPU: accounting, sharing, retention, eviction, errors, concurrency."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

from conftest import make_tensor
from tangram.pool import DevicePool, PoolPolicy, PoolFullError
from tangram.store import Loader, save

KB = 4096


def state(seed: int, n: int = 4, elems: int = 4096) -> dict[str, torch.Tensor]:
    return {f"layer{i}.weight": make_tensor((elems,), torch.float32, seed=seed * 100 + i) for i in range(n)}


def family(tmp_path):
    """A base model and a variant that differs in one layer."""
    base = state(1)
    variant = dict(base)
    variant["layer3.weight"] = base["layer3.weight"] + 1
    save(base, tmp_path / "base")
    save(variant, tmp_path / "variant")
    return base, variant


def check_accounting(pool: DevicePool) -> dict:
    snap = pool.snapshot()
    assert sum(snap["totals"].values()) == pool.capacity
    return snap


def assert_tensors(binding, want):
    for k, v in want.items():
        assert torch.equal(binding.tensors[k].view(torch.uint8), v.view(torch.uint8)), k  # random bytes hold NaNs


def test_acquire_release_reacquire_loads_nothing(tmp_path):
    base, _ = family(tmp_path)
    pool = DevicePool(1 << 20, loader=Loader(method="pread"))
    b = pool.acquire(tmp_path / "base")
    assert b.bytes_loaded == 4 * 16384 and b.bytes_reused == 0
    assert_tensors(b, base)
    assert check_accounting(pool)["totals"]["active"] == 4 * 16384
    pool.release(b)
    snap = check_accounting(pool)
    assert snap["totals"]["active"] == 0 and snap["totals"]["retained"] == 4 * 16384
    b2 = pool.acquire(tmp_path / "base")
    assert b2.bytes_loaded == 0 and b2.load is None
    assert_tensors(b2, base)
    assert b2.tensors["layer0.weight"].data_ptr() == b.tensors["layer0.weight"].data_ptr()


def test_sibling_variant_reads_only_the_differing_bytes(tmp_path):
    base, variant = family(tmp_path)
    pool = DevicePool(1 << 20, loader=Loader(method="pread"))
    pool.release(pool.acquire(tmp_path / "base"))
    v = pool.acquire(tmp_path / "variant")
    assert v.bytes_loaded == 16384 and v.bytes_reused == 3 * 16384
    assert v.load.bytes_from_disk == 16384
    assert_tensors(v, variant)
    shared = [t for t in pool.snapshot()["tensors"] if len(t["models"]) == 2]
    assert len(shared) == 3


def test_eviction_never_touches_active_bytes_and_full_pool_raises(tmp_path):
    save(state(1), tmp_path / "a")
    save(state(2), tmp_path / "b")
    pool = DevicePool(5 * 16384, loader=Loader(method="pread"))  # room for one model
    a = pool.acquire(tmp_path / "a")
    with pytest.raises(PoolFullError) as ei:
        pool.acquire(tmp_path / "b")
    assert ei.value.need == 4 * 16384
    assert_tensors(a, state(1))  # untouched
    check_accounting(pool)
    pool.release(a)
    b = pool.acquire(tmp_path / "b")  # evicts a's retained tensors
    assert_tensors(b, state(2))
    snap = check_accounting(pool)
    # only as much of a as b needed was evicted: one of a's tensors is still retained
    assert snap["totals"]["retained"] == 16384 and snap["totals"]["active"] == 4 * 16384


@pytest.mark.parametrize("policy", list(PoolPolicy))
def test_policies_fit_models_into_a_small_pool(tmp_path, policy):
    for s in range(4):
        save(state(s, n=3, elems=1024 * (s + 1)), tmp_path / f"m{s}")
    pool = DevicePool(40 * KB, policy=policy, loader=Loader(method="pread"))
    for rnd in range(3):
        for s in (0, 1, 2, 3, 1, 0):
            b = pool.acquire(tmp_path / f"m{s}")
            assert_tensors(b, state(s, n=3, elems=1024 * (s + 1)))
            check_accounting(pool)
            pool.release(b)
    assert 0.0 <= pool.snapshot()["fragmentation"] <= 1.0


def test_model_larger_than_pool_is_a_clear_error(tmp_path):
    save(state(1), tmp_path / "a")
    pool = DevicePool(2 * 16384, loader=Loader(method="pread"))
    with pytest.raises(PoolFullError, match="need 65536 bytes"):
        pool.acquire(tmp_path / "a")
    assert check_accounting(pool)["totals"]["free"] == pool.capacity


def test_failed_load_leaves_the_pool_consistent(tmp_path):
    save(state(1), tmp_path / "a")
    data = tmp_path / "a" / "data-00000.bin"
    pool = DevicePool(1 << 20, loader=Loader(method="pread"))
    from tangram.store import Checkpoint

    ckpt = Checkpoint(tmp_path / "a")
    with open(data, "r+b") as fh:
        fh.truncate(data.stat().st_size - 100)  # after the index was read
    with pytest.raises(Exception, match="truncated"):
        pool.acquire(ckpt)
    snap = check_accounting(pool)
    assert snap["totals"]["free"] == pool.capacity and snap["tensors"] == []


def test_concurrent_acquire_release(tmp_path):
    base, variant = family(tmp_path)
    save(state(7), tmp_path / "other")
    pool = DevicePool(1 << 20, loader=Loader(method="pread"))
    wants = {"base": base, "variant": variant, "other": state(7)}

    def work(i: int) -> None:
        name = list(wants)[i % 3]
        b = pool.acquire(tmp_path / name)
        assert_tensors(b, wants[name])
        pool.release(b)

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(work, range(48)))
    snap = check_accounting(pool)
    assert snap["totals"]["active"] == 0
    assert snap["totals"]["retained"] == (4 + 1 + 4) * 16384  # base + variant's one layer + other


def test_capacity_as_bytes_or_fraction_of_total_memory_on_the_cpu():
    from tangram.pool.arena import resolve_capacity
    from tangram.pool.capacity import device_memory

    cpu = torch.device("cpu")
    assert resolve_capacity(1 << 20, cpu) == 1 << 20
    frac = resolve_capacity(0.001, cpu)
    assert 0 < frac <= device_memory(cpu)[0] * 0.001 + 1
    for bad in (0, -5, 1.5, 0.0):
        with pytest.raises(ValueError, match="pool capacity"):
            resolve_capacity(bad, cpu)
    assert DevicePool(0.0005).capacity > 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=5, max_size=40),
       policy=st.sampled_from(list(PoolPolicy)))
def test_random_acquire_release_cycles_keep_accounting(mixed_models, ops, policy):
    """Many mixed-size acquire/release cycles: accounting exact, active never evicted, bytes always right."""
    pool = DevicePool(48 * KB, policy=policy, loader=Loader(method="pread"))
    held: dict[int, list] = {}
    for model, hold in ops:
        try:
            b = pool.acquire(mixed_models[model][0])
        except PoolFullError:
            assert sum(t["bytes"] for t in pool.snapshot()["tensors"] if t["state"] == "active") > 0
            continue
        assert_tensors(b, mixed_models[model][1])
        for bs in held.values():  # nothing active was touched
            for prev in bs:
                assert_tensors(prev, mixed_models[prev.model_index][1])
        b.model_index = model
        if hold and len(held) < 2:
            held.setdefault(model, []).append(b)
        else:
            pool.release(b)
        snap = check_accounting(pool)
        assert 0.0 <= snap["fragmentation"] <= 1.0
    for bs in held.values():
        for b in bs:
            pool.release(b)
    assert check_accounting(pool)["totals"]["active"] == 0


@pytest.fixture(scope="module")
def mixed_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    out = []
    for i in range(6):
        st_ = state(40 + i, n=1 + i % 3, elems=1024 * (1 + i % 4))
        save(st_, root / f"m{i}")
        out.append((root / f"m{i}", st_))
    return out


def test_failed_load_unpins_the_shared_tensors_it_reused(tmp_path):
    base, variant = family(tmp_path)
    pool = DevicePool(1 << 20, loader=Loader(method="pread"))
    b = pool.acquire(tmp_path / "base")
    from tangram.store import Checkpoint

    ckpt = Checkpoint(tmp_path / "variant")
    data = tmp_path / "variant" / "data-00000.bin"
    with open(data, "r+b") as fh:
        fh.truncate(data.stat().st_size - 100)  # the variant's own layer is the last tensor
    with pytest.raises(Exception, match="truncated"):
        pool.acquire(ckpt, model="variant")
    pool.release(b)
    snap = check_accounting(pool)
    assert snap["totals"]["active"] == 0  # the variant's failed acquire left no reference behind
    assert snap["totals"]["retained"] == 4 * 16384
    assert_tensors(pool.acquire(tmp_path / "base"), base)


def test_kv_blocks_evict_retained_lowest_gain_first_then_back_pressure(tmp_path):
    save(state(1), tmp_path / "hot")
    save(state(2), tmp_path / "cold")
    pool = DevicePool(9 * 16384, loader=Loader(method="pread"), clock=lambda: 0.0)
    for _ in range(5):  # "hot" is requested often, "cold" once
        pool.release(pool.acquire(tmp_path / "hot", model="hot"))
    pool.release(pool.acquire(tmp_path / "cold", model="cold"))
    assert check_accounting(pool)["totals"]["retained"] == 8 * 16384
    region = pool.kv_region(16384, torch.uint8)
    blocks = [region.allocate(1) for _ in range(2)]  # the 1 free unit, then one eviction
    assert None not in blocks
    snap = check_accounting(pool)
    assert snap["kv_bytes"] == 2 * 16384 and snap["totals"]["active"] == 2 * 16384
    by_model = {m: sum(1 for t in snap["tensors"] if t["models"] == [m]) for m in ("hot", "cold")}
    assert by_model == {"hot": 4, "cold": 3}  # the victim was the rarely used model's tensor
    b = pool.acquire(tmp_path / "hot", model="hot")  # still a pool hit
    assert b.bytes_loaded == 0
    more = []
    while (got := region.allocate(1)) is not None:  # only active bytes (hot's tensors, KV) remain: back-pressure
        more.append(got)
    assert len(more) == 3  # cold's 3 retained tensors were evicted for KV, hot's active ones were not
    assert_tensors(b, state(1))
    for kv in blocks + more:
        region.free(kv)
    region.close()
    region.close()  # idempotent
    pool.release(b)
    snap = check_accounting(pool)
    assert snap["kv_bytes"] == 0 and snap["totals"]["active"] == 0


def test_kv_block_bytes_are_writable_and_isolated(tmp_path):
    save(state(3), tmp_path / "m")
    pool = DevicePool(1 << 20, loader=Loader(method="pread"))
    b = pool.acquire(tmp_path / "m")
    region = pool.kv_region(5000, torch.uint8)
    kv = [region.elements[o:o + 5000] for o in region.allocate(3)]
    for i, k in enumerate(kv):
        assert k.numel() == 5000 and k.data_ptr() % 4096 == 0
        k.fill_(i + 1)
    assert [int(k[0]) for k in kv] == [1, 2, 3]
    assert_tensors(b, state(3))


def test_a_pool_that_does_not_retain_frees_released_tensors(tmp_path):
    from tangram.store import save

    state = {"a": torch.ones(1000), "b": torch.zeros(3000)}
    save(state, tmp_path / "m")
    pool = DevicePool(1 << 20, retain=False)
    first = pool.acquire(tmp_path / "m")
    twin = pool.acquire(tmp_path / "m")  # shared while both are active
    assert twin.bytes_loaded == 0
    pool.release(first)
    assert pool.snapshot()["totals"]["active"] > 0
    pool.release(twin)
    snap = pool.snapshot()
    assert snap["totals"]["active"] == 0 and snap["totals"]["retained"] == 0
    assert pool.acquire(tmp_path / "m").bytes_loaded == first.bytes_loaded  # loaded again


def test_a_pool_that_does_not_share_gives_each_checkpoint_its_own_copy(tmp_path):
    base, variant = family(tmp_path)
    pool = DevicePool(1 << 20, share=False, loader=Loader(method="pread"))
    a = pool.acquire(tmp_path / "base")
    b = pool.acquire(tmp_path / "variant")  # three of its four tensors equal base's: loaded anyway
    assert b.bytes_loaded == 4 * 16384 and b.bytes_reused == 0
    assert b.tensors["layer0.weight"].data_ptr() != a.tensors["layer0.weight"].data_ptr()
    assert_tensors(a, base)
    assert_tensors(b, variant)
    assert check_accounting(pool)["totals"]["active"] == 8 * 16384
    twin = pool.acquire(tmp_path / "base")  # the same checkpoint still shares
    assert twin.bytes_loaded == 0
    assert pool.resident_bytes(pool_index(tmp_path / "variant")) == 4 * 16384
    for x in (a, b, twin):
        pool.release(x)
    assert pool.acquire(tmp_path / "variant").bytes_loaded == 0  # retained, for its own checkpoint


def pool_index(path):
    from tangram.store import read_index

    return read_index(path)


def test_exclusive_bytes_counts_only_what_no_other_binding_holds(tmp_path):
    family(tmp_path)
    pool = DevicePool(1 << 20, loader=Loader(method="pread"))
    base = pool.acquire(tmp_path / "base")
    assert pool.exclusive_bytes(base) == 4 * 16384
    variant = pool.acquire(tmp_path / "variant")  # shares three of base's four tensors
    assert pool.exclusive_bytes(base) == pool.exclusive_bytes(variant) == 16384
    pool.release(variant)
    assert pool.exclusive_bytes(base) == 4 * 16384 and pool.exclusive_bytes(variant) == 0


def test_a_failed_load_keeps_what_it_landed_whole_and_a_retry_loads_the_rest(tmp_path):
    """Landed tensors may already be in use by another binding sharing them: a failure must not free them."""
    base = state(1)
    save(base, tmp_path / "a")

    class FailsAfterTwo(Loader):  # the first load only: the retry reads normally
        armed = True

        def load_into(self, ckpt, dests, *, landed=None, **kw):
            if not self.armed:
                return super().load_into(ckpt, dests, landed=landed, **kw)
            self.armed = False
            count = []

            def failing(name: str) -> None:
                if len(count) == 2:
                    raise OSError("disk went away")
                count.append(name)
                landed(name)

            return super().load_into(ckpt, dests, landed=failing, **kw)

    pool = DevicePool(1 << 20, loader=FailsAfterTwo(method="pread", threads=1))
    order = [[f"layer{i}.weight"] for i in range(4)]
    with pytest.raises(OSError, match="disk went away"):
        pool.acquire(tmp_path / "a", order=order)
    snap = check_accounting(pool)
    assert snap["totals"]["active"] == 0 and snap["totals"]["retained"] == 2 * 16384  # the two that landed
    b = pool.acquire(tmp_path / "a")
    assert b.bytes_reused == 2 * 16384 and b.bytes_loaded == 2 * 16384
    assert_tensors(b, base)


def test_a_shared_arena_with_small_pages_reads_direct_through_the_bounce(tmp_path, monkeypatch):
    import os

    from tangram.pool import PoolConfig
    from tangram.store import io

    base, _ = family(tmp_path)
    if not hasattr(os, "O_DIRECT") or not io.odirect_supported(tmp_path / "base" / "data-00000.bin"):
        pytest.skip("no O_DIRECT here")
    monkeypatch.setattr(io, "direct_reads_land_fast", lambda shared: not shared)
    calls: list[bool] = []
    real = io.read_direct
    monkeypatch.setattr(io, "read_direct", lambda *a, **k: (calls.append(k.get("through_bounce")), real(*a, **k))[1])
    for shared in (True, False):
        calls.clear()
        pool = DevicePool(1 << 20, "cpu", PoolConfig(shared=shared), loader=Loader(method="odirect"))
        assert pool.arena.direct_reads_fast is not shared
        io.evict_from_page_cache(tmp_path / "base" / "data-00000.bin")
        b = pool.acquire(tmp_path / "base")
        b.wait_loaded()
        assert_tensors(b, base)
        assert calls and set(calls) == {shared}  # shared 4 KiB pages: every direct read through the bounce
