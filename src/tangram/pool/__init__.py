"""Device memory pool: one arena per device, content-addressed tensor sharing, retention and eviction."""

from tangram.pool.policy import Extent, Policy, State, find_window, fragmentation, retention_gain
from tangram.pool.pool import Binding, DevicePool, Eviction, KVBlock, PoolFullError
from tangram.pool.poolmap import ArenaMap, Segment, merge_extents

__all__ = ["ArenaMap", "Binding", "DevicePool", "Eviction", "Extent", "KVBlock", "Policy", "PoolFullError", "Segment",
           "State", "find_window", "fragmentation", "merge_extents", "retention_gain"]
