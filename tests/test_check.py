import logging
import re

import pytest
import torch

from r3rl.check import ReplayCheck, Stage, StageStats, resolve_threshold
from r3rl.config import ReplayConfig, ReplayKind
from r3rl.replay import RoutingReplay

WRAPPER_RE = re.compile(
    r"^R3 wrapper: (replay_forward|replay_backward) branch taken \(rank \d+, n_tokens=\d+, topk=\d+, "
    r"replay_idx_sum=\d+\)$"
)
CHECK_RE = re.compile(r"^R3 check \(rank \d+, stage (replay_forward|replay_backward)\): n_tokens=\d+ mismatch=\d+ "
                      r"\(\d+\.\d{2}%\)$")


def _recorded(model, tokens):
    replay = RoutingReplay(model, check=ReplayCheck(4, 4))
    with replay.record() as rec:
        model(tokens)
    return replay, rec.batch()


def _shift(batch, batch_size):
    ids = batch.expert_ids.view(batch_size, -1, *batch.expert_ids.shape[1:])
    shifted = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1).reshape(batch.expert_ids.shape)
    return type(batch)(expert_ids=shifted, pad_value=batch.pad_value, has_pad=batch.has_pad,
                       num_experts=batch.num_experts)


def test_check_passes_on_correct_trace_and_logs_evidence(qwen3_model, tokens, caplog):
    replay, batch = _recorded(qwen3_model, tokens)
    with caplog.at_level(logging.INFO, logger="r3rl"), replay.replay(batch):
        qwen3_model(tokens)
        summary = replay.check.summary()
    assert summary.passed and summary.zero_overlap == 0 and summary.tokens_checked == tokens.numel() * 4
    assert all(layer.exact_match == tokens.numel() and layer.mean_overlap == 1.0 for layer in summary.layers)
    lines = [r.getMessage() for r in caplog.records if r.name == "r3rl"]
    wrapper = [line for line in lines if line.startswith("R3 wrapper")]
    checks = [line for line in lines if line.startswith("R3 check")]
    assert len(wrapper) == 4 and all(WRAPPER_RE.match(line) for line in wrapper), wrapper
    assert checks == [f"R3 check (rank 0, stage replay_forward): n_tokens={tokens.numel() * 4} mismatch=0 (0.00%)"]
    sums = [int(line.rsplit("=", 1)[1][:-1]) for line in wrapper]
    assert sums == [int(batch.expert_ids[:, layer].sum()) for layer in range(4)]
    assert f"n_tokens={tokens.numel()}, topk=4" in wrapper[0]
    replay.close()


def test_check_fails_on_shifted_trace_with_examples(qwen3_model, tokens, caplog):
    replay, batch = _recorded(qwen3_model, tokens)
    with caplog.at_level(logging.INFO), replay.replay(_shift(batch, tokens.shape[0])):
        qwen3_model(tokens)
        with pytest.raises(AssertionError, match=r"^R3 mismatch tokens \(\d+\) > threshold \(\d+\.\d+\)$"):
            replay.check.summary()
    examples = [r.getMessage() for r in caplog.records if r.getMessage().startswith("R3 mismatch (rank")]
    assert 1 <= len(examples) <= 5
    assert "orig=" in examples[0] and "replay=" in examples[0] and ">tok" in examples[0]
    assert any(CHECK_RE.match(r.getMessage()) for r in caplog.records)
    replay.close()


def test_threshold_governs_the_verdict(qwen3_model, tokens):
    replay, batch = _recorded(qwen3_model, tokens)
    replay.check.threshold = 1.0  # everything allowed: the same shifted trace now passes
    with replay.replay(_shift(batch, tokens.shape[0])):
        qwen3_model(tokens)
    summary = replay.check.summary()
    assert summary.passed and summary.zero_overlap > 0
    replay.close()


def test_pad_rows_are_excluded_from_the_count():
    check = ReplayCheck(1, 2)
    live = torch.tensor([[0, 1], [2, 3], [4, 5]])
    replay = torch.tensor([[0, 1], [6, 7], [8, 9]])
    valid = torch.tensor([[True, True], [True, True], [False, False]])
    check.observe(Stage.REPLAY_FORWARD, 0, live, replay, valid)
    s = check.summary(raise_on_fail=False)
    assert (s.tokens_checked, s.zero_overlap, s.layers[0].exact_match) == (2, 1, 1)
    assert s.layers[0].mean_overlap == 0.5 and not s.passed


def test_observe_never_syncs_to_host(monkeypatch):
    check = ReplayCheck(2, 4)
    live, replay = torch.randint(0, 16, (32, 4)), torch.randint(0, 16, (32, 4))

    def boom(*a, **k):
        raise AssertionError("host sync in the check's hot path")

    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "cpu", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    check.observe(Stage.REPLAY_FORWARD, 1, live, replay, None)
    check.observe(Stage.REPLAY_BACKWARD, 1, live, replay, replay != 255)
    monkeypatch.undo()
    assert check.summary(raise_on_fail=False).stages["replay_backward"].tokens == 32


