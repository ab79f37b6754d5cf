"""Device memory pool: one arena per device, content-addressed tensor sharing, retention and eviction."""

from tangram.pool.config import PoolConfig
from tangram.pool.kv_region import KVRegion
from tangram.pool.loading import LoadFailed, LoadHandle
from tangram.pool.policy import Extent, PoolPolicy, State, find_window, fragmentation, retention_gain
from tangram.pool.pool import Binding, DevicePool, Eviction, PoolFullError
from tangram.pool.poolmap import ArenaMap, Segment, merge_extents

__all__ = ["ArenaMap", "Binding", "DevicePool", "Eviction", "Extent", "KVRegion", "LoadFailed", "LoadHandle",
           "PoolConfig", "PoolFullError", "PoolPolicy", "Segment", "State", "find_window", "fragmentation",
           "merge_extents", "retention_gain"]
