"""Dataclass configs. Only `cli.py` knows argparse; it maps miles-named flags onto these.

ReplayConfig decides which replay mode runs and whether the correctness check is on:
  --use-rollout-routing-replay   R3: replay the rollout engine's routing (master switch)
  --use-routing-replay           R2: record routing in the old-policy forward, replay it in the update
  --enable-r3-correctness-check  turn on only the check
  --ci-test                      turn on the check plus strict invariants (consumption per layer)
With neither replay mode the check flags have no effect, and one warning says so.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass

__all__ = ["ReplayConfig", "ReplayKind", "CheckRunConfig", "Fault", "RolloutKind"]

logger = logging.getLogger(__name__)


class ReplayKind(enum.Enum):
    NONE = "none"
    R3 = "r3"  # rollout routing replay
    R2 = "r2"  # old-policy routing replay


@dataclass(kw_only=True)
class ReplayConfig:
    use_rollout_routing_replay: bool = False
    """R3: replay the experts the rollout engine chose, in the old-policy forward, the update and its recompute."""
    use_routing_replay: bool = False
    """R2: record routing in the old-policy forward and replay it in the update. R3 wins if both are set."""
    enable_r3_correctness_check: bool = False
    """Compare live top-k with the replayed ids on every replayed router call; log evidence; fail above threshold."""
    ci_test: bool = False
    """CI mode: enables the check and strict invariants (every layer consumed once per forward)."""
    r3_check_threshold: float | None = None
    """Allowed fraction of zero-overlap (token, layer) rows. None: the check resolves it from
    $R3RL_TEST_R3_THRESHOLD, $MILES_TEST_R3_THRESHOLD, else 1e-2 (`r3rl.check.resolve_threshold`)."""

    def __post_init__(self) -> None:
        t = self.r3_check_threshold
        if t is not None and not 0.0 <= t <= 1.0:
            raise ValueError(f"R3 check threshold (--r3-check-threshold) is a fraction of tokens in [0, 1]: got {t}")
        if self.use_rollout_routing_replay and self.use_routing_replay:
            logger.warning("both --use-rollout-routing-replay and --use-routing-replay are set: running R3 (rollout "
                           "routing replay); R2 is subsumed")
        if (self.enable_r3_correctness_check or self.ci_test) and self.kind is ReplayKind.NONE:
            flag = "--enable-r3-correctness-check" if self.enable_r3_correctness_check else "--ci-test"
            logger.warning("%s has no effect: the R3 correctness check needs a replay mode "
                           "(--use-rollout-routing-replay or --use-routing-replay)", flag)

    @property
    def kind(self) -> ReplayKind:
        if self.use_rollout_routing_replay:
            return ReplayKind.R3
        if self.use_routing_replay:
            return ReplayKind.R2
        return ReplayKind.NONE

    @property
    def check_enabled(self) -> bool:
        return (self.enable_r3_correctness_check or self.ci_test) and self.kind is not ReplayKind.NONE

    @property
    def strict(self) -> bool:
        return self.ci_test and self.kind is not ReplayKind.NONE


class RolloutKind(enum.Enum):
    ENGINE = "engine"  # r3rl's rollout engine: its own kernels, static KV cache, continuous batching
    HF = "hf"  # the HF model itself, token by token with a DynamicCache


class Fault(enum.Enum):
    NONE = "none"
    SHIFT = "shift"  # misalign the trace by one token
    PERMUTE_LAYERS = "permute-layers"  # swap the trace's layers


@dataclass(kw_only=True)
class CheckRunConfig:
    """`r3rl check`: the end-to-end R3 regression."""

    replay: ReplayConfig
    model: str | None = None
    """Local HF MoE checkpoint; None makes `preset` on the fly."""
    preset: str = "tiny-qwen3-moe"
    """Preset used when `model` is None."""
    device: str = "cpu"
    dtype: str = "bfloat16"
    """Model precision for rollout and training (bf16: where near-tied router scores flip)."""
    batch_size: int = 8
    """Number of rollouts."""
    prompt_len: int = 16
    response_len: int = 32
    temperature: float = 1.0
    """Rollout sampling temperature (finite, > 0)."""
    seed: int = 0
    rollout: RolloutKind = RolloutKind.ENGINE
    """Who samples the rollouts (see RolloutKind)."""
    report: str | None = None
    """Where to write the JSON report."""
    inject_fault: Fault = Fault.NONE
    """Negative control: corrupt the trace before replay; the check must fail."""
    turns: int = 1
    """Multi-turn: each rollout is an episode of this many responses of `response_len` tokens, with
    `observation_len` environment tokens appended between them (r3rl.episodes, engine rollout); replay and check
    run over whole episodes. 1: single-turn."""
    observation_len: int = 4
    """Tokens the check's environment appends after each non-final response (multi-turn)."""
    rollout_url: str | None = None
    """Sample from this server instead (r3rl serve, SGLang or vLLM; the check's model is synced to it first)."""
    rollout_engine: str = "auto"
    """What `rollout_url` is: auto (ask it), r3rl, sglang or vllm."""
    compile: bool = False
    """Run the training forwards (without replay, under replay, forward + backward with recompute) through r3rl's
    regional torch.compile (`r3rl train --compile`), compiled after the rollout."""

    def __post_init__(self) -> None:
        if self.rollout_url and self.turns > 1:
            raise ValueError(f"turns={self.turns} (episodes) runs on the in-process engine: drop --rollout-url")
        if self.rollout_engine not in ("auto", "r3rl", "sglang", "vllm"):
            raise ValueError(f"rollout_engine must be auto, r3rl, sglang or vllm: got {self.rollout_engine!r}")
        if self.turns > 1 and self.rollout is not RolloutKind.ENGINE:
            raise ValueError(f"turns={self.turns} (episodes) needs the engine rollout: "
                             f"got rollout={self.rollout.value}")
        for name in ("batch_size", "prompt_len", "response_len", "turns", "observation_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive: got {getattr(self, name)}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampled rollouts: got {self.temperature}")
