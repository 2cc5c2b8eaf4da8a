"""`r3rl train --rollout-url`: a 3-step run whose rollouts come from a real `r3rl serve` process, with the weights
synced by disk (`/update_weights_from_disk`) after every step, R3 replay and the check on."""

import importlib.util
import json
import sys
from pathlib import Path

from r3rl.config import ReplayConfig
from r3rl.models.presets import init_model
from r3rl.train.config import TrainConfig
from r3rl.train.trainer import Trainer

_spec = importlib.util.spec_from_file_location("rollout_conftest", Path(__file__).parents[1] / "rollout/conftest.py")
_rollout = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _rollout
_spec.loader.exec_module(_rollout)  # the rollout tests' server launcher (free port, /health wait, SIGTERM drain)


def test_three_steps_through_a_real_server_with_weight_sync_by_disk(tmp_path):
    model_dir = init_model("tiny-qwen3-moe", tmp_path / "model", seed=3)
    server = _rollout.start_server(model_dir, tmp_path / "server.log")
    try:
        cfg = TrainConfig(
            replay=ReplayConfig(use_rollout_routing_replay=True, enable_r3_correctness_check=True),
            model=str(model_dir), rollout_url=[server.url], rollout_batch_size=3, n_samples_per_prompt=4,
            rollout_max_response_len=6, num_rollout=3, sft_steps=2, sft_batch_size=8, micro_batch_size=6,
            progress=False, plots=False, eval_prompts=16, run_dir=str(tmp_path / "run"))
        summary = Trainer(cfg).run()
    finally:
        code = server.stop()
    assert summary["verdict"] == "pass", summary
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["weight_version"] for r in rows] == [1, 2, 3]
    assert all(r["routing_mismatch"] == 0.0 and r["r3_check_replay_backward_tokens"] > 0 for r in rows)
    log = server.log()
    # step k's rollout ran on version k: the server loaded the warm-up weights (v0), then one update per step
    for version in range(4):
        assert f"weight_version={version} " in log, f"the server never loaded weight version {version}"
    assert code == 0


def test_two_servers_get_each_version_by_one_gloo_broadcast(tmp_path):
    """--weight-sync gloo (the NCCL path on CPU): the trainer forms one update group with both servers and every
    version reaches both by one broadcast (no checkpoint written)."""
    model_dir = init_model("tiny-qwen3-moe", tmp_path / "model", seed=3)
    servers = [_rollout.start_server(model_dir, tmp_path / f"server{k}.log") for k in range(2)]
    try:
        cfg = TrainConfig(
            replay=ReplayConfig(use_rollout_routing_replay=True, enable_r3_correctness_check=True),
            model=str(model_dir), rollout_url=[s.url for s in servers], weight_sync="gloo", rollout_batch_size=3,
            n_samples_per_prompt=4, rollout_max_response_len=6, num_rollout=2, sft_steps=2, sft_batch_size=8,
            micro_batch_size=6, progress=False, plots=False, eval_prompts=16, run_dir=str(tmp_path / "run"))
        summary = Trainer(cfg).run()
    finally:
        codes = [s.stop() for s in servers]
    assert summary["verdict"] == "pass", summary
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["weight_version"] for r in rows] == [1, 2] and all(r["stale_frac"] == 0.0 for r in rows)
    for s in servers:
        log = s.log()
        for version in range(3):
            assert f"weights updated from distributed group 'weight_update_group': weight_version={version}" in log
        assert "update_weights_from_disk" not in log and "weights updated from /" not in log
    assert not (tmp_path / "run" / "weights").exists() or not any((tmp_path / "run" / "weights").iterdir())
    assert codes == [0, 0]
