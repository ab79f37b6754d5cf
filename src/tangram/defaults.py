"""Defaults that the product and its simulator must agree on, defined once (below pool/, sim/ and scheduler/).

`RELOAD_BANDWIDTH`: bytes/s at which a retained tensor evicted from a device
pool is assumed to come back (the reload cost in the retention gain,
`tangram.pool.policy.retention_gain`). The real `DevicePool` and the
simulator's `SimPool` both default to it (`PoolConfig.reload_bandwidth`), so
the simulator ranks retained tensors exactly as a worker's pool does; the
scheduler's bandwidth estimator starts from it as its disk prior
(`tangram.scheduler.bandwidth.PRIOR_DISK`). 2e9: docs/design.md's guest-cold
buffered reads on the development VMs (1-3 GB/s).
"""

from __future__ import annotations

RELOAD_BANDWIDTH: float = 2e9
