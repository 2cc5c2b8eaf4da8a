"""`--rollout-url` against vLLM, fast: the client decodes answers recorded from a real vLLM 0.32 server
(`data/vllm_0.32.0/`), and trains with R3 against a vLLM-like HTTP server on 127.0.0.1 that answers in the same format
(`_vllm_like.py`). The real server runs in `test_vllm_real.py`.

Negative controls: a route array of the wrong shape, missing routes, rows that ignore routed_experts_prompt_start,
all-zero routes, a server that keeps its old weight version, one without the dev endpoints, and log-probs at the
wrong temperature are each refused by name."""

from __future__ import annotations

import asyncio
import base64
import copy
import io

import numpy as np
import pytest
from _vllm_like import VLLMLikeServer, recorded

from r3rl.config import ReplayConfig
from r3rl.episodes import EnvStep, run_episodes
from r3rl.models.presets import make_model
from r3rl.rollout.engine.messages import SamplingParams
from r3rl.rollout.net.backend import HTTPBackend, WeightSyncError
from r3rl.rollout.net.client import ModelShape, RolloutRequestError, RolloutServerError
from r3rl.rollout.net.fleet import FleetBackend
from r3rl.rollout.net.vllm_client import VLLMClient, decode_vllm_choice, detect_engine
from r3rl.trace import TraceError
from r3rl.train.config import TrainConfig
from r3rl.train.trainer import Trainer

PRESET = "tiny-qwen3-moe"
SHAPE = ModelShape(num_layers=4, top_k=4, num_experts=16)  # the recorded model's
PROMPT = [257, 72, 105, 33, 10, 44, 55, 66]  # the recorded requests' prompt


def _choice(name: str = "completion.json") -> dict:
    return recorded(name)["choices"][0]


def _npy(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, arr)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _routes(choice: dict) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(choice["routed_experts"])))


# --- recorded real answers ------------------------------------------------------------------------------------------
def test_a_recorded_vllm_answer_decodes_into_a_sample_with_its_trace():
    choice = _choice()
    s = decode_vllm_choice(choice, PROMPT, shape=SHAPE, index=0, weight_version="3", weight_version_start="3")
    assert s.response_ids == choice["token_ids"] and len(s.response_ids) == 6
    assert s.rollout_logprobs == choice["logprobs"]["token_logprobs"]
    assert s.trace.num_rows == len(PROMPT) + 6 - 1 and s.weight_version == 3 and s.finish_reason == "length"
    np.testing.assert_array_equal(s.trace.expert_ids.astype(np.int64), _routes(choice).astype(np.int64))


def test_a_recorded_later_turn_holds_the_rows_from_its_start_as_sets():
    full = decode_vllm_choice(_choice(), PROMPT, shape=SHAPE)
    later = decode_vllm_choice(_choice("completion_start5.json"), PROMPT, shape=SHAPE, routed_experts_start_len=5)
    assert later.trace.num_rows == full.trace.num_rows - 5 and later.routed_experts_start_len == 5
    np.testing.assert_array_equal(np.sort(later.trace.expert_ids, -1), np.sort(full.trace.expert_ids[5:], -1))


