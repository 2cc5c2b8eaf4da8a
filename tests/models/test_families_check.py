"""`r3rl check --model <dir> --rollout hf` on each new family's tiny checkpoint (CPU, bf16): R3 with the check
passes, and both injected faults (shifted ids, permuted layers) fail it: the negative controls. Runs `run_check`
in-process on a checkpoint written by `init_model` (the CLI maps its flags onto the same CheckRunConfig)."""

import inspect

import pytest

from r3rl.commands.check import run_check
from r3rl.config import CheckRunConfig, Fault, ReplayConfig, RolloutKind
from r3rl.models.presets import TINY_NEW_FAMILIES, init_model, preset_available
from r3rl.replay import RoutingReplay

FAMILIES = TINY_NEW_FAMILIES


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    preset = request.param
    if not preset_available(preset):
        pytest.skip(f"the installed transformers has no model class for {preset}")
    params = inspect.signature(RoutingReplay._router_forward).parameters.values()
    if preset == "tiny-minimax-m2" and not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        pytest.skip("MiniMax-M2's router takes (hidden, e_score_correction_bias): RoutingReplay._router_forward must "
                    "pass extra positional args through to the original forward")
    return init_model(preset, tmp_path_factory.mktemp(preset))


def _check(path, fault=Fault.NONE):
    replay = ReplayConfig(use_rollout_routing_replay=True, enable_r3_correctness_check=True)
    return run_check(CheckRunConfig(replay=replay, model=str(path), rollout=RolloutKind.HF, batch_size=2,
                                    prompt_len=6, response_len=8, inject_fault=fault))


def test_check_passes_on_the_family_checkpoint(checkpoint):
    report = _check(checkpoint)
    assert report["verdict"] == "pass", report.get("reason")
    assert report["with_replay"]["routing_mismatch"] == 0.0
    # zero-overlap rows per layer at most 1e-2 of its rows (the check's own ratio, applied per layer here; the check
    # applies it per stage). At this size (~56 rows per layer) that means none
    assert all(layer["zero_overlap"] <= 1e-2 * layer["tokens"] for layer in report["layers"])


@pytest.mark.parametrize("fault", [Fault.SHIFT, Fault.PERMUTE_LAYERS])
def test_injected_fault_fails_the_check(checkpoint, fault):
    report = _check(checkpoint, fault)
    assert report["verdict"] == "fail"
    # The check sees the corrupted rows. In tiny GPT-OSS consecutive tokens route alike (its residual stream is
    # dominated by attention), so a one-token shift leaves under 1% of rows with zero overlap: the verdict then
    # fails on the rollout-vs-training routing mismatch instead of on the check's threshold.
    assert report["reason"].startswith(("R3 mismatch tokens (", "under replay the training routing still differs"))
    assert sum(layer["zero_overlap"] for layer in report["layers"]) > 0


@pytest.mark.parametrize("fault", [Fault.NONE, Fault.SHIFT])
def test_check_with_the_engine_rollout(checkpoint, fault):
    """The default rollout (r3rl's engine, its own kernels in bf16; MLA for DeepSeek-V3, gated delta-net layers over
    the per-slot state cache for Qwen3-Next): replay passes the check,
    a shift fails it."""
    replay = ReplayConfig(use_rollout_routing_replay=True, enable_r3_correctness_check=True)
    report = run_check(CheckRunConfig(replay=replay, model=str(checkpoint), rollout=RolloutKind.ENGINE, batch_size=4,
                                      prompt_len=8, response_len=12, inject_fault=fault))
    assert report["verdict"] == ("pass" if fault is Fault.NONE else "fail"), report.get("reason")
    if fault is Fault.NONE:
        assert report["with_replay"]["routing_mismatch"] == 0.0
