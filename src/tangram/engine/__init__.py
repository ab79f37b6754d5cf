"""The inference engine: model skeleton over pooled weights, continuous batching on ElasticKV."""

from tangram.engine.backend import BACKENDS, BackendFactory, EngineBackend, start_backend
from tangram.engine.engine import Engine
from tangram.engine.errors import EngineError, RequestError
from tangram.engine.instance import EngineConfig, Instance
from tangram.engine.request import OutputQueue, RequestOutput
from tangram.engine.sampling import SamplingParams
from tangram.engine.stages import EngineRates, StartCost, Stages, Totals

__all__ = ["BACKENDS", "BackendFactory", "Engine", "EngineBackend", "EngineConfig", "EngineError", "EngineRates", "Instance",
           "OutputQueue", "RequestError", "RequestOutput", "SamplingParams", "StartCost", "Stages", "Totals",
           "start_backend"]