@pytest.mark.parametrize(("mutate", "error", "match"), [
    (lambda c: c.update(routed_experts=_npy(_routes(c)[:, :3])), TraceError,
     r"routed_experts shape \(13, 3, 4\), expected \(rows, layers, top_k\)=\(13, 4, 4\)"),
    (lambda c: c.update(routed_experts=None), RolloutServerError,
     "routed_experts is missing .*--enable-return-routed-experts"),
    (lambda c: c.update(routed_experts=_npy(_routes(c)[1:])), TraceError, r"routed_experts shape \(12, 4, 4\)"),
    (lambda c: c.update(routed_experts=_npy(np.zeros_like(_routes(c)))), TraceError,
     "duplicate expert in a trace row"),
    (lambda c: c.update(routed_experts=_npy(_routes(c).astype(np.float32))), TraceError,
     "dtype float32 is not an expert-id dtype"),
    (lambda c: c.update(routed_experts=base64.b64encode(b"not npy").decode()), TraceError,
     "not base64 of .npy bytes"),
    (lambda c: c.update(routed_experts=_npy(np.where(_routes(c) == _routes(c)[0, 0, 0], 16, _routes(c)))),
     TraceError, "expert id"),
    (lambda c: c["logprobs"]["token_logprobs"].pop(), RolloutServerError,
     "token_logprobs must hold one log-prob per output token: got 5, expected 6"),
    (lambda c: c.pop("token_ids"), RolloutServerError, "token_ids is missing .*return_token_ids"),
    (lambda c: c.update(prompt_token_ids=PROMPT[1:]), RolloutServerError, "prompt_token_ids differ"),
    (lambda c: c.update(finish_reason="abort"), RolloutServerError, "finish_reason='abort'"),
])
def test_a_broken_vllm_answer_is_refused_by_name(mutate, error, match):
    choice = copy.deepcopy(_choice())
    mutate(choice)
    with pytest.raises(error, match=match):
        decode_vllm_choice(choice, PROMPT, shape=SHAPE, index=0)


def test_rows_that_ignore_routed_experts_prompt_start_are_refused():
    with pytest.raises(TraceError, match="server ignored routed_experts_prompt_start=5"):
        decode_vllm_choice(_choice(), PROMPT, shape=SHAPE, routed_experts_start_len=5)


def test_a_model_with_dense_layers_keeps_only_its_moe_columns():
    choice = copy.deepcopy(_choice())
    wide = np.zeros((13, 5, 4), dtype=np.uint8)  # decoder layer 0 dense: vLLM's column of zeros
    wide[:, 1:] = _routes(choice)
    choice["routed_experts"] = _npy(wide)
    shape = ModelShape(num_layers=4, top_k=4, num_experts=16, moe_layers=(1, 2, 3, 4), num_decoder_layers=5)
    s = decode_vllm_choice(choice, PROMPT, shape=shape)
    np.testing.assert_array_equal(s.trace.expert_ids.astype(np.int64), _routes(_choice()).astype(np.int64))


# --- a vLLM-like server on 127.0.0.1 --------------------------------------------------------------------------------
def test_the_engine_is_detected():
    from _sglang_like import SGLangLikeServer

    model = make_model(PRESET)
    with VLLMLikeServer(model) as vllm, SGLangLikeServer(model) as sglang:
        assert asyncio.run(detect_engine(vllm.url)) == "vllm"
        assert asyncio.run(detect_engine(sglang.url)) == "sglang"


def test_r3_training_against_a_vllm_like_server_passes_and_syncs_every_step(tmp_path):
    with VLLMLikeServer(make_model(PRESET)) as srv:
        cfg = TrainConfig(replay=ReplayConfig(use_rollout_routing_replay=True, enable_r3_correctness_check=True),
                          preset=PRESET, rollout_url=[srv.url], rollout_engine="vllm", rollout_batch_size=2,
                          n_samples_per_prompt=2, rollout_max_response_len=4, num_rollout=2, sft_steps=1,
                          sft_batch_size=4, micro_batch_size=4, eval_interval=None, progress=False,
                          run_dir=str(tmp_path / "run"))
        summary = Trainer(cfg).run()
        assert srv.weight_version == "2" and len(srv.reloads) == 3  # the start, then every step
        rollouts = [r for r in srv.requests if "prompt_logprobs" not in r]  # not the served-weights probes
        assert len(srv.requests) - len(rollouts) == 3  # a probe after every sync
        seeds = [r["seed"] for r in rollouts]
        assert len(set(seeds)) == len(seeds) == 2 * 2 * 2  # one request per sample, each with its own seed
        assert all(r["return_token_ids"] and r["logprobs"] == 0 and r["ignore_eos"] for r in rollouts)
    assert summary["verdict"] == "pass" and summary["steps"] == 2 and summary["routing_mismatch_mean"] == 0.0


