"""`plot_runs`: PNGs from synthetic metrics of two runs (R3-like and no-replay-like), and clear errors naming the
file and line for bad inputs."""

import json
import math

import pytest

from r3rl.commands.plot import PANELS, build_figures, ema, load_metrics, plot_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir, *, r3: bool, steps=12, layers=4, name=None, skip=(), ppo_kl=1e-3, evals=False, live=False):
    run_dir.mkdir(parents=True)
    rows = []
    for s in range(steps):
        per_layer = [0.0] * layers if r3 else [0.05 + 0.02 * i + 0.01 * math.sin(s) for i in range(layers)]
        row = {"step": s, "reward_mean": 0.2 + 0.05 * s, "reward_std": 0.1,
               "train_rollout_k3_kl": 1e-4 if r3 else 1e-3 * (1 + s % 3),
               "train_rollout_logprob_abs_diff": 1e-3 if r3 else 1e-2,
               "train_rollout_logprob_abs_diff_p99": 1e-2 if r3 else 1e-1 * (1 + s % 2),
               "train_rollout_extreme_frac": 0.0 if r3 else 1e-3 * (s % 3),
               "routing_mismatch": sum(per_layer) / layers, "routing_mismatch_per_layer": per_layer,
               "ppo_kl": ppo_kl, "grad_norm": 0.5 + 0.1 * s, "response_len_mean": 5.0, "time/step": 0.3}
        if live:  # the live router against the rollout trace: what R3 removed, logged with and without it
            row["router_live_mismatch"] = 0.06 + 0.01 * math.cos(s)
        if evals and s % 5 == 0:
            row |= {"eval_solved_frac": 0.3 + 0.02 * s, "eval_reward": 0.5 + 0.01 * s}
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


def _figs(*run_dirs):
    return dict(build_figures([load_metrics(d) for d in run_dirs]))


def _titles(fig):
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def test_eval_metric_is_plotted_on_a_fixed_unit_axis(tmp_path):
    figs = _figs(_write_run(tmp_path / "r", r3=True, evals=True))
    assert "eval.png" in figs
    exact, reward = figs["eval.png"].axes[:2]
    assert exact.get_title() == "held-out greedy exact match" and reward.get_title() == "held-out greedy reward"
    assert exact.get_ylim() == (0.0, 1.02)
    ys = exact.lines[0].get_ydata()
    assert list(ys) == pytest.approx([0.3, 0.4, 0.5])  # steps 0, 5, 10: the raw values, not smoothed
    assert "eval.png" not in _figs(_write_run(tmp_path / "noeval", r3=True))  # no eval metric: no file


def test_an_all_zero_ppo_kl_panel_is_left_out(tmp_path):
    titles = _titles(_figs(_write_run(tmp_path / "zero", r3=True, ppo_kl=0.0))["training.png"])
    assert titles == ["grad norm", "response length"]
    titles = _titles(_figs(_write_run(tmp_path / "some", r3=True, ppo_kl=1e-3))["training.png"])
    assert titles == ["PPO KL", "grad norm", "response length"]  # the negative control: a non-zero KL is shown


def test_routing_mismatch_axis_starts_at_zero(tmp_path):
    r3 = _write_run(tmp_path / "r3", r3=True)
    (ax,) = _figs(r3)["routing_mismatch.png"].axes
    assert ax.get_ylim() == (0.0, 1.0) and ax.get_title().endswith("(all zero)")  # not -0.04..0.04 around a 0 line
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["r3 (all 0)"]
    (ax,) = _figs(r3, _write_run(tmp_path / "none", r3=False))["routing_mismatch.png"].axes
    low, high = ax.get_ylim()
    top = max(max(line.get_ydata()) for line in ax.lines)
    assert low == 0.0 and top < high <= 1.0 and high < 2 * top and not ax.get_title().endswith("(all zero)")


def test_equal_runs_stay_visible_on_top_of_each_other(tmp_path):
    a = _write_run(tmp_path / "a", r3=True, evals=True)
    b = _write_run(tmp_path / "b", r3=True, evals=True)
    for name in ("reward.png", "eval.png", "routing_mismatch.png"):
        ax = _figs(a, b)[name].axes[0]
        shown = [line for line in ax.lines if not line.get_label().startswith("_")]
        assert len(shown) == 2 and list(shown[0].get_ydata()) == list(shown[1].get_ydata())  # equal curves ...
        styles = {(line.get_linestyle(), line.get_marker()) for line in shown}
        assert len(styles) == 2, name  # ... drawn differently
        assert shown[1].get_zorder() > shown[0].get_zorder() and shown[1].get_linewidth() < shown[0].get_linewidth()
        assert shown[1].get_markersize() < shown[0].get_markersize()


