"""Inference engine: model skeletons bound to loaded (later: pooled) weights."""