def test_episodes_ask_vllm_for_the_rows_they_lack(tmp_path):
    class Echo:
        def reset(self):
            return [257, 1, 2, 3]

        def step(self, response_ids):
            return EnvStep(observation_ids=[7, 8])

    model = make_model(PRESET)
    with VLLMLikeServer(model) as srv:
        backend = HTTPBackend(srv.url, model_shape=ModelShape.of_model(model))
        try:
            [ep] = run_episodes(backend, [Echo()], SamplingParams(max_new_tokens=3, seed=1), max_turns=2)
        finally:
            backend.close()
        assert [r.get("routed_experts_prompt_start", 0) for r in srv.requests] == [0, 4 + 3 - 1]
    assert ep.trace.num_rows == len(ep.prompt_ids) + len(ep.response_ids) - 1
    with VLLMLikeServer(model, fault="wrong_rows") as srv:  # negative control: a server that ignores the start
        backend = HTTPBackend(srv.url, model_shape=ModelShape.of_model(model))
        try:
            with pytest.raises(TraceError, match="ignored routed_experts_prompt_start=6"):
                run_episodes(backend, [Echo()], SamplingParams(max_new_tokens=3, seed=1), max_turns=2)
        finally:
            backend.close()


@pytest.mark.parametrize(("fault", "error", "match"), [
    ("bad_shape", TraceError, r"routed_experts shape \(\d+, 3, 4\)"),
    ("missing_routes", RolloutServerError, "routed_experts is missing"),
    ("zeros", TraceError, "duplicate expert in a trace row"),
])
def test_a_faulty_vllm_server_fails_the_rollout(fault, error, match):
    model = make_model(PRESET)
    with VLLMLikeServer(model, fault=fault) as srv:
        backend = HTTPBackend(srv.url, model_shape=ModelShape.of_model(model))
        try:
            with pytest.raises(error, match=match):
                backend.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, seed=0))
        finally:
            backend.close()


def test_weight_sync_keeps_the_version_check(tmp_path):
    model = make_model(PRESET)
    with VLLMLikeServer(model, fault="ignore_version") as srv:
        backend = HTTPBackend(srv.url, model_shape=ModelShape.of_model(model), weights_dir=tmp_path)
        try:
            with pytest.raises(WeightSyncError, match=r"reports weight_version='default' .* expected 1"):
                backend.update_weights(model, version=1)
        finally:
            backend.close()
    with VLLMLikeServer(model, dev_mode=False) as srv:
        backend = HTTPBackend(srv.url, model_shape=ModelShape.of_model(model), weights_dir=tmp_path)
        try:
            with pytest.raises(RolloutRequestError, match="VLLM_SERVER_DEV_MODE=1"):
                backend.update_weights(model, version=1)
        finally:
            backend.close()
    with VLLMLikeServer(model, fault="stale_reload") as srv:  # says it reloaded, serves the old weights
        backend = HTTPBackend(srv.url, model_shape=ModelShape.of_model(model), weights_dir=tmp_path)
        try:
            trained = make_model(PRESET, seed=1)
            with pytest.raises(WeightSyncError, match=r"does not serve the weights just written: probe log-probs "
                                                      r"differ by [\d.e-]+ on average .* allowed 0.001 for a float32"):
                backend.update_weights(trained, version=1)
            backend.update_weights(model, version=2)  # the weights it does serve pass the check
        finally:
            backend.close()
    with VLLMLikeServer(model) as srv:
        client = VLLMClient(srv.url, model_shape=ModelShape.of_model(model))
        with pytest.raises(RolloutRequestError, match="not an HF safetensors checkpoint"):
            asyncio.run(client.update_weights_from_disk(str(tmp_path / "missing")))
        assert srv.reloads == []  # never sent: a failed reload kills vLLM's engine


