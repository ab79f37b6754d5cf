"""Deployments and the serving configuration (`tangram serve --config FILE`, JSON or TOML)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tangram.engine import EngineConfig
from tangram.pool import PoolConfig
from tangram.pool.capacity import HELP as CAPACITY_HELP
from tangram.pool.capacity import PoolCapacity

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")


class Deployment(BaseModel):
    """A model users can call by `name`: where its checkpoint is and how it scales."""

    model_config = ConfigDict(extra="forbid")

    name: str
    checkpoint: str | None = Field(None, description="`demo`, a Tangram checkpoint, or a Hugging Face directory "
                                   "(not for an adapter)")
    adapter: str | None = Field(None, description="a LoRA adapter (PEFT directory or converted adapter) served on "
                                "the instances of the deployment `base`; requests name it in `model`")
    base: str | None = Field(None, description="the base deployment of an adapter")
    keep_alive_s: float = Field(60.0, ge=0, description="idle seconds before an instance scales to zero")
    min_instances: int = Field(0, ge=0, le=64)
    max_instances: int = Field(1, ge=1, le=64)
    target_concurrency: int = Field(8, ge=1, le=4096, description="requests per instance before scaling out")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    backend: Literal["builtin", "vllm"] = Field("builtin", description="the engine backend its instances run on "
                                                "(tangram.engine.backend; vllm: docs/vllm.md)")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError("deployment names are 1-128 letters, digits, '.', '_' or '-', starting alphanumeric")
        return value

    @model_validator(mode="after")
    def _instance_limits(self) -> Deployment:
        if (self.checkpoint is None) == (self.adapter is None):
            raise ValueError("a deployment names either a checkpoint or an adapter (with its base)")
        if (self.adapter is None) != (self.base is None):
            raise ValueError("an adapter deployment names its base deployment (base), and only an adapter does")
        if self.min_instances > self.max_instances:
            raise ValueError(f"min_instances ({self.min_instances}) must not exceed max_instances "
                             f"({self.max_instances})")
        return self


class ServeConfig(BaseModel):
    """Everything `tangram serve` needs."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    admin_token: str | None = None
    api_key: str | None = Field(None, min_length=1, pattern=r"^\S+$",
                                description="bearer key every /v1/* request must send (also $TANGRAM_API_KEY)")
    pool_capacity: PoolCapacity = Field(None, description=f"per device pool: {CAPACITY_HELP}; default (None): "
                                        "$TANGRAM_POOL_CAPACITY, else the rule of tangram.pool.capacity")
    cpu_devices: int = Field(1, ge=1, le=64, description="logical CPU devices (each its own pool) without a GPU")
    host_cache_bytes: int = Field(0, ge=0, description="host DRAM cache tier shared by the workers (0 = off)")
    scheduler: Literal["tangram", "sllm", "least-loaded", "random"] = Field(
        "tangram", description="placement of new instances across devices")
    pool: PoolConfig = Field(default_factory=PoolConfig, description="placement, retention, sharing and loading of "
                             "every device pool (tangram.pool.PoolConfig; default: Tangram's own)")
    migration: bool = Field(False, description="live migration by the controller itself: a start waiting for room "
                            "moves busy instances' requests when sooner than waiting, scale-in consolidates by "
                            "moving requests (docs/migration.md); `tangram migrate` works either way")
    deployments: list[Deployment] = Field(default_factory=list)

    @model_validator(mode="after")
    def _shared_pool_for_vllm(self) -> ServeConfig:
        if self.pool.shared is None:  # vLLM engine processes map the pool's arena
            shared = any(d.backend == "vllm" for d in self.deployments)
            self.pool = self.pool.model_copy(update={"shared": shared})
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> ServeConfig:
        """Read a JSON (.json) or TOML (.toml) file."""
        p = Path(path)
        text = p.read_text()
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
        return cls.model_validate(data)
