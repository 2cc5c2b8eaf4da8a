"""`r3rl check` and `r3rl init-model` as a user runs them: real subprocesses, real files, exit codes."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from r3rl.models import find_routers

SMALL = ["--batch-size", "4", "--prompt-len", "8", "--response-len", "12", "--device", "cpu"]
REPORT_KEYS = {"verdict", "threshold", "counts", "tokens_checked", "layers", "without_replay", "with_replay"}


def r3rl(*args, env=None):
    return subprocess.run([sys.executable, "-m", "r3rl.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def _report(tmp_path, *flags):
    path = tmp_path / "report.json"
    proc = r3rl("check", *SMALL, "--report", str(path), *flags)
    return proc, json.loads(path.read_text())


def test_check_passes_with_r3_and_writes_the_report(tmp_path):
    proc, rep = _report(tmp_path, "--use-rollout-routing-replay", "--enable-r3-correctness-check")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rep.keys() >= REPORT_KEYS and rep["verdict"] == "pass"
    assert rep["counts"]["replay_forward"] > 0 and rep["counts"]["replay_backward"] > 0
    assert rep["counts"]["checks"] == rep["counts"]["replay_forward"] + rep["counts"]["replay_backward"]
    assert len(rep["layers"]) == 4 and all(layer["zero_overlap"] == 0 for layer in rep["layers"])
    assert set(rep["layers"][0]) == {"layer", "tokens", "zero_overlap", "exact_match", "mean_overlap"}
    assert rep["with_replay"]["routing_mismatch"] == 0.0 and 0.0 <= rep["with_replay"]["router_live_mismatch"] <= 1.0
    assert set(rep["without_replay"]) == {"routing_mismatch", "mean_abs_logprob_diff", "k3_kl"}
    assert "R3 wrapper: replay_backward branch taken (rank 0, n_tokens=80, topk=4" in proc.stderr
    assert "R3 check (rank 0, stage replay_forward): n_tokens=" in proc.stderr


@pytest.mark.parametrize("fault", ["shift", "permute-layers"])
def test_check_fails_with_injected_fault(tmp_path, fault):
    proc, rep = _report(tmp_path, "--use-rollout-routing-replay", "--enable-r3-correctness-check",
                        "--inject-fault", fault)
    assert proc.returncode == 1
    assert rep["verdict"] == "fail" and rep["reason"].startswith("R3 mismatch tokens (")
    assert sum(layer["zero_overlap"] for layer in rep["layers"]) > 0
    assert rep["with_replay"]["routing_mismatch"] > 0  # read at the experts' inputs, against the trace as received
    assert "R3 mismatch (rank 0" in proc.stderr  # offending tokens shown before the failure


@pytest.mark.parametrize("fault", ["none", "shift"])
def test_check_under_compile_passes_and_a_fault_still_fails(tmp_path, fault):
    """`--compile`: the training forwards run through r3rl's regional torch.compile (bf16, inductor on the CPU)."""
    proc, rep = _report(tmp_path, "--use-rollout-routing-replay", "--enable-r3-correctness-check", "--compile",
                        "--inject-fault", fault)
    assert rep["compile"] is True
    if fault == "none":
        assert proc.returncode == 0 and rep["verdict"] == "pass", proc.stderr[-2000:]
        assert rep["counts"]["replay_backward"] == 4 and rep["with_replay"]["routing_mismatch"] == 0.0
        assert "R3 wrapper: replay_backward branch taken (rank 0, n_tokens=80, topk=4" in proc.stderr
    else:
        assert proc.returncode == 1 and rep["reason"].startswith("R3 mismatch tokens (")
        assert rep["with_replay"]["routing_mismatch"] > 0  # the experts, compiled, ran on the shifted ids


def test_r2_negative_control_fails(tmp_path):
    proc, rep = _report(tmp_path, "--use-routing-replay", "--inject-fault", "permute-layers")
    assert proc.returncode == 1 and rep["verdict"] == "fail"
    assert rep["replay_target_mismatch"] > 0.5 and "old-policy forward's" in rep["reason"]


def test_fault_fails_even_without_the_check(tmp_path):
    proc, rep = _report(tmp_path, "--use-rollout-routing-replay", "--inject-fault", "shift")
    assert proc.returncode == 1 and rep["counts"]["checks"] == 0
    assert "still differs from the rollout's" in rep["reason"]
    assert "R3 wrapper" not in proc.stderr  # evidence is silent while the check is off


def test_ci_test_enables_check_and_r2_runs(tmp_path):
    proc, rep = _report(tmp_path, "--use-routing-replay", "--ci-test")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rep["replay_mode"] == "r2" and rep["check_enabled"] and rep["counts"]["checks"] > 0
    assert "R3 check (rank 0, stage replay_backward)" in proc.stderr


def test_check_without_replay_mode_warns_and_fails_at_once(tmp_path):
    proc = r3rl("check", *SMALL, "--enable-r3-correctness-check", "--report", str(tmp_path / "r.json"))
    assert proc.returncode == 2 and "nothing to verify" in proc.stderr
    assert proc.stderr.count("--enable-r3-correctness-check has no effect") == 1
    assert not (tmp_path / "r.json").exists()  # refused before any work


@pytest.mark.parametrize("flags, message", [
    (("--device", "nope"), "--device 'nope' is not a torch device"),
    (("--temperature", "nan"), "temperature must be > 0"),
    (("--temperature", "inf"), "temperature must be > 0"),
    (("--dtype", "int8"), "unknown dtype 'int8'"),
    (("--report", "{file}/r.json"), "is a file, not a directory"),
])
def test_check_flag_values_are_refused_before_work(tmp_path, flags, message):
    (tmp_path / "f").write_text("")
    flags = [f.replace("{file}", str(tmp_path / "f")) for f in flags]
    proc = r3rl("check", "--use-rollout-routing-replay", *flags)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1000:]
    assert "Traceback" not in proc.stderr


def test_log_level_is_validated():
    proc = r3rl("--log-level", "NOPE", "check", "--use-rollout-routing-replay")
    assert proc.returncode == 2 and "--log-level 'NOPE'" in proc.stderr


def test_bad_flags_are_named(tmp_path):
    proc = r3rl("check", "--batch-size", "0", "--use-rollout-routing-replay")
    assert proc.returncode == 2 and "batch_size must be positive: got 0" in proc.stderr
    proc = r3rl("check", "--use-rollout-routing-replay", "--r3-check-threshold", "3")
    assert proc.returncode == 2 and "got 3.0" in proc.stderr
    proc = r3rl("check", "--use-rollout-routing-replay", "--dtype", "fp8")
    assert proc.returncode == 2 and "unknown dtype 'fp8'" in proc.stderr


def test_init_model_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "tiny"
    proc = r3rl("init-model", "--preset", "tiny-mixtral", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("héllo")["input_ids"]
    assert tok.decode(ids) == "héllo" and max(ids) < model.config.vocab_size
    sites = find_routers(model)
    assert len(sites) == 4 and sites[0].num_experts == 8 and sites[0].top_k == 2
    # peaked router init: logits have std ~2, not HF's ~0.02 * sqrt(hidden)
    h = torch.randn(256, model.config.hidden_size)
    assert 1.0 < (h @ sites[0].router.weight.T).std() < 4.0
    proc = r3rl("check", *SMALL, "--model", str(out), "--use-rollout-routing-replay", "--ci-test")
    assert proc.returncode == 0, proc.stderr[-2000:]
