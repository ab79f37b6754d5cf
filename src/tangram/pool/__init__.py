"""Device memory pool: one arena per device, content-addressed tensor sharing, retention and eviction."""

from tangram.pool.policy import Extent, Policy, State, find_window, fragmentation, retention_gain
from tangram.pool.pool import Binding, DevicePool, KVBlock, PoolFullError

__all__ = ["Binding", "DevicePool", "Extent", "KVBlock", "Policy", "PoolFullError", "State", "find_window",
           "fragmentation", "retention_gain"]