def test_log_probs_at_another_temperature_than_the_trainers_are_refused():
    model = make_model(PRESET)
    with VLLMLikeServer(model) as srv:  # answers raw log-probs, as vLLM's default --logprobs-mode
        backend = HTTPBackend(srv.url, model_shape=ModelShape.of_model(model), logprobs_at_temperature=True)
        try:
            with pytest.raises(RolloutRequestError, match="returns log-probs at temperature 1.0 .*--logprobs-mode "
                                                          "processed_logprobs"):
                backend.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, temperature=0.7, seed=0))
            [s] = backend.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, temperature=1.0, seed=0))
            assert s.logprob_temperature == 1.0
        finally:
            backend.close()


def test_processed_log_probs_are_labelled_at_the_sampling_temperature():
    model = make_model(PRESET)
    with VLLMLikeServer(model, logprobs_mode="processed_logprobs") as srv:
        backend = HTTPBackend(srv.url, model_shape=ModelShape.of_model(model), logprobs_at_temperature=True)
        try:
            [s] = backend.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, temperature=0.7, seed=0))
            assert s.logprob_temperature == 0.7 and backend.client._logprobs_mode == "processed_logprobs"
            with pytest.raises(RolloutRequestError, match="renormalized after the top-k/top-p cut"):
                backend.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, temperature=0.7, top_p=0.9, seed=0))
        finally:
            backend.close()


@pytest.mark.parametrize(("fault", "verdict"), [("none", "pass"), ("shift", "fail")])
def test_r3rl_check_against_a_vllm_like_server(fault, verdict):
    from r3rl.commands.check import run_check
    from r3rl.config import CheckRunConfig, Fault

    with VLLMLikeServer(make_model(PRESET, seed=3)) as srv:  # serves other weights until the check syncs its own
        cfg = CheckRunConfig(replay=ReplayConfig(use_rollout_routing_replay=True, enable_r3_correctness_check=True),
                             preset=PRESET, dtype="float32", batch_size=4, prompt_len=8, response_len=6,
                             rollout_url=srv.url, rollout_engine="vllm", inject_fault=Fault(fault))
        report = run_check(cfg)
        assert srv.reloads and srv.weight_version == "1"
    assert report["verdict"] == verdict and report["rollout"] == srv.url  # shift: the negative control fails


def test_a_fleet_of_vllm_servers_spreads_and_syncs(tmp_path):
    model = make_model(PRESET)
    with VLLMLikeServer(model) as a, VLLMLikeServer(model) as b:
        fleet = FleetBackend([a.url, b.url], weights_dir=tmp_path, model_shape=ModelShape.of_model(model))
        try:
            samples = fleet.generate([[1, 2, 3], [4, 5, 6]], SamplingParams(max_new_tokens=3, seed=0),
                                     n_samples_per_prompt=2)
            assert len(samples) == 4 and all(s.trace is not None for s in samples)
            fleet.update_weights(model, version=5)
            assert a.weight_version == b.weight_version == "5" and fleet.weight_version == 5
        finally:
            fleet.close()


def _sharp(seed: int):
    """A policy with a trained policy's sharp logits (the head scaled up), in fp32."""
    import torch

    model = make_model(PRESET, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)
    return model


def test_a_bf16_server_of_a_sharp_policy_passes_the_weights_check_and_other_weights_fail_it():
    import torch

    policy = _sharp(0)
    rounded = copy.deepcopy(policy).to(torch.bfloat16)  # a bf16 server: bf16 weights, bf16 compute
    with VLLMLikeServer(rounded, dtype="bfloat16") as srv:
        client = VLLMClient(srv.url, model_shape=ModelShape.of_model(policy))
        mean = asyncio.run(client.check_served_weights(policy))
    assert mean > 0.05  # past the fixed bf16 bound: the check refused these right weights before
    with VLLMLikeServer(_sharp(1).to(torch.bfloat16), dtype="bfloat16") as srv:  # other weights
        client = VLLMClient(srv.url, model_shape=ModelShape.of_model(policy))
        with pytest.raises(WeightSyncError, match=r"differ by [\d.e-]+ on average .* for a half server \(2x the "):
            asyncio.run(client.check_served_weights(policy))