def test_threshold_sources(monkeypatch):
    monkeypatch.delenv("R3RL_TEST_R3_THRESHOLD", raising=False)
    monkeypatch.delenv("MILES_TEST_R3_THRESHOLD", raising=False)
    assert resolve_threshold() == 1e-2
    monkeypatch.setenv("MILES_TEST_R3_THRESHOLD", "0.2")
    assert resolve_threshold() == 0.2
    monkeypatch.setenv("R3RL_TEST_R3_THRESHOLD", "0.3")
    assert resolve_threshold() == 0.3
    assert resolve_threshold(0.05) == 0.05
    monkeypatch.setenv("R3RL_TEST_R3_THRESHOLD", "lots")
    with pytest.raises(ValueError, match="R3RL_TEST_R3_THRESHOLD must be a number"):
        resolve_threshold()
    with pytest.raises(ValueError, match="fraction of tokens in \\[0, 1\\]: got 2.0"):
        resolve_threshold(2.0)


def test_flag_logic(caplog):
    assert ReplayConfig(use_rollout_routing_replay=True, enable_r3_correctness_check=True).check_enabled
    ci = ReplayConfig(use_routing_replay=True, ci_test=True)
    assert ci.check_enabled and ci.strict and ci.kind is ReplayKind.R2
    assert not ReplayConfig(use_rollout_routing_replay=True).check_enabled
    assert ReplayConfig(use_rollout_routing_replay=True, use_routing_replay=True).kind is ReplayKind.R3
    with caplog.at_level(logging.WARNING):
        cfg = ReplayConfig(enable_r3_correctness_check=True)
    assert not cfg.check_enabled
    warnings = [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
    assert warnings == ["--enable-r3-correctness-check has no effect: the R3 correctness check needs a replay mode "
                        "(--use-rollout-routing-replay or --use-routing-replay)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert not ReplayConfig(ci_test=True).check_enabled
    assert "--ci-test has no effect" in caplog.text


def test_failure_message_names_the_failing_stage_and_examples_survive_later_calls(caplog):
    check = ReplayCheck(1, 2, threshold=0.1)
    ok = torch.tensor([[0, 1]] * 100)
    check.observe(Stage.REPLAY_FORWARD, 0, ok, ok)  # 100 clean forward rows
    bad = torch.tensor([[2, 3]] * 10)
    check.observe(Stage.REPLAY_BACKWARD, 0, ok[:10], bad)  # 10 of 10 backward rows have zero overlap
    check.observe(Stage.REPLAY_BACKWARD, 0, ok[:10], ok[:10])  # a later clean call
    with caplog.at_level(logging.WARNING), pytest.raises(AssertionError) as err:
        check.summary()
    assert str(err.value) == "R3 mismatch tokens (10) > threshold (2.00)"  # the backward stage: 10 > 0.1 * 20
    examples = [r.getMessage() for r in caplog.records if r.getMessage().startswith("R3 mismatch (rank")]
    assert len(examples) == 5 and "stage replay_backward, layer 0, token 0" in examples[0]


def test_all_reduce_makes_counters_global(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        check = ReplayCheck(2, 2)
        check.calls.add(Stage.REPLAY_FORWARD, 1, 1)  # what RoutingReplay counts for this call
        check.observe(Stage.REPLAY_FORWARD, 1, torch.tensor([[0, 1]]), torch.tensor([[2, 3]]))
        check.all_reduce()
        s = check.summary(raise_on_fail=False)
        assert s.rank == 0 and s.stages["replay_forward"] == StageStats(tokens=1, zero_overlap=1, calls=1)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_replay_select_and_check_hot_path_has_no_cuda_sync():
    """Our per-call code (pad fill, live top-k, observe) must not sync; HF's own forward is not ours to police."""
    from r3rl.replay import fill_pad_slots

    g = torch.Generator(device="cuda").manual_seed(0)
    probs = torch.rand(4096, 128, device="cuda", generator=g).softmax(-1)
    ids = torch.topk(torch.rand(4096, 128, device="cuda", generator=g), 8).indices
    valid = torch.rand(4096, 8, device="cuda", generator=g) > 0.1
    check = ReplayCheck(2, 8, device="cuda")
    for mode in ("default", "error"):  # warm-up, then the real pass with syncs as errors
        torch.cuda.set_sync_debug_mode(mode)
        try:
            filled = fill_pad_slots(torch.where(valid, ids, 255), valid, probs)
            live = torch.topk(probs, 8, dim=-1).indices
            check.observe(Stage.REPLAY_FORWARD, 1, live, filled, valid)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    stats = check.summary(raise_on_fail=False).stages["replay_forward"]
    assert stats.calls == 0 and stats.tokens == int(valid.any(-1).sum()) * 2  # calls are the replay's to count


def test_observe_rejects_a_top_k_it_was_not_sized_for_and_keeps_bounded_examples():
    check = ReplayCheck(1, 4)
    with pytest.raises(ValueError, match="ReplayCheck\\(top_k=4\\) got a router call with top_k=2 at layer 0"):
        check.observe(Stage.REPLAY_FORWARD, 0, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long))
    ids = torch.arange(4).expand(8, 4)
    for _ in range(50):  # many micro-batches: the failure report keeps the first and the latest call only
        check.observe(Stage.REPLAY_FORWARD, 0, ids, ids)
    assert [len(v) for v in check._examples.values()] == [2]
