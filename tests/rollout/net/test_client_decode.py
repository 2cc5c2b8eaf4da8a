"""The client's one decode path on a SGLang-shaped response (no server): dense-layer columns, validation."""

import base64

import numpy as np
import pytest

from r3rl.rollout.net.client import ModelShape, RolloutServerError, decode_generate_output


def _sglang_output(prompt_len, output_ids, wire):
    return {
        "text": "", "output_ids": output_ids,
        "meta_info": {"id": "sglang-1", "prompt_tokens": prompt_len, "completion_tokens": len(output_ids),
                      "finish_reason": {"type": "length", "length": len(output_ids)}, "weight_version": "default",
                      "output_token_logprobs": [[-1.0, t, None] for t in output_ids],
                      "routed_experts": base64.b64encode(wire.astype("<i4").tobytes()).decode()},
    }


def test_sglang_trace_with_dense_layers_keeps_the_moe_columns():
    rng = np.random.default_rng(0)
    prompt, out = [1, 2, 3], [4, 5]
    moe = np.stack([[rng.choice(16, 2, replace=False) for _ in range(2)] for _ in range(4)])  # 4 rows, 2 MoE layers
    wire = np.zeros((4, 3, 2))  # decoder layers 0..2, layer 1 dense (zeros, as SGLang leaves it)
    wire[:, [0, 2]] = moe
    shape = ModelShape(num_layers=2, top_k=2, num_experts=16, moe_layers=(0, 2), num_decoder_layers=3)
    sample = decode_generate_output(_sglang_output(3, out, wire), prompt, shape=shape, index=0)
    np.testing.assert_array_equal(sample.trace.expert_ids, moe)
    assert sample.response_ids == out and sample.metadata["weight_version_raw"] == "default"


def test_mismatched_logprob_ids_are_named():
    wire = np.tile(np.array([0, 1]), (4, 2, 1))
    bad = _sglang_output(3, [4, 5], wire)
    bad["meta_info"]["output_token_logprobs"][1][1] = 9
    with pytest.raises(RolloutServerError, match="sample 2: output_token_logprobs token ids must equal output_ids"):
        decode_generate_output(bad, [1, 2, 3], shape=ModelShape(num_layers=2, top_k=2, num_experts=16), index=2)


def test_compact_trace_with_bad_base64_is_a_client_error_naming_the_sample():
    out = _sglang_output(3, [4, 5], np.tile(np.array([0, 1]), (4, 2, 1)))
    out["meta_info"].update(routed_experts="not base64!", routed_experts_format="compact")
    with pytest.raises(RolloutServerError, match="sample 1: meta_info.routed_experts .compact. must be valid base64"):
        decode_generate_output(out, [1, 2, 3], shape=ModelShape(num_layers=2, top_k=2, num_experts=16), index=1)
