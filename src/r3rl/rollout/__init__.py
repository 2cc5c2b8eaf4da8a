"""Rollout: the embedded engine (continuous batching, routing capture), its request types, the rollout backends,
server and client."""

from r3rl.rollout.backend import EngineBackend, HTTPBackend, RolloutBackend, drop_stale
from r3rl.rollout.config import EngineConfig, ServerConfig
from r3rl.rollout.engine import RolloutEngine
from r3rl.rollout.fleet import FleetBackend, make_backend
from r3rl.rollout.protocol import EngineOutput, EngineRequest, FinishReason, SamplingParams

__all__ = [
    "EngineBackend",
    "EngineConfig",
    "EngineOutput",
    "EngineRequest",
    "FinishReason",
    "FleetBackend",
    "HTTPBackend",
    "RolloutBackend",
    "RolloutEngine",
    "ServerConfig",
    "SamplingParams",
    "drop_stale",
    "make_backend",
]
