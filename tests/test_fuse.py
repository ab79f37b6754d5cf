"""Sibling projections fused into one packed matmul: same outputs as each module's own linear, whatever the
call order or input; groups only where members agree; an evicted or unpacked group runs the plain linears."""

from __future__ import annotations

import pytest
import torch

from conftest import engine_checkpoint, engine_model, reference_greedy
from tangram.engine import EngineConfig, Instance, SamplingParams
from tangram.engine.fuse import FusedPart, groups
from tangram.engine.prepack import PackedCache, PackedLinear, available, packable, prepack, unpack
from tangram.pool import DevicePool

pytestmark = pytest.mark.skipif(not available("cpu"), reason="this PyTorch has no oneDNN")


class Attn(torch.nn.Module):
    """Three sibling projections (q wider than k/v, as with grouped-query attention) and an output one."""

    def __init__(self, bias: bool, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = torch.nn.Linear(16, 24, bias=bias).to(dtype)
        self.k_proj = torch.nn.Linear(16, 8, bias=bias).to(dtype)
        self.v_proj = torch.nn.Linear(16, 8, bias=bias).to(dtype)
        self.o_proj = torch.nn.Linear(24, 16, bias=False).to(dtype)


def idents(model: torch.nn.Module) -> dict[int, str]:
    return {p.data_ptr(): name for name, p in model.named_parameters() if name.endswith("weight")}


def plain(lin: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, lin.weight, lin.bias)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_members_compute_what_each_plain_linear_does_in_any_order(bias, dtype):
    m = Attn(bias, dtype)
    cache = PackedCache(1 << 30)
    held = prepack(m, idents(m), hint=4, cache=cache)
    if dtype not in packable():  # a CPU whose oneDNN has no bf16 path (AVX2 only): every linear stays plain
        assert held == [] and not any("forward" in x.__dict__ for x in m.modules())
        return
    assert held == ["fused:q_proj.weight+k_proj.weight+v_proj.weight", "o_proj.weight"]
    assert all(isinstance(x.__dict__["forward"], FusedPart) for x in (m.q_proj, m.k_proj, m.v_proj))
    assert isinstance(m.o_proj.__dict__["forward"], PackedLinear)
    tol = 1e-5 if dtype is torch.float32 else 2e-2
    x = torch.randn(1, 5, 16, dtype=dtype)
    y = torch.randn(1, 5, 16, dtype=dtype)
    for order in (("q", "k", "v"), ("v", "q", "k")):
        for name in order:
            lin = getattr(m, f"{name}_proj")
            torch.testing.assert_close(lin(x), plain(lin, x), rtol=tol, atol=tol)
    # siblings reading different inputs (k of another tensor in between) each get their own input's output
    q, k, v = m.q_proj(x), m.k_proj(y), m.v_proj(x)
    torch.testing.assert_close(q, plain(m.q_proj, x), rtol=tol, atol=tol)
    torch.testing.assert_close(k, plain(m.k_proj, y), rtol=tol, atol=tol)
    torch.testing.assert_close(v, plain(m.v_proj, x), rtol=tol, atol=tol)
    unpack(m)
    assert not any("forward" in x.__dict__ for x in m.modules())
    assert torch.equal(m.k_proj(x), plain(m.k_proj, x))


def test_members_that_disagree_are_not_grouped():
    m = Attn(False)
    m.v_proj = torch.nn.Linear(16, 8, bias=True)  # one member with a bias, the others without
    assert groups(m, idents(m), packable()) == []
    m = Attn(False)
    ids = idents(m)
    ids.pop(m.k_proj.weight.data_ptr())  # a weight without an identity: not pool-held, never packed
    assert groups(m, ids, packable()) == []
    half = Attn(False, torch.float16)  # a dtype oneDNN does not pack
    assert groups(half, idents(half), packable()) == []
    assert len(groups(Attn(False), idents(Attn(False)), packable())) == 0  # identities of other tensors
    m = Attn(False)
    assert len(groups(m, idents(m), packable())) == 1


def test_an_evicted_group_runs_each_plain_linear():
    m = Attn(True)
    cache = PackedCache(limit_bytes=0)
    held = prepack(m, idents(m), hint=2, cache=cache)
    cache.release(held)
    x = torch.randn(3, 16)
    for lin in (m.q_proj, m.k_proj, m.v_proj):
        assert torch.equal(lin(x), plain(lin, x))


def test_unfused_prepack_packs_each_member_alone():
    m = Attn(False)
    held = prepack(m, idents(m), hint=2, cache=PackedCache(1 << 30), fuse=False)
    assert sorted(held) == sorted(idents(m).values())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_an_instance_fuses_attention_and_mlp_projections_and_keeps_greedy_output(tmp_path, arch):
    model = engine_model(arch)
    ref = reference_greedy(model, [5, 17, 33, 9], 10)
    with Instance(engine_checkpoint(model, tmp_path), DevicePool(64 << 20), EngineConfig(block_tokens=4)) as inst:
        fused = [h for h in inst.packed if h.startswith("fused:")]
        assert len(fused) == 2 * 2  # q/k/v and gate/up of each of the two layers
        out = inst.engine.generate([[5, 17, 33, 9]], SamplingParams(max_tokens=10, ignore_eos=True))
        assert out[0].output_ids == ref




def test_two_threads_sharing_one_skeleton_each_get_their_own_inputs_outputs():
    """Instances of one checkpoint on one pool share a skeleton and step on their own threads: a member must
    never return the slice of another thread's input (a 2-instance replay failed a step with a shape error).
    The interleaving is forced: thread A stops right before it reads the group's output for its k_proj, and
    thread B runs a whole q_proj on another input meanwhile."""
    import linecache
    import sys
    import threading

    m = Attn(True)
    prepack(m, idents(m), hint=4, cache=PackedCache(1 << 30))
    xa, xb = torch.randn(1, 3, 16), torch.randn(1, 5, 16)
    paused, resume = threading.Event(), threading.Event()
    got: dict[str, object] = {}

    def tracer(frame, event, arg):
        if frame.f_code.co_name != "run" or not frame.f_code.co_filename.endswith("fuse.py"):
            return None

        def local(frame, event, arg):
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            if event == "line" and frame.f_locals.get("i") == 1 and line.startswith("out = "):
                paused.set()
                resume.wait(10)
            return local
        return local

    def thread_a() -> None:
        m.q_proj(xa)
        sys.settrace(tracer)
        try:
            got["k"] = m.k_proj(xa)
        except Exception as exc:  # noqa: BLE001 - the other thread's state cleared under it
            got["k"] = exc
        finally:
            sys.settrace(None)

    a = threading.Thread(target=thread_a)
    a.start()
    assert paused.wait(10)
    qb = m.q_proj(xb)  # thread B (this one), while A is inside its k_proj
    resume.set()
    a.join(10)
    torch.testing.assert_close(qb, plain(m.q_proj, xb), rtol=1e-5, atol=1e-5)
    assert isinstance(got["k"], torch.Tensor), got["k"]
    torch.testing.assert_close(got["k"], plain(m.k_proj, xa), rtol=1e-5, atol=1e-5)
