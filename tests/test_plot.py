"""`plot_runs`: PNGs from synthetic metrics of two runs (R3-like and no-replay-like), and clear errors naming the
file and line for bad inputs."""

import json
import math

import pytest

from r3rl.commands.plot import load_metrics, plot_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir, *, r3: bool, steps=12, layers=4, name=None, skip=()):
    run_dir.mkdir(parents=True)
    rows = []
    for s in range(steps):
        per_layer = [0.0] * layers if r3 else [0.05 + 0.02 * i + 0.01 * math.sin(s) for i in range(layers)]
        row = {"step": s, "reward_mean": 0.2 + 0.05 * s, "reward_std": 0.1,
               "train_rollout_k3_kl": 1e-4 if r3 else 1e-3 * (1 + s % 3),
               "train_rollout_logprob_abs_diff": 1e-3 if r3 else 1e-2,
               "routing_mismatch": sum(per_layer) / layers, "routing_mismatch_per_layer": per_layer,
               "ppo_kl": 1e-3, "grad_norm": 0.5 + 0.1 * s, "response_len_mean": 5.0, "time/step": 0.3}
        rows.append({k: v for k, v in row.items() if k not in skip})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if name is not None:
        (run_dir / "config.json").write_text(json.dumps({"name": name, "seed": 0}))
    return run_dir


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5_000, (path, len(data))  # a drawn figure, not an empty canvas


def test_two_runs_overlaid_and_heatmaps(tmp_path):
    r3 = _write_run(tmp_path / "r3", r3=True)
    none = _write_run(tmp_path / "none", r3=False, name="no-replay")
    out = tmp_path / "plots"
    written = plot_runs([r3, none], out)
    names = sorted(p.name for p in written)
    assert names == sorted(["reward.png", "kl.png", "logprob_diff.png", "routing_mismatch.png", "training.png",
                            "routing_mismatch_heatmap_r3.png", "routing_mismatch_heatmap_no-replay.png"])
    for path in written:
        assert path.parent == out
        _assert_png(path)


def test_labels_from_config_name_and_deduplicated(tmp_path):
    a = _write_run(tmp_path / "a" / "run", r3=True)
    b = _write_run(tmp_path / "b" / "run", r3=False)
    assert load_metrics(a).label == "run"
    assert load_metrics(_write_run(tmp_path / "c", r3=True, name="R3 on")).label == "R3 on"
    names = {p.name for p in plot_runs([a, b], tmp_path / "out")}
    assert {"routing_mismatch_heatmap_a_run.png", "routing_mismatch_heatmap_b_run.png"} <= names


def test_missing_metrics_are_skipped(tmp_path):
    run = _write_run(tmp_path / "r", r3=False, skip=("routing_mismatch_per_layer", "ppo_kl", "grad_norm",
                                                     "response_len_mean", "train_rollout_k3_kl"))
    names = sorted(p.name for p in plot_runs([run], tmp_path / "out"))
    assert names == ["logprob_diff.png", "reward.png", "routing_mismatch.png"]


def test_rows_sorted_by_step_and_repeated_step_keeps_last(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    rows = [{"step": 2, "reward_mean": 0.1}, {"step": 0, "reward_mean": 0.5}, {"step": 2, "reward_mean": 0.9}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert load_metrics(run).series("reward_mean") == ([0, 2], [0.5, 0.9])


def test_missing_metrics_file(tmp_path):
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ValueError, match=r"empty_run/metrics.jsonl: no metrics file"):
        plot_runs([tmp_path / "empty_run"], tmp_path / "out")
    (tmp_path / "empty_run" / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: no steps"):
        plot_runs([tmp_path / "empty_run"], tmp_path / "out")
    with pytest.raises(ValueError, match=r"at least one run directory"):
        plot_runs([], tmp_path / "out")


@pytest.mark.parametrize(("bad", "match"), [
    ('{"step": 3, "reward_mean": ', r"not valid JSON"),
    ("[1, 2]", r"expected a JSON object, got list"),
    ('{"reward_mean": 0.5}', r"'step' must be an int, got None"),
    ('{"step": "3"}', r"'step' must be an int, got '3'"),
    ('{"step": 3, "reward_mean": "high"}', r"'reward_mean' must be a number, got 'high'"),
    ('{"step": 3, "routing_mismatch_per_layer": [0.1, "x"]}', r"'routing_mismatch_per_layer' must be a list"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, match):
    run = _write_run(tmp_path / "r", r3=True, steps=3)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(bad + "\n")
    with pytest.raises(ValueError, match=match) as e:
        plot_runs([run], tmp_path / "out")
    assert str(e.value).startswith(f"{run / 'metrics.jsonl'}:4: ")
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are known good


def test_per_layer_length_change_is_an_error(tmp_path):
    run = _write_run(tmp_path / "r", r3=False, steps=3)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "routing_mismatch_per_layer": [0.1, 0.2]}) + "\n")
    with pytest.raises(ValueError, match=r"step 3 has 2 values in routing_mismatch_per_layer, step 0 has 4"):
        plot_runs([run], tmp_path / "out")


def test_bad_config_json(tmp_path):
    run = _write_run(tmp_path / "r", r3=True, steps=2)
    (run / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"config.json: not a JSON object"):
        plot_runs([run], tmp_path / "out")


def test_reads_what_the_trainers_metrics_writer_writes(tmp_path):
    """The trainer's own writer (numpy and tensor values included) produces files plot_runs reads."""
    import numpy as np
    import torch

    from r3rl.train.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path / "run")
    for s in range(5):
        writer.write({"step": s, "reward_mean": np.float64(0.1 * s), "train_rollout_k3_kl": torch.tensor(1e-3).item(),
                      "routing_mismatch": 0.05, "routing_mismatch_per_layer": torch.tensor([0.04, 0.06]),
                      "r3_check_passed": True})
    writer.close()
    names = sorted(p.name for p in plot_runs([tmp_path / "run"], tmp_path / "out"))
    assert names == ["kl.png", "reward.png", "routing_mismatch.png", "routing_mismatch_heatmap_run.png"]
