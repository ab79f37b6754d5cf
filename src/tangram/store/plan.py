"""Read planning: turn the tensors to load into few, large, aligned file reads.

Pure functions, no I/O. Adjacent tensors of one file are coalesced into one
run (the padding between them is read into a scratch area); runs are then cut
into chunks so several reader threads share the work and a CUDA staging buffer
holds one chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tangram.store.format import ALIGNMENT


@dataclass(frozen=True)
class Piece:
    """One stored tensor to read: its bytes in the file and the destination bytes."""

    name: str
    file: int
    offset: int
    nbytes: int
    dest: torch.Tensor  # flat uint8, exactly nbytes long, on the target device
    hash: str | None = None  # the index's content hash: the bytes are checked against it as they land
    blocks: tuple[str, ...] = ()  # or, when the index has them, the hash of each block (checked instead, in parallel)
    block_bytes: int = 0


@dataclass(frozen=True)
class CopyRun:
    """One copy of a host-cache hit: bytes [start, start + length) of `src` to the same bytes of the piece's dest."""

    piece: Piece
    src: torch.Tensor  # flat uint8 host tensor of the piece's bytes (already verified by the cache)
    start: int
    length: int

    @property
    def payload(self) -> int:
        """Bytes that land in the destination."""
        return self.length


@dataclass(frozen=True)
class Segment:
    """A contiguous part of a read: `length` bytes to `dest[dest_start:]`, or to scratch if dest is None."""

    length: int
    dest: torch.Tensor | None = None
    dest_start: int = 0
    piece: Piece | None = None


