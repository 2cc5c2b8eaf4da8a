"""What a `r3rl train` run leaves behind and evaluates on: a run directory of its own (runs/latest), the held-out
evaluation (a split of --prompt-data never trained on, or --eval-data), sample completions in samples.jsonl, an engine
sized from the data, plots at the end, the failing step in summary.json, and Weights & Biases logging."""

import datetime
import json
import logging
import os
from pathlib import Path

import pytest

from r3rl.config import ReplayConfig
from r3rl.tasks.data import DataPart
from r3rl.train import trainer as trainer_module
from r3rl.train.config import TrainConfig
from r3rl.train.metrics import MetricsWriter, RunSummary
from r3rl.train.run_dir import link_latest, new_run_dir
from r3rl.train.trainer import Trainer


def _data(path, n=40, start=0):
    rows = [{"prompt": f"upper:{chr(97 + i % 26)}{i}=", "label": f"{chr(65 + i % 26)}{i}"} for i in range(start, n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(replay=ReplayConfig(use_rollout_routing_replay=True, enable_r3_correctness_check=True),
                prompt_data=str(_data(tmp_path / "p.jsonl")), rollout_batch_size=4, n_samples_per_prompt=2,
                rollout_max_response_len=6, num_rollout=3, sft_steps=3, sft_batch_size=8, micro_batch_size=8,
                eval_interval=2, eval_samples_logged=2, progress=False, plots=False, run_dir=str(tmp_path / "run"))
    return TrainConfig(**(base | kw))


def test_prompt_data_run_evaluates_on_held_out_prompts_logs_samples_and_plots(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="r3rl")
    monkeypatch.chdir(tmp_path)
    trained = []  # every prompt a training stream (warm-up and RL) hands out

    def spy(cfg, *, seed, holdout, part=DataPart.TRAIN, reward=None):
        source = make(cfg, seed=seed, holdout=holdout, part=part, reward=reward)
        if part is not DataPart.EVAL:
            draw = source.next_batch

            def next_batch(n):
                items = draw(n)
                trained.extend(items)
                return items

            source.next_batch = next_batch
        return source

    make = trainer_module._prompt_source
    monkeypatch.setattr(trainer_module, "_prompt_source", spy)
    cfg = _cfg(tmp_path, run_dir=None, plots=True)
    trainer = Trainer(cfg)
    engine_seq_len = trainer.rollout.engine.config.max_seq_len  # (run() closes the engine)
    summary = trainer.run()
    assert summary["verdict"] == "pass", summary

    # a run directory of its own, runs/latest pointing at it
    run_dir = tmp_path / summary["run_dir"]
    assert run_dir.parent == tmp_path / "runs" and (tmp_path / "runs" / "latest").resolve() == run_dir.resolve()
    assert json.loads((run_dir / "config.json").read_text())["run_dir"] == summary["run_dir"]

    # held out: a fifth of the 40 prompts, never handed to the warm-up or to RL
    held = {it.prompt for it in trainer.eval_items}
    assert len(held) == 8 and trainer.holdout == 8
    # 3 warm-up batches of 8, 3 RL batches of 4, and the reward contract's one probe at start
    assert len(trained) == 3 * 8 + 3 * 4 + 1 and not held & {it.prompt for it in trained}
    assert any("held-out evaluation: 8 of the 40 distinct prompts" in r.getMessage() for r in caplog.records)

    # samples: 2 per evaluation (steps 0 and 2), in the log and in samples.jsonl
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 0, 2, 2]
    assert all(set(r) == {"step", "prompt", "completion", "reward", "label"} and r["prompt"] in held for r in rows)
    assert all(0.0 <= r["reward"] <= 1.0 and isinstance(r["completion"], str) for r in rows)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval sample")]
    assert len(logged) == 4 and logged[0].startswith(f"eval sample 1/2 at step 0: {rows[0]['prompt']!r} -> ")

    # the engine holds the data's longest prompt plus the response, not 2048 + 12 tokens
    longest = max(len(trainer.tokenizer.encode(line, add_special_tokens=False)) for line in
                  (json.loads(x)["prompt"] for x in (tmp_path / "p.jsonl").read_text().splitlines()))
    assert engine_seq_len == longest + 6 < 32

    # the plots, the eval metric's among them
    assert {"reward.png", "eval.png", "routing_mismatch.png"} <= {p.name for p in (run_dir / "plots").iterdir()}


def test_eval_data_file_is_the_evaluation_and_an_overlap_is_named(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="r3rl")
    evals = _data(tmp_path / "e.jsonl", n=45, start=38)  # 38 and 39 are training prompts too
    trainer = Trainer(_cfg(tmp_path, eval_data=str(evals), sft_steps=0))
    try:
        assert [it.prompt for it in sorted(trainer.eval_items, key=lambda it: it.label)] == sorted(
            json.loads(line)["prompt"] for line in evals.read_text().splitlines())
        assert trainer.holdout == 0 and len(trainer.prompts) == 40  # nothing split off the training file
        assert any("2 of the 7 prompts of --eval-data" in r.getMessage() for r in caplog.records)
    finally:
        trainer.close()


def test_each_run_gets_its_own_directory_and_latest_follows(tmp_path, caplog):
    now = datetime.datetime(2026, 12, 7, 7, 15, 2)
    first, second = new_run_dir(tmp_path / "runs", now=now), new_run_dir(tmp_path / "runs", now=now)
    assert (first.name, second.name) == ("20261207-071502", "20261207-071502-1")  # the same second: a suffix
    assert first.is_dir() and second.is_dir()
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and os.readlink(latest) == second.name  # relative: the folder can move
    link_latest(tmp_path / "runs", first)
    assert latest.resolve() == first.resolve()
    latest.unlink()
    latest.mkdir()  # a user's own folder called latest is left alone
    with caplog.at_level(logging.WARNING, logger="r3rl"):
        new_run_dir(tmp_path / "runs", now=now)
    assert latest.is_dir() and not latest.is_symlink() and "is not a link" in caplog.text


def test_a_resumed_run_without_run_dir_continues_in_its_own_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kw = dict(prompt_data=None, eval_interval=None, sft_steps=1, run_dir=None, save=str(tmp_path / "ckpt"))
    first = Trainer(_cfg(tmp_path, num_rollout=1, **kw)).run()
    resumed = Trainer(_cfg(tmp_path, num_rollout=2, load=str(tmp_path / "ckpt"), **kw)).run()
    assert resumed["run_dir"] == first["run_dir"] and resumed["steps"] == 1
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([Path(first["run_dir"]).name, "latest"])
    rows = (tmp_path / first["run_dir"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [0, 1]


def test_a_run_that_fails_at_step_0_names_the_step():
    summary = RunSummary()
    summary.fail(0)
    out = summary.to_dict(check_enabled=True, error="R3 mismatch tokens (9) > threshold (0.50)")
    assert out["steps"] == 0 and out["failed_steps"] == [0] and out["verdict"] == "fail"
    assert out["error"] == "R3 mismatch tokens (9) > threshold (0.50)"
    summary.add({"step": 1, "routing_mismatch": 0.0, "r3_check_passed": False})
    summary.fail(1)  # a step both failed by its metrics and by the error is named once
    assert summary.to_dict(check_enabled=True)["failed_steps"] == [0, 1]
    assert RunSummary().to_dict(check_enabled=True, error=None)["failed_steps"] == []  # the negative control


def test_wandb_not_installed_is_a_clear_error(tmp_path, monkeypatch):
    from r3rl import cli
    from r3rl.train import metrics

    monkeypatch.setattr(metrics, "wandb_available", lambda: False)
    with pytest.raises(ValueError, match=r"--use-wandb needs the wandb package.*pip install 'r3rl\[wandb\]'"):
        MetricsWriter(tmp_path / "run", wandb={"project": "p"})
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--use-wandb", "--run-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert e.value.code == 2


def test_wandb_logs_offline_beside_the_metrics_file(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = MetricsWriter(tmp_path / "run", wandb={"project": "r3rl-test", "name": "t", "config": {"seed": 0}})
    for s in range(3):
        writer.write({"step": s, "reward_mean": 0.1 * s, "routing_mismatch_per_layer": [0.0, 0.1], "ok": True})
    writer.close()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_missing_eval_data_file_exits_2_before_any_work(tmp_path, capsys):
    from r3rl import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--eval-data", str(tmp_path / "nope.jsonl"), "--run-dir", str(tmp_path / "run"),
                  "--device", "cpu"])
    assert e.value.code == 2 and f"--eval-data {tmp_path / 'nope.jsonl'}: file not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
