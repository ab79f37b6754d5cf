"""Serving rules the replays use; they live in `tangram.control.autoscale` (re-exported here)."""

from tangram.control.autoscale import idle_victim

__all__ = ["idle_victim"]
