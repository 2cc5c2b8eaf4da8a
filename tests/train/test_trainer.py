"""`r3rl train` end to end on CPU: a real tiny MoE, the in-process engine, real replay with activation checkpointing,
the check's evidence every step, fault injection, R2, checkpoints and resume."""

import json
import logging
import re

import pytest

from r3rl.config import Fault, ReplayConfig
from r3rl.train.config import TrainConfig
from r3rl.train.trainer import Trainer

WRAPPER = re.compile(r"R3 wrapper: (replay_forward|replay_backward) branch taken \(rank 0, n_tokens=(\d+), topk=4, "
                     r"replay_idx_sum=(\d+)\)")
CHECK = re.compile(r"R3 check \(rank 0, stage (replay_forward|replay_backward)\): n_tokens=(\d+) mismatch=(\d+) "
                   r"\(\d+\.\d\d%\)")


def small(tmp_path, name="run", **kw) -> TrainConfig:
    replay = kw.pop("replay", ReplayConfig(use_rollout_routing_replay=True, enable_r3_correctness_check=True))
    base = dict(replay=replay, rollout_batch_size=4, n_samples_per_prompt=4, rollout_max_response_len=6,
                num_rollout=3, sft_steps=2, sft_batch_size=8, micro_batch_size=6, progress=False, plots=False,
                eval_prompts=16, run_dir=str(tmp_path / name))  # the default's 256 greedy prompts: too slow here
    return TrainConfig(**(base | kw))


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_r3_run_replays_every_step_and_logs_the_evidence(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="r3rl")
    summary = Trainer(small(tmp_path)).run()
    assert summary["verdict"] == "pass" and summary["steps"] == 3, summary
    lines = [r.getMessage() for r in caplog.records]
    wrappers = [m.groups() for m in map(WRAPPER.search, lines) if m]
    checks = [m.groups() for m in map(CHECK.search, lines) if m]
    # every step: one wrapper line per MoE layer (4) and stage, and one check line per stage, no mismatch
    assert len(wrappers) == 3 * 2 * 4 and {w[0] for w in wrappers} == {"replay_forward", "replay_backward"}
    assert len(checks) == 3 * 2 and all(int(c[2]) == 0 and int(c[1]) > 0 for c in checks)
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        # R3: the training forward used the rollout's experts, row for row
        assert r["routing_mismatch"] == 0.0 and len(r["routing_mismatch_per_layer"]) == 4
        assert r["weight_version"] == r["step"] + 1 and r["r3_check_passed"]
        # the old-policy forward (no grad) and the update forward are both replay_forward; only the update recomputes
        assert r["r3_check_replay_forward_tokens"] == 2 * r["r3_check_replay_backward_tokens"] > 0
        for key in ("reward_mean", "train_rollout_logprob_abs_diff", "train_rollout_k3_kl", "ppo_kl", "clipfrac",
                    "grad_norm", "entropy", "update_tokens_per_s", "time/rollout", "time/update"):
            assert key in r, key
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["verdict"] == "pass"


def test_injected_shift_fails_with_the_exact_error(tmp_path):
    with pytest.raises(AssertionError, match=r"^R3 mismatch tokens \(\d+\) > threshold \(\d+\.\d\d\)$"):
        # a warmed-up policy: at random init adjacent tokens share most experts, and a one-token shift hides
        Trainer(small(tmp_path, inject_fault=Fault.SHIFT, num_rollout=1, sft_steps=40, sft_batch_size=16)).run()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["verdict"] == "fail" and summary["error"].startswith("R3 mismatch tokens")
    assert summary["steps"] == 0 and summary["failed_steps"] == [0]  # the step that failed, before its metrics


