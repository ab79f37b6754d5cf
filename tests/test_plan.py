"""Read planning (plan.py): pure tests with hand-made pieces."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tangram.store.format import ALIGNMENT
from tangram.store.plan import Piece, ReadRun, plan_reads

A = ALIGNMENT


def piece(name, offset, nbytes, file=0):
    return Piece(name, file, offset, nbytes, torch.zeros(nbytes, dtype=torch.uint8))


def shape_of(run: ReadRun):
    """(length, piece name or None) per segment."""
    return [(s.length, s.piece.name if s.piece else None) for s in run.segments]


def execute(runs, files: dict[int, torch.Tensor]) -> None:
    """Carry out a plan against in-memory 'files' the way the loader does."""
    for run in runs:
        data = files[run.file][run.offset : run.offset + run.length]
        assert data.numel() == run.length
        pos = 0
        for seg in run.segments:
            if seg.dest is not None:
                seg.dest[seg.dest_start : seg.dest_start + seg.length] = data[pos : pos + seg.length]
            pos += seg.length


def test_adjacent_pieces_coalesce_into_one_run():
    pieces = [piece("c", 2 * A, A), piece("a", 0, 100), piece("b", A, 200)]  # unordered on purpose
    runs = plan_reads(pieces)
    assert len(runs) == 1
    run = runs[0]
    assert (run.file, run.offset) == (0, 0)
    assert shape_of(run) == [(100, "a"), (A - 100, None), (200, "b"), (A - 200, None), (A, "c")]
    assert run.length == 3 * A
    assert run.payload == 100 + 200 + A
    # padding segments go to scratch
    assert [s.dest is None for s in run.segments] == [False, True, False, True, False]


def test_split_at_chunk_bytes_on_aligned_offsets():
    p = piece("big", 3 * A, 10_000)
    runs = plan_reads([p], chunk_bytes=A)
    assert [(r.offset, r.length) for r in runs] == [(3 * A, A), (4 * A, A), (5 * A, 10_000 - 2 * A)]
    assert [r.segments[0].dest_start for r in runs] == [0, A, 2 * A]
    assert all(r.segments[0].dest is p.dest and r.segments[0].piece is p for r in runs)
    assert sum(r.payload for r in runs) == 10_000


def test_chunks_cut_across_pieces_and_padding():
    runs = plan_reads([piece("a", 0, 5000), piece("b", 2 * A, 3000)], chunk_bytes=2 * A)
    assert [(r.offset, r.length) for r in runs] == [(0, 2 * A), (2 * A, 3000)]
    assert shape_of(runs[0]) == [(5000, "a"), (2 * A - 5000, None)]
    assert shape_of(runs[1]) == [(3000, "b")]
    runs = plan_reads([piece("a", 0, 5000), piece("b", 2 * A, 3000)], chunk_bytes=A)
    assert [(r.offset, r.length) for r in runs] == [(0, A), (A, A), (2 * A, 3000)]
    assert shape_of(runs[1]) == [(5000 - A, "a"), (2 * A - 5000, None)]
    assert runs[1].segments[0].dest_start == A
    assert all(r.offset % A == 0 for r in runs)


def test_gap_larger_than_max_gap_starts_new_run():
    pieces = [piece("a", 0, 100), piece("b", 2 * A, 100)]  # gap 2A - 100
    assert len(plan_reads(pieces, max_gap=2 * A - 101)) == 2
    runs = plan_reads(pieces, max_gap=2 * A - 100)  # the limit itself still coalesces
    assert len(runs) == 1 and runs[0].length == 2 * A + 100
    split = plan_reads(pieces, max_gap=0)
    assert [(r.offset, r.length, r.payload) for r in split] == [(0, 100, 100), (2 * A, 100, 100)]


def test_different_files_never_share_a_run():
    pieces = [piece("a0", 0, A, file=0), piece("b0", 0, 100, file=1), piece("a1", A, 100, file=0),
              piece("b1", A, 100, file=1)]
    runs = plan_reads(pieces)
    assert [(r.file, r.offset, r.length) for r in runs] == [(0, 0, A + 100), (1, 0, A + 100)]
    for r in runs:
        assert {s.piece.file for s in r.segments if s.piece} == {r.file}


@pytest.mark.parametrize("max_segments", [3, 4, 5, 7])
def test_max_segments_respected(max_segments):
    pieces = [piece(f"p{i}", i * A, 100 + i) for i in range(20)]
    runs = plan_reads(pieces, max_segments=max_segments)
    assert len(runs) > 1
    assert all(len(r.segments) <= max_segments for r in runs)
    assert all(r.offset % A == 0 for r in runs)
    assert sum(r.payload for r in runs) == sum(p.nbytes for p in pieces)
    files = {0: torch.randint(0, 256, (21 * A,), dtype=torch.uint8)}
    execute(runs, files)
    for p in pieces:
        assert torch.equal(p.dest, files[0][p.offset : p.offset + p.nbytes]), p.name


def test_empty_pieces_are_skipped_and_nothing_planned_for_nothing():
    assert plan_reads([]) == []
    assert plan_reads([piece("e", 0, 0)]) == []
    runs = plan_reads([piece("e", A, 0), piece("x", 0, 10)])
    assert [shape_of(r) for r in runs] == [[(10, "x")]]


def test_overlapping_pieces_read_separately():
    """Two destinations for one stored tensor (e.g. an alias loaded twice)."""
    pieces = [piece("a", 0, 300), piece("a-again", 0, 300)]
    runs = plan_reads(pieces)
    assert len(runs) == 2 and all(r.offset == 0 and r.length == 300 for r in runs)


def test_invalid_requests():
    with pytest.raises(ValueError, match="chunk_bytes"):
        plan_reads([piece("a", 0, 10)], chunk_bytes=A + 1)
    with pytest.raises(ValueError, match="chunk_bytes"):
        plan_reads([piece("a", 0, 10)], chunk_bytes=0)
    with pytest.raises(ValueError, match="unaligned offset 100"):
        plan_reads([piece("a", 100, 10)])
    with pytest.raises(ValueError, match="holds 9 bytes, needs 10"):
        plan_reads([Piece("a", 0, 0, 10, torch.zeros(9, dtype=torch.uint8))])


@st.composite
def layouts(draw):
    pieces = []
    for file in range(draw(st.integers(1, 3))):
        block = 0
        for i in range(draw(st.integers(0, 8))):
            block += draw(st.integers(0, 20))  # gap in blocks before this piece
            nbytes = draw(st.integers(0, 5 * A))
            pieces.append(piece(f"f{file}.{i}", block * A, nbytes, file=file))
            block += -(-nbytes // A) if nbytes else 0
    return pieces


@settings(max_examples=120, deadline=None)
@given(
    pieces=layouts(),
    chunk_blocks=st.integers(1, 6),
    max_gap=st.sampled_from([0, 100, A, 8 * A, 64 << 10]),
    max_segments=st.integers(3, 12),
    shuffle=st.randoms(use_true_random=False),
    piece_cuts=st.booleans(),
)
def test_plan_property(pieces, chunk_blocks, max_gap, max_segments, shuffle, piece_cuts):
    order = list(pieces)
    shuffle.shuffle(order)
    chunk = chunk_blocks * A
    runs = plan_reads(order, chunk_bytes=chunk, max_gap=max_gap, max_segments=max_segments, piece_cuts=piece_cuts)
    for r in runs:
        assert r.offset % A == 0
        assert 0 < r.length <= chunk
        assert len(r.segments) <= max_segments
        assert all(s.length > 0 for s in r.segments)
        assert all(s.piece.file == r.file for s in r.segments if s.piece)
        assert r.payload == sum(s.length for s in r.segments if s.dest is not None)
        # a padding segment never exceeds max_gap
        assert all(s.length <= max_gap for s in r.segments if s.dest is None)
    assert sum(r.payload for r in runs) == sum(p.nbytes for p in pieces)
    # runs of one file never overlap (the pieces do not)
    by_file: dict[int, list[tuple[int, int]]] = {}
    for r in runs:
        by_file.setdefault(r.file, []).append((r.offset, r.offset + r.length))
    for spans in by_file.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    size = max([p.offset + p.nbytes for p in pieces] + [0]) + A
    g = torch.Generator().manual_seed(1)
    files = {f: torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g) for f in range(3)}
    execute(runs, files)
    for p in pieces:
        assert torch.equal(p.dest, files[p.file][p.offset : p.offset + p.nbytes]), p.name
