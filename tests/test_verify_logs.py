"""`verify_logs`: a real replayed forward + recomputed backward logs evidence that passes; each failure reason,
as a negative control, fails with its reason; miles-style prefixed lines parse."""

import dataclasses
import json
import logging

import pytest
import torch

from r3rl.check import ReplayCheck
from r3rl.commands.verify_logs import verify_logs
from r3rl.models.loading import set_activation_checkpointing
from r3rl.replay import RoutingReplay


@pytest.fixture(autouse=True)
def _no_threshold_env(monkeypatch):
    monkeypatch.delenv("R3RL_TEST_R3_THRESHOLD", raising=False)
    monkeypatch.delenv("MILES_TEST_R3_THRESHOLD", raising=False)


def _real_log(model, tokens, path, *, shift: bool) -> None:
    """Replay a recorded trace (or a shifted one) through a checkpointed forward + backward; the check's evidence
    goes to `path` through a logging handler with a timestamp/logger prefix, as a real run writes it."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    evidence = logging.getLogger("r3rl")
    evidence.addHandler(handler)
    old_level = evidence.level
    evidence.setLevel(logging.INFO)
    try:
        model.train()
        replay = RoutingReplay(model, check=ReplayCheck(4, 4))
        with replay.record() as rec:
            model(tokens)
        batch = rec.batch()
        if shift:
            ids = batch.expert_ids.view(tokens.shape[0], -1, *batch.expert_ids.shape[1:])
            shifted = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1).reshape(batch.expert_ids.shape)
            batch = dataclasses.replace(batch, expert_ids=shifted)
        set_activation_checkpointing(model, True, context_fn=replay.checkpoint_context_fn)
        with replay.replay(batch):
            model(tokens).logits.float().logsumexp(-1).mean().backward()
        try:
            replay.check.summary()
        except AssertionError as e:
            logging.getLogger("r3rl").error("step failed: %s", e)
        set_activation_checkpointing(model, False)
        replay.close()
    finally:
        evidence.removeHandler(handler)
        evidence.setLevel(old_level)
        handler.close()


def _lines(rank, *, fwd=True, bwd=True, check=True, n=64, mismatch=0):
    out = []
    if fwd:
        out.append(f"R3 wrapper: replay_forward branch taken (rank {rank}, n_tokens={n}, topk=4, replay_idx_sum=123)")
    if bwd:
        out.append(f"R3 wrapper: replay_backward branch taken (rank {rank}, n_tokens={n}, topk=4, replay_idx_sum=123)")
    if check:
        for stage in ("replay_forward", "replay_backward"):
            out.append(f"R3 check (rank {rank}, stage {stage}): n_tokens={n * 4} mismatch={mismatch} "
                       f"({100 * mismatch / max(n * 4, 1):.2f}%)")
    return out


def _write(path, lines):
    path.write_text("".join(f"2026-11-28 10:00:00 INFO r3rl: {line}\n" for line in lines))
    return path


def test_real_run_log_passes(qwen3_model, tokens, tmp_path):
    log = tmp_path / "rank0.log"
    _real_log(qwen3_model, tokens, log, shift=False)
    report = verify_logs([log])
    assert report["verdict"] == "pass", report["reasons"]
    r0 = report["ranks"]["0"]
    assert r0["wrapper"]["replay_forward"]["lines"] == r0["wrapper"]["replay_backward"]["lines"] == 4  # per layer
    assert r0["wrapper"]["replay_forward"]["n_tokens"] == tokens.numel() * 4
    assert r0["check"]["replay_backward"] == {"lines": 1, "n_tokens": tokens.numel() * 4, "mismatch": 0,
                                              "max_fraction": 0.0}
    assert report["files"][0]["evidence_lines"] == 10 and report["threshold"] == 1e-2
    json.dumps(report)  # JSON-ready


def test_real_shifted_trace_log_fails(qwen3_model, tokens, tmp_path):
    """Negative control: a trace shifted by one token logs above-threshold check lines and the failure line."""
    log = tmp_path / "rank0.log"
    _real_log(qwen3_model, tokens, log, shift=True)
    report = verify_logs([log])
    assert report["verdict"] == "fail"
    assert any("above the threshold 0.01" in r for r in report["reasons"])
    assert any("'R3 mismatch tokens' failure line" in r for r in report["reasons"])
    assert report["failures"][0]["where"].startswith(f"{log}:")


def test_two_ranks_in_two_files_pass(tmp_path):
    report = verify_logs([_write(tmp_path / "r0.log", _lines(0)), _write(tmp_path / "r1.log", _lines(1))])
    assert report["verdict"] == "pass" and report["reasons"] == [] and sorted(report["ranks"]) == ["0", "1"]


def test_two_ranks_in_one_file_pass(tmp_path):
    assert verify_logs([_write(tmp_path / "all.log", _lines(0) + _lines(1))])["verdict"] == "pass"


def test_missing_backward_on_rank_1_fails(tmp_path):
    report = verify_logs([_write(tmp_path / "all.log", _lines(0) + _lines(1, bwd=False))])
    assert report["verdict"] == "fail"
    assert report["reasons"] == ["rank 1: no 'replay_backward' wrapper line"]


def test_missing_check_line_fails(tmp_path):
    report = verify_logs([_write(tmp_path / "all.log", _lines(0) + _lines(1, check=False))])
    assert report["reasons"] == ["rank 1: no R3 check line"]


def test_zero_tokens_fails(tmp_path):
    report = verify_logs([_write(tmp_path / "all.log", _lines(0, n=0))])
    assert report["verdict"] == "fail"
    assert "rank 0: 'replay_forward' wrapper lines replayed n_tokens=0" in report["reasons"]
    assert "rank 0: stage replay_backward check lines checked n_tokens=0" in report["reasons"]


def test_above_threshold_line_fails_and_threshold_sources(tmp_path, monkeypatch):
    log = _write(tmp_path / "r0.log", _lines(0, n=100, mismatch=8))  # 8 / 400 = 2% > 1%
    report = verify_logs([log])
    assert report["verdict"] == "fail"
    assert report["reasons"] == [f"2 check line(s) above the threshold 0.01; worst at {log}:3: mismatch=8 of "
                                 "n_tokens=400 (0.02)"]
    assert verify_logs([log], threshold=0.05)["verdict"] == "pass"
    assert verify_logs([log], threshold=0.02)["verdict"] == "pass"  # at the threshold: the check's own rule (>)
    monkeypatch.setenv("MILES_TEST_R3_THRESHOLD", "0.05")
    assert verify_logs([log])["verdict"] == "pass"
    monkeypatch.setenv("R3RL_TEST_R3_THRESHOLD", "0.001")  # r3rl's variable wins over miles'
    assert verify_logs([log])["verdict"] == "fail"
    with pytest.raises(ValueError, match=r"--threshold is a fraction of tokens in \[0, 1\]: got 2"):
        verify_logs([log], threshold=2)
    with pytest.raises(ValueError, match=r"--threshold is a fraction of tokens in \[0, 1\]: got nan"):
        verify_logs([log], threshold=float("nan"))
    monkeypatch.setenv("R3RL_TEST_R3_THRESHOLD", "lots")
    with pytest.raises(ValueError, match=r"R3RL_TEST_R3_THRESHOLD must be a number: got 'lots'"):
        verify_logs([log])


def test_failure_line_fails(tmp_path):
    lines = _lines(0) + ["Traceback (most recent call last):", "AssertionError: R3 mismatch tokens (12) > threshold "
                         "(2.56)"]
    report = verify_logs([_write(tmp_path / "r0.log", lines)])
    assert report["verdict"] == "fail"
    assert report["failures"] == [{"where": f"{tmp_path / 'r0.log'}:6", "text": "R3 mismatch tokens (12) > threshold "
                                                                              "(2.56)"}]


def test_no_lines_at_all_fails(tmp_path):
    log = tmp_path / "empty.log"
    log.write_text("INFO step 0 reward_mean=0.5\n")
    report = verify_logs([log])
    assert report["verdict"] == "fail" and report["reasons"] == [f"no R3 wrapper or check lines in {log}"]


def test_unreadable_file_fails(tmp_path):
    report = verify_logs([_write(tmp_path / "r0.log", _lines(0)), tmp_path / "missing.log"])
    assert report["verdict"] == "fail"
    assert report["reasons"][0].startswith(f"cannot read {tmp_path / 'missing.log'}: No such file")
    with pytest.raises(ValueError, match="at least one log file"):
        verify_logs([])


@pytest.mark.parametrize("bad", [
    "R3 check (rank 0, stage replay_forward): n_tokens=100 mismatch=0 (5.00%)",  # percent disagrees with M/N
    "R3 check (rank 0, stage replay_forward): n_tokens=100 mismatch=200 (200.00%)",  # more mismatches than tokens
    "R3 wrapper: replay_forward branch taken (rank 0, n_tokens=64, topk=4)",  # a field missing
    "R3 check (rank 0, stage recompute): n_tokens=100 mismatch=0 (0.00%)",  # unknown stage
])
def test_malformed_contract_line_fails(tmp_path, bad):
    log = _write(tmp_path / "r0.log", [*_lines(0), bad])
    report = verify_logs([log])
    assert report["verdict"] == "fail"
    assert report["malformed"][0]["where"] == f"{log}:5"
    assert any("malformed evidence line" in r for r in report["reasons"])


def test_miles_style_prefixed_lines(tmp_path):
    """miles' logs: ray worker prefixes, file:line logger prefixes, a rank per actor, all in one driver log."""
    prefixes = ["(MegatronTrainRayActor pid=4242) [2026-11-28 10:00:00] replay_utils.py:88 - ",
                "(MegatronTrainRayActor pid=4243, ip=10.0.0.2) [2026-11-28 10:00:01 TP1] INFO ",
                "\x1b[36m(MegatronTrainRayActor pid=4244)\x1b[0m "]
    lines = [prefixes[rank] + line for rank in range(3) for line in _lines(rank)]
    log = tmp_path / "driver.log"
    log.write_text("\n".join(["ray started", *lines, "done"]) + "\n")
    report = verify_logs([log])
    assert report["verdict"] == "pass", report["reasons"]
    assert sorted(report["ranks"]) == ["0", "1", "2"]
    log.write_text("\n".join(lines[:-3]) + "\n")  # rank 2's lines cut after its forward wrapper
    assert verify_logs([log])["reasons"] == ["rank 2: no 'replay_backward' wrapper line", "rank 2: no R3 check line"]
