"""Rollout: the embedded engine (continuous batching, routing capture), its request types, the rollout backends,
server and client, in three sub-packages whose imports run downward only (tests/test_layout.py checks it):

    net/     `r3rl serve` (server, worker, wire), the client, the backends, the fleet, weight sync by disk or NCCL
    engine/  RolloutEngine (admission and scheduling, step execution, request bookkeeping), its messages and config
    model/   the paged forward of every family, its attention and MoE blocks, the Triton kernels, KV pages

This module re-exports the public names: `from r3rl.rollout import RolloutEngine, SamplingParams, ...`."""

from r3rl.rollout.engine.config import EngineConfig
from r3rl.rollout.engine.engine import RolloutEngine
from r3rl.rollout.engine.messages import EngineOutput, EngineRequest, FinishReason, SamplingParams
from r3rl.rollout.net.backend import EngineBackend, HTTPBackend, RolloutBackend, drop_stale
from r3rl.rollout.net.config import ServerConfig
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
