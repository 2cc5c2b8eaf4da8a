"""The run's verdict requires, at every step, checked tokens in the stages the configuration produces:
`replay_forward` always, `replay_backward` only with activation checkpointing (nothing is recomputed without it).

`r3rl train --no-activation-checkpointing` with the check passes (it ended `verdict: fail` with 0 mismatches before);
the same run's step metrics judged as a checkpointed run's fail, naming the missing stage and step."""

import json

from r3rl.cli import main
from r3rl.train.metrics import RunSummary

ARGS = ["train", "--use-rollout-routing-replay", "--enable-r3-correctness-check", "--num-rollout", "2",
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "4",
        "--sft-steps", "1", "--sft-batch-size", "4", "--eval-interval", "0", "--no-progress"]


def test_no_activation_checkpointing_passes_and_needs_no_recompute(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*ARGS, "--no-activation-checkpointing", "--run-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["verdict"] == "pass" and summary["required_stages"] == ["replay_forward"]
    assert summary["tokens_checked"]["replay_forward"] > 0 and summary["tokens_checked"].get("replay_backward", 0) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # negative control: the same steps judged as a checkpointed run's lack the recompute stage
    judged = RunSummary(recompute=True)
    for r in rows:
        judged.add(r)
    verdict = judged.to_dict(check_enabled=True)
    assert verdict["verdict"] == "fail"
    assert verdict["error"] == ("the check saw no token in stage(s) ['replay_backward'] at step 0 (2 of 2 steps; "
                                "required: ['replay_forward', 'replay_backward'])")


def test_checkpointed_run_requires_the_recompute_stage_every_step(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*ARGS, "--run-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["verdict"] == "pass" and summary["required_stages"] == ["replay_forward", "replay_backward"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    judged = RunSummary(recompute=True)
    judged.add(rows[0])
    judged.add(rows[1] | {"r3_check_replay_backward_tokens": 0})  # one step without its recompute fails the run
    assert judged.to_dict(check_enabled=True)["error"].startswith(
        "the check saw no token in stage(s) ['replay_backward'] at step 1 (1 of 2 steps")
