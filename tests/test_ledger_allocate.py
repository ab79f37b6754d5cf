"""The placement rule (`tangram.pool.ledger.allocate`, `place_each`) on hand-made ledgers: the free-range fast path
picks what the full window search picks, and the arena is described only when the free ranges do not settle it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tangram.pool.ledger import Ledger, LedgerFull, allocate, place_each
from tangram.pool.policy import Extent, PoolPolicy, State, find_window


def arena(specs: list[tuple[int, str]]) -> tuple[Ledger, dict[str, float]]:
    """A ledger from (size, kind) in offset order, kind "free", "active" or "retained"; gains of retained keys."""
    ledger, gains, pos = Ledger(sum(s for s, _ in specs)), {}, 0
    for i, (size, kind) in enumerate(specs):
        if kind != "free":
            ledger.place(pos, size, f"{kind}{i}")
            if kind == "retained":
                gains[f"{kind}{i}"] = float((i * 7) % 5)
        pos += size
    return ledger, gains


class Describer:
    """`extents()` of a ledger as a pool describes it, counting its calls."""

    def __init__(self, ledger: Ledger, gains: dict[str, float]) -> None:
        self.ledger, self.gains, self.calls = ledger, gains, 0

    def __call__(self) -> list[Extent]:
        self.calls += 1
        return self.ledger.extents(lambda p: Extent(p.offset, p.size, State.RETAINED, p.key, self.gains[p.key])
                                   if p.key in self.gains else Extent(p.offset, p.size, State.ACTIVE, p.key))


def evictor(ledger: Ledger, gains: dict[str, float], log: list[str]):
    def evict(key: str) -> bool:
        off = next(p.offset for p in ledger.blocks() if p.key == key)
        ledger.free(off)
        gains.pop(key)
        log.append(key)
        return True
    return evict


KINDS = st.sampled_from(["free", "active", "retained"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), KINDS), min_size=1, max_size=14),
       st.lists(st.integers(1, 30), min_size=1, max_size=4))
def test_the_free_range_fast_path_places_where_the_window_search_would(specs, wants):
    ledger, gains = arena(specs)
    want = find_window(Describer(ledger, gains)(), sum(wants), lambda e: e.gain)
    described = Describer(ledger, gains)
    log: list[str] = []
    sizes = [(f"new{i}", s) for i, s in enumerate(wants)]
    try:
        placed = allocate(ledger, sizes, described, PoolPolicy.TANGRAM, evictor(ledger, gains, log))
    except LedgerFull:  # no window and no first-fit room
        assert want is None
        return
    if want is not None:
        assert min(p.offset for p in placed.values()) == want.offset  # the same window, fast path or not
        assert len(log) == len(want.evict)
    if described.calls == 0:
        assert log == []  # the fast path evicts nothing
    offsets = sorted((p.offset, p.offset + p.size) for p in ledger.blocks())
    assert all(a[1] <= b[0] for a, b in zip(offsets, offsets[1:]))  # nothing overlaps


def test_a_pool_with_room_is_never_described():
    ledger, gains = arena([(10, "active"), (20, "retained"), (60, "free"), (10, "retained")])
    described = Describer(ledger, gains)
    placed = allocate(ledger, [("a", 30), ("b", 15)], described, PoolPolicy.TANGRAM, evictor(ledger, gains, []))
    assert described.calls == 0 and [placed[k].offset for k in ("a", "b")] == [30, 60]
    for i, policy in enumerate((PoolPolicy.LRU, PoolPolicy.LFU)):
        placed = place_each(ledger, [(f"c{i}", 7)], described, policy, evictor(ledger, gains, []))
        assert described.calls == 0 and placed[f"c{i}"].offset == 75 + 7 * i


def test_place_each_undoes_its_first_pass_and_evicts_from_the_arena_as_it_was():
    ledger, gains = arena([(10, "retained"), (8, "free"), (10, "retained"), (10, "active")])
    described, log = Describer(ledger, gains), []
    placed = place_each(ledger, [("a", 8), ("b", 6)], described, PoolPolicy.LRU, evictor(ledger, gains, log))
    assert described.calls == 1  # "a" fitted at 10, "b" did not: undone, then described as before the call
    # the second pass places "a" where the first did and evicts the first victim for "b"
    assert log == ["retained0"] and (placed["a"].offset, placed["b"].offset) == (10, 0)
    assert ledger.capacity - ledger.used == 8 + 10 - 14 and "retained2" in gains  # one victim was enough
