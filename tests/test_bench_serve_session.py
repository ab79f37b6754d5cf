"""bench serve's servers of a row: the interleaved play order, the groups, and two servers played in turn."""

from __future__ import annotations

import json

import pytest
from serving import chat_model_dir

from tangram.bench.serve import ServeSizes, client_runs
from tangram.bench.serve_peer import tangram_server
from tangram.bench.serve_session import interleave, measure_group, row_groups


def runs(*specs: tuple[str, int, int]) -> list[dict]:
    return [{"kind": k, "repeat": rep, "n": n} for k, rep, n in specs]


def test_interleave_plays_the_same_run_back_to_back_and_swaps_who_goes_first():
    tangram = runs(("concurrent", 0, 1), ("concurrent", 0, 16), ("structured", 0, 16), ("concurrent", 1, 1),
                   ("burst", 0, 100))
    vllm = runs(("concurrent", 0, 1), ("concurrent", 0, 16), ("concurrent", 1, 1), ("burst", 0, 100))
    order = interleave({"tangram": tangram, "vllm": vllm})
    assert order == [("tangram", 0), ("vllm", 0),  # step 0: tangram first
                     ("vllm", 1), ("tangram", 1),  # step 1: vllm first
                     ("tangram", 2),  # step 2: only tangram has it
                     ("vllm", 2), ("tangram", 3),  # step 3
                     ("tangram", 4), ("vllm", 3)]  # step 4
    assert sorted(order) == sorted([("tangram", i) for i in range(5)] + [("vllm", i) for i in range(4)])


def test_interleave_of_one_system_is_its_own_order():
    rs = client_runs(ServeSizes(repeats=2, burst=10), "default", True, "tangram")
    assert interleave({"tangram": rs}) == [("tangram", i) for i in range(len(rs))]
    assert interleave({}) == []


def test_row_groups_pair_tangram_with_vllm_and_alternate_by_row():
    systems = ["tangram", "vllm", "tangram-vllm"]
    assert row_groups(["float32", "bfloat16", "default"], systems, {}) == [
        ("float32", ("tangram", "vllm")), ("float32", ("tangram-vllm",)),
        ("bfloat16", ("tangram-vllm",)), ("bfloat16", ("tangram", "vllm")),
        ("default", ("tangram", "vllm")), ("default", ("tangram-vllm",))]
    # a default measured as its twin row has no server of its own; Tangram alone without vLLM
    assert row_groups(["bfloat16", "default"], systems, {"tangram": "bfloat16", "vllm": "bfloat16"}) == [
        ("bfloat16", ("tangram", "vllm")), ("bfloat16", ("tangram-vllm",)), ("default", ("tangram-vllm",))]
    assert row_groups(["float32"], ["tangram"], {}) == [("float32", ("tangram",))]


@pytest.mark.slow
def test_two_servers_up_together_are_played_in_turn(tmp_path):
    from tangram.store import convert

    ckpt = tmp_path / "ckpt"
    convert(chat_model_dir(tmp_path / "tiny"), ckpt)
    work = tmp_path / "work"
    # two Tangram servers stand in for the pair (the vLLM one is tests/test_bench_serve_vllm.py's)
    servers = {name: tangram_server(ckpt, "float32", work, 4, label=name) for name in ("tangram", "vllm")}
    sizes = ServeSizes(concurrency=(1, 3), max_tokens=4, repeats=2, burst=0, structured=0)
    plan = {name: client_runs(sizes, "float32", False, name) for name in servers}
    sessions = measure_group(servers, plan, "float32", work, warmup_tokens=2)
    for name, session in sessions.items():
        assert session.error is None and session.start_s > 0
        assert [run for run, _ in session.results] == plan[name]
        assert [res["n"] for _, res in session.results] == [1, 3, 1, 3]
        assert all(q["completion_tokens"] == 4 and q["error"] is None for _, res in session.results
                   for q in res["requests"])
        assert session.facts["warmup"]["completion_tokens"] == 2
    assert sessions["tangram"].facts["served_dtype"] == "float32"  # asked of a Tangram server only
    # one client per step, in the interleaved order; each server's prompts numbered on across its clients
    steps = [("tangram", 0), ("vllm", 0), ("vllm", 2), ("tangram", 2), ("tangram", 5), ("vllm", 5)]
    specs = [json.loads((work / f"client-{name}-float32-{first}.json").read_text()) for name, first in steps]
    assert [s["first_prompt"] for s in specs] == [0, 0, 2, 2, 5, 5]
    assert [s["warmup_tokens"] for s in specs] == [2, 2, 0, 0, 0, 0]
    assert [[r["n"] for r in s["runs"]] for s in specs] == [[1], [1], [3], [3], [1], [1]]
    done = [(work / f"client-{name}-float32-{first}.out.json").stat().st_mtime_ns for name, first in steps]
    assert done == sorted(done)  # played in that order
    assert all(server.proc is None for server in servers.values())  # both stopped
