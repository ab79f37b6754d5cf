"""ElasticKV: the KV cache in fixed-size blocks carved from the device pool."""

from tangram.kv.allocator import KVAllocator, KVMode
from tangram.kv.paged_cache import PagedCache, SeqSlot
from tangram.kv.spec import KVSpec

__all__ = ["KVAllocator", "KVMode", "KVSpec", "PagedCache", "SeqSlot"]
