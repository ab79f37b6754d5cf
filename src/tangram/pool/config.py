"""How a device pool behaves: one typed configuration, fixed at construction (part of `ServeConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tangram.defaults import RELOAD_BANDWIDTH
from tangram.pool.policy import PoolPolicy


class PoolConfig(BaseModel):
    """Placement, retention and loading of every device pool; the default is Tangram's own behaviour.

    `retain=False` frees a model's tensors when its last binding is released (no reuse across instances);
    `share=False` keys tensors per checkpoint, so two models never share one (a conventional engine's copy of
    the weights per instance); `loader="safetensors"` reads each checkpoint's original safetensors files
    (`safetensors_sources`: checkpoint directory -> directory of those files), as a conventional engine does.
    These three are the baselines of bench coldstart.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: PoolPolicy = Field(PoolPolicy.TANGRAM, description="eviction / placement policy")
    retain: bool = Field(True, description="keep released tensors for the next start")
    share: bool = Field(True, description="share tensors across models by content identity")
    loader: Literal["tangram", "safetensors"] = Field("tangram", description="how missing tensors are read")
    safetensors_sources: dict[str, str] = Field(
        default_factory=dict, description="loader=safetensors: checkpoint dir -> its original safetensors dir")
    reload_bandwidth: float = Field(RELOAD_BANDWIDTH, gt=0, description="bytes/s evicted bytes are priced at")
    half_life_s: float = Field(300.0, gt=0, description="half-life of the decayed start rates (retention gain)")
    shared: bool | None = Field(None, description="CPU arena in shared memory that engine processes map (the vLLM "
                                "backend needs it; first writes fault 4 KiB pages). None: on when a deployment of "
                                "the server's config uses the vllm backend")

    @model_validator(mode="after")
    def _sources_go_with_their_loader(self) -> PoolConfig:
        if self.loader == "safetensors" and not self.safetensors_sources:
            raise ValueError("loader 'safetensors' needs safetensors_sources (checkpoint dir -> safetensors dir)")
        if self.loader != "safetensors" and self.safetensors_sources:
            raise ValueError("safetensors_sources are read by loader 'safetensors' only")
        return self
