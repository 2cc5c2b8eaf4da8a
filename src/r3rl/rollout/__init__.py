"""Rollout: the embedded engine (continuous batching, routing capture), its request types, the rollout backends,
server and client."""

from r3rl.rollout.backend import EngineBackend, HTTPBackend, RolloutBackend
from r3rl.rollout.engine import EngineConfig, RolloutEngine
from r3rl.rollout.sampling import EngineOutput, EngineRequest, SamplingParams

__all__ = [
    "EngineBackend",
    "EngineConfig",
    "EngineOutput",
    "EngineRequest",
    "HTTPBackend",
    "RolloutBackend",
    "RolloutEngine",
    "SamplingParams",
]
