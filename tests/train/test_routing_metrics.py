"""The routing metrics read where the experts consume their routing (`r3rl.experts_tap`), against the rollout trace
as received: 0 under R3, > 0 when replay does not hold (a shifted trace) or without replay on the default's bf16
rollout against its fp32 trainer. Plus the log-prob tails (extreme-token fraction, p99)."""

import json
import math

import pytest
import torch

from r3rl.config import Fault, ReplayConfig
from r3rl.train.config import TrainConfig
from r3rl.train.metrics import train_rollout_metrics
from r3rl.train.trainer import Trainer


def _run(tmp_path, name, **kw) -> list[dict]:
    base = dict(rollout_batch_size=4, n_samples_per_prompt=4, rollout_max_response_len=6, num_rollout=1,
                sft_steps=2, sft_batch_size=8, micro_batch_size=8, progress=False, plots=False, eval_interval=None,
                run_dir=str(tmp_path / name))
    Trainer(TrainConfig(**(base | kw))).run()
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


R3 = ReplayConfig(use_rollout_routing_replay=True, enable_r3_correctness_check=True)


def test_under_r3_the_experts_use_the_rollout_trace_and_the_live_router_would_not(tmp_path):
    (r,) = _run(tmp_path, "r3", replay=R3)
    assert r["routing_mismatch"] == 0.0 and r["routing_mismatch_per_layer"] == [0.0] * 4
    # the bf16 rollout routed some rows differently from the fp32 live router: what R3 removed
    assert r["router_live_mismatch"] > 0.0 and len(r["router_live_mismatch_per_layer"]) == 4


def test_under_r3_a_shifted_trace_shows_in_routing_mismatch(tmp_path):
    # the negative control: the replay consumes a corrupted trace, the check tolerates it (threshold 1.0); the metric
    # reads what the experts used against the trace as received, so it must see the shift
    replay = ReplayConfig(use_rollout_routing_replay=True, enable_r3_correctness_check=True, r3_check_threshold=1.0)
    (r,) = _run(tmp_path, "shift", replay=replay, inject_fault=Fault.SHIFT)
    assert r["r3_check_mismatch"] > 0
    assert r["routing_mismatch"] > 0.05 and min(r["routing_mismatch_per_layer"]) > 0.0


def test_without_replay_the_bf16_rollout_routes_differently_from_the_fp32_trainer(tmp_path):
    (r,) = _run(tmp_path, "none", replay=ReplayConfig())
    assert r["routing_mismatch"] >= 0.01
    # the old-policy forward routed live; the update forwards add rows routed by the same weights
    assert r["router_live_mismatch"] >= 0.01
    same = _run(tmp_path, "same", replay=ReplayConfig(), rollout_dtype=None)[0]
    assert same["routing_mismatch"] < r["routing_mismatch"]


def test_log_prob_tails():
    train = torch.tensor([0.0, -1.0, -2.0, -3.0] * 25, dtype=torch.float64)
    rollout = train.clone()
    rollout[:3] -= torch.tensor([0.5, 0.8, -1.0])  # |r| 0.5 (inside), 0.8 and 1.0 (beyond ln 2)
    m = train_rollout_metrics(train, rollout)
    assert m["train_rollout_extreme_frac"] == pytest.approx(2 / 100)
    assert 0.5 < m["train_rollout_logprob_abs_diff_p99"] <= 1.0
    assert m["train_rollout_logprob_abs_diff"] == pytest.approx(2.3 / 100)
    assert train_rollout_metrics(train, train)["train_rollout_extreme_frac"] == 0.0
    assert math.log(2) < 0.8


def test_bad_rollout_dtype_exits_2(capsys):
    from r3rl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--rollout-dtype", "bf15", "--run-dir", "/tmp/r3rl-never"])
    assert e.value.code == 2 and "--rollout-dtype: unknown dtype 'bf15'" in capsys.readouterr().err


def test_the_tap_reads_what_the_experts_receive_once_per_forward_and_live_is_the_overridden_top_k(family_model,
                                                                                                     tokens):
    from r3rl.experts_tap import ExpertsTap
    from r3rl.models.loading import set_activation_checkpointing
    from r3rl.replay import Recording, RoutingReplay
    from r3rl.trace import ReplayBatch

    tap, replay = ExpertsTap(family_model), RoutingReplay(family_model)
    with torch.no_grad(), replay.off(), tap.reading() as free:
        family_model(tokens)
    live_ids = free.ids()  # the live router's choice, as the experts received it
    g = torch.Generator().manual_seed(0)
    n, L, K, E = tokens.numel(), replay.num_layers, replay.top_k, replay.num_experts
    foreign = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n * L)]).view(n, L, K)
    set_activation_checkpointing(family_model, True, context_fn=replay.checkpoint_context_fn)
    family_model.train()
    live = Recording(L, E)
    with replay.replay(ReplayBatch.from_tensor(foreign, E), live=live), tap.reading() as used:
        family_model(tokens).logits.float().logsumexp(-1).mean().backward()  # the recompute is not read again
    assert [len(c) for c in used.ids_per_layer] == [1] * L
    assert torch.equal(used.ids(), foreign)  # the experts computed with the replayed ids
    # the live top-k the replay overrode: at the first MoE layer (whose input the replay has not changed yet) it is
    # the free forward's routing (as sets: the order of a top-k may differ)
    overridden = live.batch().expert_ids.cpu()
    assert overridden.shape == (n, L, K) and not torch.equal(overridden, foreign)
    assert torch.equal(overridden[:, 0].sort(-1).values, live_ids[:, 0].sort(-1).values)
    replay.close()


def test_the_warm_up_stops_at_its_loss_bound_and_runs_to_its_cap_without_one(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="r3rl")
    kw = dict(sft_steps=9, num_rollout=1, replay=ReplayConfig())
    _run(tmp_path, "stop", sft_stop_loss=100.0, **kw)  # any loss is under it: stops once 5 steps are in
    assert "sft warm-up: 5 steps in" in caplog.text and "stopped at a mean loss <= 100 over the last 5" in caplog.text
    caplog.clear()
    _run(tmp_path, "cap", sft_stop_loss=0.0, **kw)  # the negative control: no loss is <= 0, the cap ends it
    assert "sft warm-up: 9 steps in" in caplog.text and "stopped at" not in caplog.text
