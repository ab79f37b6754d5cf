"""Block tables of an engine's sequences over its KV allocator: grow them, free them.

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
