"""Block tables of an engine's sequences over its KV allocator: grow, free, and where each token's KV lives.

A block is an element offset into the KV region (`KVAllocator`); a sequence's
table is `request.blocks`, in token order. Growing takes blocks all or none
(the region's free list makes that O(1) per block once blocks have come
back); freeing returns them at once.
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

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return self.kv.spec.blocks_for(tokens)

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

    def free(self, req: Request) -> None:
        """Give all of `req`'s blocks back (a finished, aborted or preempted request)."""
        blocks, req.blocks = req.blocks, []
        self.kv.free(blocks)

    def row_offsets(self, req: Request, start: int, stop: int) -> list[int]:
        """Element offset (layer 0) of the KV row of each token position in [start, stop) of `req`."""
        bt, w, blocks = self.block_tokens, self.kv.spec.row_elems, req.blocks
        return [blocks[p // bt] + (p % bt) * w for p in range(start, stop)]