def test_r2_replays_its_own_recording_and_no_replay_measures_the_mismatch(tmp_path):
    r2 = Trainer(small(tmp_path, "r2", num_rollout=2, replay=ReplayConfig(use_routing_replay=True, ci_test=True)))
    assert r2.run()["verdict"] == "pass"
    free = Trainer(small(tmp_path, "none", num_rollout=2, replay=ReplayConfig()))
    assert free.run()["verdict"] == "not_checked"
    for name in ("r2", "none"):
        rows = _metrics(tmp_path / name)
        assert all(0.0 <= r["routing_mismatch"] <= 1.0 for r in rows)
        assert "r3_check_tokens" in rows[0] if name == "r2" else "r3_check_tokens" not in rows[0]
    assert "ci_ref_logprob_max_abs_diff" in _metrics(tmp_path / "r2")[0]  # --ci-test: step-0 actor vs reference


def test_resume_gives_the_same_metrics_as_the_uninterrupted_run(tmp_path):
    full = small(tmp_path, "full", num_rollout=4, save=str(tmp_path / "ckpt_full"), save_interval=2)
    Trainer(full).run()
    first = small(tmp_path, "part", num_rollout=2, save=str(tmp_path / "ckpt"), save_interval=2)
    Trainer(first).run()
    resumed = small(tmp_path, "part", num_rollout=4, load=str(tmp_path / "ckpt"), save=str(tmp_path / "ckpt"))
    Trainer(resumed).run()
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        # the 2-step run evaluates after its last step (1) where the 4-step run does not: compare shared keys
        keys = {k for k in ra.keys() & rb.keys() if not k.startswith("time/") and k != "update_tokens_per_s"}
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}, ra["step"]
        assert len(keys) > 20
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step_000004"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt / "step_000004")  # an HF checkpoint, as r3rl serve loads it


def test_kl_tis_gspo_padded_and_several_optimizer_steps_run_together(tmp_path):
    from r3rl.train.data import Layout
    from r3rl.train.losses import AdvantageEstimator, LossConfig

    loss = LossConfig(advantage_estimator=AdvantageEstimator.GSPO, use_kl_loss=True, kl_loss_coef=0.1, use_tis=True,
                      rollout_mask=True)
    cfg = small(tmp_path, num_rollout=2, loss=loss, kl_coef=0.05, layout=Layout.PADDED, global_batch_size=8,
                micro_batch_size=3, max_tokens_per_mb=60,  # a budget: samples grouped longest first
                log_probs_max_tokens_per_mb=400)  # the forwards without backward: fewer, larger micro-batches
    assert Trainer(cfg).run()["verdict"] == "pass"
    rows = _metrics(tmp_path / "run")
    for r in rows:
        assert r["optimizer_steps"] == 2 and r["kl_loss"] >= 0 and 0 <= r["tis_clipfrac"] <= 1
        assert 0 <= r["mask_frac"] <= 1 and r["tis_mean"] > 0
        assert 0 <= r["pad_frac"] < 0.5 and r["routing_mismatch"] == 0.0
        # each sample's training log-probs against its own rollout log-probs, however the samples were grouped
        assert r["train_rollout_logprob_abs_diff"] < 0.05, r["train_rollout_logprob_abs_diff"]
    assert rows[1]["kl_loss"] > 0  # the policy moved away from the reference after one step


def test_samples_from_a_stale_weight_version_or_another_temperature_are_refused():
    from r3rl.sample import Sample
    from r3rl.train.step import _check_samples

    ok = Sample(prompt_ids=[1], response_ids=[2], rollout_logprobs=[-1.0], weight_version_start=3, weight_version=3)
    _check_samples([ok], 3, step=3, temperature=1.0)
    stale = Sample(prompt_ids=[1], response_ids=[2], rollout_logprobs=[-1.0], weight_version_start=2,
                   weight_version=3)
    with pytest.raises(RuntimeError, match="weight version 2..3, expected 3"):
        _check_samples([ok, stale], 3, step=3, temperature=1.0)
    from r3rl.train.config import StalePolicy

    assert _check_samples([ok, stale], 3, step=3, temperature=1.0, policy=StalePolicy.KEEP) == [False, True]
    assert _check_samples([ok, stale], 3, step=3, temperature=1.0, max_staleness=1) == [False, False]
    with pytest.raises(ValueError, match="log-probs at temperature 1.0, the trainer scores temperature 0.7"):
        _check_samples([ok], 3, step=3, temperature=0.7)


