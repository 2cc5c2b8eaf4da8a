"""`r3rl check --turns N`: episodes from the engine (r3rl.episodes), replay and check over whole episodes.

    pytest tests/test_check_episodes.py -q
"""

from __future__ import annotations

import pytest

from r3rl.commands.check import run_check
from r3rl.config import CheckRunConfig, Fault, ReplayConfig, RolloutKind

R3 = ReplayConfig(use_rollout_routing_replay=True, enable_r3_correctness_check=True)


def _cfg(**kw) -> CheckRunConfig:
    return CheckRunConfig(**{"replay": R3, "batch_size": 4, "prompt_len": 6, "response_len": 5, "turns": 3,
                             "observation_len": 3, **kw})


def test_check_over_whole_episodes_passes_and_the_fault_fails():
    report = run_check(_cfg())
    assert report["verdict"] == "pass" and report["turns"] == 3
    assert report["episode_tokens"] == 6 + 3 * 5 + 2 * 3
    rows = 4 * (report["episode_tokens"] - 1)  # every token but the last of each episode, every layer
    assert report["counts"]["checked_tokens"]["replay_forward"] >= rows
    assert report["with_replay"]["routing_mismatch"] == 0.0
    bad = run_check(_cfg(inject_fault=Fault.SHIFT))
    assert bad["verdict"] == "fail" and "R3 mismatch tokens" in bad["reason"]


def test_turns_need_the_engine():
    with pytest.raises(ValueError, match="needs the engine rollout"):
        _cfg(rollout=RolloutKind.HF)
    with pytest.raises(ValueError, match="turns must be positive"):
        _cfg(turns=0)