@dataclass
class ReadRun:
    """One read call: bytes [offset, offset + length) of a file, scattered over segments."""

    file: int
    offset: int
    segments: list[Segment] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Bytes this run reads from the file."""
        return sum(s.length for s in self.segments)

    @property
    def payload(self) -> int:
        """Bytes that land in a destination (the rest is padding)."""
        return sum(s.length for s in self.segments if s.dest is not None)


def plan_reads(
    pieces: list[Piece],
    *,
    chunk_bytes: int = 16 << 20,
    max_gap: int = 64 << 10,
    max_segments: int = 512,
    piece_cuts: bool = False,
) -> list[ReadRun]:
    """Coalesce `pieces` into runs and cut runs into chunks of at most `chunk_bytes`.

    Pieces of one file whose gap is at most `max_gap` share a run. Chunk cuts
    fall on ALIGNMENT boundaries of the file, so every run starts aligned
    (O_DIRECT and mmap need that). A run never has more than `max_segments`
    segments (the iovec limit of preadv is 1024). `piece_cuts`: a piece that
    does not fit in the rest of a chunk starts the next one, so only pieces
    larger than a chunk span chunks, and each chunk after the first of such a
    piece continues it (`task_chains` keeps those on one reader thread).
    """
    if chunk_bytes < ALIGNMENT or chunk_bytes % ALIGNMENT:
        raise ValueError(f"chunk_bytes must be a positive multiple of {ALIGNMENT}")
    runs: list[ReadRun] = []
    ordered = sorted((p for p in pieces if p.nbytes > 0), key=lambda p: (p.file, p.offset))
    current: ReadRun | None = None
    end = 0
    for p in ordered:
        if p.dest.numel() != p.nbytes:
            raise ValueError(f"destination of {p.name!r} holds {p.dest.numel()} bytes, needs {p.nbytes}")
        gap = p.offset - end
        if current is not None and current.file == p.file and 0 <= gap <= max_gap:
            if gap:
                current.segments.append(Segment(gap))
        else:
            if p.offset % ALIGNMENT:
                raise ValueError(f"tensor {p.name!r} starts at unaligned offset {p.offset}")
            current = ReadRun(p.file, p.offset)
            runs.append(current)
        current.segments.append(Segment(p.nbytes, p.dest, 0, p))
        end = p.offset + p.nbytes
    return [chunk for run in runs for chunk in _cut(run, chunk_bytes, max_segments, piece_cuts)]


def plan_copies(hits: list[tuple[Piece, torch.Tensor]], *, chunk_bytes: int = 16 << 20) -> list[CopyRun]:
    """Cut host-cache hits (piece, cached bytes) into copies of at most `chunk_bytes`, so reader threads share them."""
    out: list[CopyRun] = []
    for piece, src in hits:
        if src.numel() != piece.nbytes:
            raise ValueError(f"cached bytes of {piece.name!r}: {src.numel()}, needs {piece.nbytes}")
        out += [CopyRun(piece, src, at, min(chunk_bytes, piece.nbytes - at)) for at in range(0, piece.nbytes, chunk_bytes)]
    return out


def _cut(run: ReadRun, chunk_bytes: int, max_segments: int, piece_cuts: bool = False) -> list[ReadRun]:
    """Split one run into chunks of at most chunk_bytes (cuts on aligned file offsets).

    The current chunk's length and payload are running sums: a run of many small pieces (an adapter's hundreds
    of tensors) would otherwise sum its segments again at every piece."""
    out: list[ReadRun] = []
    cur = ReadRun(run.file, run.offset)
    room = chunk_bytes
    length = payload = 0  # of `cur`
    for seg in run.segments:
        start = 0
        if (piece_cuts and seg.piece is not None and seg.length > room and payload
                and (cur.offset + length) % ALIGNMENT == 0):
            out.append(cur)  # this piece starts the next chunk instead of straddling two
            cur = ReadRun(run.file, cur.offset + length)
            room, length, payload = chunk_bytes, 0, 0
        while start < seg.length:
            take = min(seg.length - start, room)
            if take > 0:
                cur.segments.append(
                    Segment(take, seg.dest, seg.dest_start + start if seg.dest is not None else 0, seg.piece)
                )
                start += take
                room -= take
                length += take
                payload += take if seg.dest is not None else 0
            if room == 0 or len(cur.segments) >= max_segments:
                nxt = cur.offset + length
                if nxt % ALIGNMENT:  # only reachable through max_segments: back off to an aligned cut
                    cur, carry = _split_aligned(cur)
                    out.append(cur)
                    cur = carry
                    length, payload = carry.length, carry.payload
                else:
                    out.append(cur)
                    cur = ReadRun(run.file, nxt)
                    length = payload = 0
                room = chunk_bytes - length
    if cur.segments:
        out.append(cur)
    return out


def _split_aligned(run: ReadRun) -> tuple[ReadRun, ReadRun]:
    """Cut `run` at its last aligned file offset; return (head, tail)."""
    cut = (run.offset + run.length) // ALIGNMENT * ALIGNMENT
    head, tail = ReadRun(run.file, run.offset), ReadRun(run.file, cut)
    pos = run.offset
    for seg in run.segments:
        if pos + seg.length <= cut:
            head.segments.append(seg)
        elif pos >= cut:
            tail.segments.append(seg)
        else:
            k = cut - pos
            head.segments.append(Segment(k, seg.dest, seg.dest_start, seg.piece))
            tail.segments.append(Segment(seg.length - k, seg.dest, seg.dest_start + k if seg.dest is not None else 0, seg.piece))
        pos += seg.length
    if not head.segments:
        raise ValueError("cannot split a run into aligned chunks under the segment limit")
    return head, tail


def continues(run: ReadRun) -> bool:
    """Whether `run` starts in the middle of a piece (its first piece bytes are not that piece's first)."""
    first = next((s for s in run.segments if s.piece is not None), None)
    return first is not None and first is run.segments[0] and first.dest_start > 0


def task_chains(runs: Sequence[ReadRun], max_bytes: int | None = None) -> list[list[ReadRun]]:
    """Consecutive runs grouped so that a run continuing a piece joins the run before it (up to `max_bytes`).

    One reader thread executing a chain in order meets each piece's bytes in
    order, so it hashes them as they land, hot in its cache, without waiting
    for another thread. `max_bytes` bounds a chain, so one huge piece still
    spreads over several threads (its hash then waits at each chain boundary).
    """
    chains: list[list[ReadRun]] = []
    size = 0
    for run in runs:
        if (chains and continues(run) and chains[-1][-1].file == run.file
                and (max_bytes is None or size + run.length <= max_bytes)):
            chains[-1].append(run)
            size += run.length
        else:
            chains.append([run])
            size = run.length
    return chains


def tail(run: ReadRun, skip: int) -> ReadRun:
    """The part of `run` after its first `skip` bytes (skip should be ALIGNMENT-aligned for O_DIRECT)."""
    out = ReadRun(run.file, run.offset + skip)
    pos = 0
    for seg in run.segments:
        end = pos + seg.length
        if end > skip:
            k = max(0, skip - pos)
            out.segments.append(
                Segment(seg.length - k, seg.dest, seg.dest_start + k if seg.dest is not None else 0, seg.piece)
            )
        pos = end
    return out


def ordered_groups(names: Sequence[str], order: Sequence[Sequence[str]] | None) -> list[list[str]]:
    """`names` split into the groups of `order` (those present, in that order), the rest as a last group."""
    if not order:
        return [list(names)] if names else []
    wanted, seen, groups = set(names), set(), []
    for group in order:
        g = [n for n in group if n in wanted and n not in seen]
        seen.update(g)
        if g:
            groups.append(g)
    rest = [n for n in names if n not in seen]
    if rest:
        groups.append(rest)
    return groups
