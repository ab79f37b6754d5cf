"""Block tables of an engine's sequences over its KV allocator: grow them, free them.

A block is an element offset into the KV region (`KVAllocator`); a sequence's
table is `request.blocks`, in token order. Growing takes blocks all or none
(the region's free list makes that O(1) per block once blocks have come
back); freeing returns them at once. The sequences of one request share
the blocks its prompt filled (reference counts): a block goes back to the
allocator when its last holder frees it. Nothing writes a shared block: each
sequence writes only positions past the prompt, and the prompt's partly
filled last block is copied for each other sequence at the fork
(copy-on-write, done eagerly since their first decode writes it).
"""

from __future__ import annotations

from tangram.engine.request import Request
from tangram.engine.step_policy import blocks_short
from tangram.kv import KVAllocator


class BlockManager:
    """Grows and frees the block tables of one engine's requests. Used on the engine thread only."""

    def __init__(self, kv: KVAllocator) -> None:
        self.kv = kv
        self.block_tokens = kv.spec.block_tokens
        self.holders: dict[int, int] = {}  # blocks held by more than one sequence -> how many hold them

    def grow(self, req: Request, tokens: int) -> bool:
        """Make `req`'s table hold `tokens` tokens; False (nothing taken) when the pool has no room now."""
        short = blocks_short(0, len(req.blocks), self.block_tokens, tokens)
        if short == 0:
            return True
        got = self.kv.allocate(short)
        if got is None:
            return False
        req.blocks.extend(got)
        return True

    def fork(self, parent: Request, seq: Request) -> bool:
        """Give `seq` (no blocks yet) `parent`'s first `parent.cached` tokens of KV: its full blocks shared, its
        partly filled last block copied; False (nothing taken) when the pool has no block for the copy."""
        full, part = divmod(parent.cached, self.block_tokens)
        shared = parent.blocks[:full]
        copy: list[int] = []
        if part:
            got = self.kv.allocate(1)
            if got is None:
                return False
            self.kv.block_view(got[0]).copy_(self.kv.block_view(parent.blocks[full]))
            copy = got
        for b in shared:
            self.holders[b] = self.holders.get(b, 1) + 1
        seq.blocks = shared + copy
        return True

    def free(self, req: Request) -> None:
        """Give all of `req`'s blocks back (a finished, aborted or preempted request); a shared block goes back
        when its last holder frees it."""
        blocks, req.blocks = req.blocks, []
        if self.holders:
            last = []
            for b in blocks:
                held = self.holders.get(b)
                if held is None:
                    last.append(b)
                elif held == 2:
                    del self.holders[b]
                else:
                    self.holders[b] = held - 1
            blocks = last
        self.kv.free(blocks)