def test_noisy_curves_get_an_ema_beside_the_faded_raw_one(tmp_path):
    run = _write_run(tmp_path / "r", r3=False, steps=30)
    ax = _figs(run)["reward.png"].axes[0]
    raw = [line for line in ax.lines if line.get_label().startswith("_")]
    smooth = [line for line in ax.lines if not line.get_label().startswith("_")]
    assert len(raw) == 1 and len(smooth) == 1 and raw[0].get_alpha() < 0.5 < smooth[0].get_alpha()
    steps, values = load_metrics(run).series("reward_mean")
    assert list(raw[0].get_ydata()) == values and list(smooth[0].get_ydata()) == pytest.approx(ema(values))
    assert "EMA" in ax.get_legend().get_title().get_text()
    short = _figs(_write_run(tmp_path / "short", r3=False, steps=5))["reward.png"].axes[0]
    assert len(short.lines) == 1  # too few points to smooth: the raw curve alone


def test_ema_is_debiased_and_follows_a_step():
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # starts at the first value, not at 0
    out = ema([0.0] * 5 + [1.0] * 40)
    assert out[5] == pytest.approx(0.2 / (1 - 0.8**6)) and out[-1] == pytest.approx(1.0, abs=1e-3)


def test_all_zero_heatmap_says_so_on_a_fixed_scale(tmp_path):
    r3 = _write_run(tmp_path / "r3", r3=True)
    fig = _figs(r3)["routing_mismatch_heatmap_r3.png"]
    mesh = fig.axes[0].collections[0]
    assert mesh.get_clim() == (0.0, 1.0) and fig.axes[0].get_title().endswith("(all zero)")
    figs = _figs(r3, _write_run(tmp_path / "none", r3=False))  # shared scale with a run that has a mismatch
    vmax = figs["routing_mismatch_heatmap_none.png"].axes[0].collections[0].get_clim()[1]
    assert 0.1 < vmax < 0.2 and figs["routing_mismatch_heatmap_r3.png"].axes[0].collections[0].get_clim()[1] == vmax
    assert not figs["routing_mismatch_heatmap_none.png"].axes[0].get_title().endswith("(all zero)")


def test_a_new_metric_is_one_table_row(tmp_path, monkeypatch):
    from r3rl.commands import plot

    run = _write_run(tmp_path / "r", r3=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 12, "my_metric": 0.5}) + "\n")
    monkeypatch.setattr(plot, "PANELS", [*PANELS, plot.Panel(metric="my_metric", file="mine.png", title="mine",
                                                               ylabel="y", scale=plot.Scale.FRACTION)])
    assert _titles(_figs(run)["mine.png"]) == ["mine"]
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 13, "my_metric": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"'my_metric' must be a number"):
        load_metrics(run)


def test_r3_and_no_replay_overlaid_on_the_evidence_panels(tmp_path):
    # the picture of what R3 removes: both runs on every panel; the live router's mismatch is there in the R3 run too
    figs = _figs(_write_run(tmp_path / "r3", r3=True, live=True), _write_run(tmp_path / "none", r3=False, live=True))
    assert _titles(figs["logprob_diff.png"]) == ["train-rollout |log-prob difference|",
                                                  "train-rollout |log-prob difference|, p99",
                                                  "extreme tokens (|log-prob diff| > ln 2)"]
    assert _titles(figs["routing_mismatch.png"])[1] == "live router vs rollout trace"
    for name in ("logprob_diff.png", "routing_mismatch.png"):
        for ax in figs[name].axes:
            labels = [t.get_text() for t in ax.get_legend().get_texts()]
            assert len(labels) == 2 and labels[0].startswith("r3") and labels[1].startswith("none"), (name, labels)


def test_the_step_timeline_stacks_each_stage_per_step(tmp_path):
    run = _write_run(tmp_path / "timed", r3=True, steps=5)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r |= {"time/rollout": 0.5 + 0.1 * r["step"], "time/reward": 0.01, "time/ref_logprobs": 0.0,
              "time/old_logprobs": 0.1, "time/update": 0.3, "time/weight_sync": 0.02}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    untimed = _write_run(tmp_path / "untimed", r3=True, steps=5)  # negative control: no time/<stage>, no timeline
    figures = dict(build_figures([load_metrics(run), load_metrics(untimed)]))
    assert "timeline_timed.png" in figures and not any(n.startswith("timeline_untimed") for n in figures)
    ax = figures["timeline_timed.png"].axes[0]
    stages = [c.get_label() for c in ax.containers]
    assert stages == ["rollout", "reward", "old log-probs", "update", "weight sync"]  # ref_logprobs all 0: left out
    tops = [max(b.get_y() + b.get_height() for c in ax.containers for b in c.patches if b.get_x() < s < b.get_x()
                + b.get_width()) for s in range(5)]
    assert tops == pytest.approx([0.5 + 0.1 * s + 0.01 + 0.1 + 0.3 + 0.02 for s in range(5)])
    _assert_png(plot_runs([run], tmp_path / "plots")[-1])