def test_ci_test_reference_comparison_fails_when_the_reference_differs(tmp_path):
    import torch

    trainer = Trainer(small(tmp_path, num_rollout=1, replay=ReplayConfig(use_routing_replay=True, ci_test=True)))
    with torch.no_grad():
        trainer.ref_model.lm_head.weight.mul_(1.5)  # no longer the actor's weights
    with pytest.raises(AssertionError, match="ci-test: step-0 actor and reference log-probs differ"):
        trainer.run()


def test_release_rollout_memory_frees_the_engine_during_the_update_and_gets_it_back(tmp_path, monkeypatch):
    """Colocated: the KV cache is freed after each rollout and allocated again before the sync; a missing resume
    would make the next rollout (and the evaluation) refuse to run."""
    from r3rl.rollout.engine.engine import RolloutEngine

    events = []
    release, resume = RolloutEngine.release_memory, RolloutEngine.resume_memory
    monkeypatch.setattr(RolloutEngine, "release_memory", lambda self: events.append("release") or release(self))
    monkeypatch.setattr(RolloutEngine, "resume_memory", lambda self: events.append("resume") or resume(self))
    summary = Trainer(small(tmp_path, release_rollout_memory=True, num_rollout=2, eval_interval=1,
                            eval_prompts=4)).run()
    assert summary["verdict"] == "pass" and events == ["release", "resume"] * 2
    with pytest.raises(ValueError, match="no effect with --rollout-url"):
        small(tmp_path, release_rollout_memory=True, rollout_url=["http://127.0.0.1:1"])


def test_dropped_stale_samples_leave_the_policy_gradient(tmp_path, monkeypatch):
    """--stale-samples drop: a sample from old weights gets advantage 0 and is counted; keep trains on it."""
    from r3rl.rollout.net.backend import EngineBackend
    from r3rl.train.config import StalePolicy

    generate = EngineBackend.generate

    def lagging(self, *a, **kw):  # the odd samples claim weights two versions old
        out = generate(self, *a, **kw)
        for s in out[1::2]:
            s.weight_version_start -= 2
        return out

    monkeypatch.setattr(EngineBackend, "generate", lagging)
    import r3rl.train.step as step_module

    update, advantages = step_module._update, {}

    def spy(ctx, samples, adv, *a):
        advantages[ctx.cfg.stale_samples] = list(adv)
        return update(ctx, samples, adv, *a)

    monkeypatch.setattr(step_module, "_update", spy)
    rm = tmp_path / "rm.py"  # a reward that varies within groups, so advantages are not all zero
    rm.write_text("def reward(text, item):\n    return float(sum(map(ord, text)) % 3) / 2\n")
    rows = {}
    for policy in (StalePolicy.KEEP, StalePolicy.DROP):
        Trainer(small(tmp_path, name=policy.value, stale_samples=policy, max_staleness=1, num_rollout=1,
                      eval_interval=None, custom_rm_path=f"{rm}:reward")).run()
        rows[policy] = _metrics(tmp_path / policy.value)[0]
    assert rows[StalePolicy.KEEP]["stale_frac"] == rows[StalePolicy.DROP]["stale_frac"] == 0.5
    keep, drop = advantages[StalePolicy.KEEP], advantages[StalePolicy.DROP]
    assert any(keep[1::2])  # the stale samples had a gradient to lose
    assert not any(drop[1::2]) and drop[::2] == keep[::2]  # the same rollout (seeded): only the stale ones left
    with pytest.raises(RuntimeError, match="8 sample\\(s\\) were generated with weight version -2..0"):
        Trainer(small(tmp_path, name="error", num_rollout=1, eval_interval=None, max_staleness=1)).run()


def test_fused_adamw_is_what_the_flag_asks_for(tmp_path):
    trainer = Trainer(small(tmp_path, num_rollout=1, sft_steps=0, optimizer_fused=True))
    assert trainer.optimizer.defaults["fused"] is True
    assert trainer.run()["verdict"] == "pass"
    assert not Trainer(small(tmp_path, "run2", num_rollout=1, sft_steps=0)).optimizer.defaults["fused"]
