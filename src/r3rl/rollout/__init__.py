"""Rollout: the embedded engine (continuous batching, routing capture), its request types, server and client."""

from r3rl.rollout.engine import EngineConfig, RolloutEngine
from r3rl.rollout.sampling import EngineOutput, EngineRequest, SamplingParams

__all__ = [
    "EngineConfig",
    "EngineOutput",
    "EngineRequest",
    "RolloutEngine",
    "SamplingParams",
]
