"""Rollout: the embedded engine (continuous batching, routing capture), its request types, the rollout backends,
server and client."""

from r3rl.rollout.engine.config import EngineConfig, ServerConfig
from r3rl.rollout.engine.engine import RolloutEngine
from r3rl.rollout.engine.messages import EngineOutput, EngineRequest, FinishReason, SamplingParams
from r3rl.rollout.net.backend import EngineBackend, HTTPBackend, RolloutBackend, drop_stale
from r3rl.rollout.net.fleet import FleetBackend, make_backend

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
