"""`--rollout-url` against a server that answers as SGLang does (a real HTTP server on 127.0.0.1: `/model_info`
without the MoE shape, `routed_experts` with one column per decoder layer): the trainer passes the local policy's
`ModelShape` (layers, top-k, experts, which decoder layers are MoE), and R3 trains on the decoded traces.

Negative controls: without a local shape the server is refused by name; a shape that ignores the dense layer cannot
decode SGLang's trace."""

import pytest
from _sglang_like import SGLangLikeServer

from r3rl.config import ReplayConfig
from r3rl.models.presets import make_model
from r3rl.rollout.engine.messages import SamplingParams
from r3rl.rollout.net.backend import HTTPBackend
from r3rl.rollout.net.client import ModelShape, RolloutRequestError
from r3rl.trace import TraceError
from r3rl.train.config import TrainConfig
from r3rl.train.trainer import Trainer

DENSE_FIRST = "tiny-deepseek-v3"  # decoder layer 0 is dense, layers 1-3 are MoE


def test_model_shape_of_a_local_model_names_its_moe_decoder_layers():
    assert ModelShape.of_model(make_model(DENSE_FIRST)) == ModelShape(
        num_layers=3, top_k=4, num_experts=16, moe_layers=(1, 2, 3), num_decoder_layers=4)
    assert ModelShape.of_model(make_model("tiny-qwen3-moe")).moe_layers is None  # every decoder layer is MoE


def test_r3_training_against_a_sglang_like_server_uses_the_local_shape(tmp_path):
    with SGLangLikeServer(make_model(DENSE_FIRST)) as srv:
        cfg = TrainConfig(replay=ReplayConfig(use_rollout_routing_replay=True, enable_r3_correctness_check=True),
                          preset=DENSE_FIRST, rollout_url=[srv.url], rollout_batch_size=2, n_samples_per_prompt=2,
                          rollout_max_response_len=4, num_rollout=2, sft_steps=1, sft_batch_size=4,
                          micro_batch_size=4, eval_interval=None, progress=False, run_dir=str(tmp_path / "run"))
        summary = Trainer(cfg).run()
        assert srv.model_info_calls >= 1 and srv.weight_version == "2"  # asked for a shape; synced every step
    assert summary["verdict"] == "pass" and summary["steps"] == 2
    assert summary["tokens_checked"]["replay_forward"] > 0


def test_a_sglang_server_without_a_local_shape_or_with_a_wrong_one_is_refused():
    model = make_model(DENSE_FIRST)
    sampling = SamplingParams(max_new_tokens=3, seed=0)
    with SGLangLikeServer(model) as srv:
        backend = HTTPBackend(srv.url)
        try:
            with pytest.raises(RolloutRequestError, match=r"/model_info has no MoE shape \(fields \[.*\]\), as "
                                                          r"SGLang's: pass the local policy's"):
                backend.generate([[1, 2, 3]], sampling)
        finally:
            backend.close()
        flat = ModelShape(num_layers=3, top_k=4, num_experts=16)  # forgets the dense layer's column
        backend = HTTPBackend(srv.url, model_shape=flat)
        try:
            with pytest.raises(TraceError, match="routed_experts byte count is not a whole number of rows"):
                backend.generate([[1, 2, 3]], sampling)
        finally:
            backend.close()
        backend = HTTPBackend(srv.url, model_shape=ModelShape.of_model(model))
        try:
            [s] = backend.generate([[1, 2, 3]], sampling)
            assert s.trace.num_layers == 3 and s.trace.num_rows == 3 + len(s.response_ids) - 1
        finally:
            backend.close()
