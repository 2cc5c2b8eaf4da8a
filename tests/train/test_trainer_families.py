"""`r3rl train` on each MoE family's tiny preset: R3 replays the engine's routing in every forward and recompute,
the check passes, and a layer-permuted trace fails it.

The shift fault is not used here: after the warm-up, the tiny DeepSeek-V3 preset's group-limited, bias-steered
routing gives neighbouring tokens overlapping experts on this task (0 of 660 shifted rows without overlap), so a
one-token shift is not a fault its zero-overlap check can see there; permuting layers is."""

import pytest

from r3rl.config import Fault, ReplayConfig
from r3rl.models.presets import PRESETS, TINY_FAMILIES, TINY_NEW_FAMILIES
from r3rl.train.config import TrainConfig
from r3rl.train.trainer import Trainer

FAMILIES = [p for p in (*TINY_NEW_FAMILIES, *TINY_FAMILIES) if p != "tiny-qwen3-moe" and p in PRESETS]


def _cfg(tmp_path, preset: str, **kw) -> TrainConfig:
    return TrainConfig(replay=ReplayConfig(use_rollout_routing_replay=True, enable_r3_correctness_check=True),
                       preset=preset, rollout_batch_size=2, n_samples_per_prompt=4, rollout_max_response_len=6,
                       num_rollout=2, sft_steps=2, sft_batch_size=8, micro_batch_size=4, eval_interval=None,
                       progress=False, plots=False, run_dir=str(tmp_path / preset), **kw)


@pytest.mark.parametrize("preset", FAMILIES)
def test_r3_training_passes_the_check_on_every_family(tmp_path, preset):
    summary = Trainer(_cfg(tmp_path, preset)).run()
    assert summary["verdict"] == "pass" and summary["routing_mismatch_mean"] == 0.0
    assert summary["tokens_checked"]["replay_backward"] > 0


@pytest.mark.parametrize("preset", FAMILIES)
def test_a_layer_permuted_trace_fails_the_check_on_every_family(tmp_path, preset):
    with pytest.raises(AssertionError, match=r"R3 mismatch tokens \(\d+\) > threshold"):
        Trainer(_cfg(tmp_path, preset, inject_fault=Fault.PERMUTE_LAYERS)).run()
