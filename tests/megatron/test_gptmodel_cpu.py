"""A real mcore GPTModel (local spec, dense + MoE layers) constructs on CPU (gloo): MegatronReplay finds its routers
by decoder layer number, skips the dense layer, and refuses a model whose MoE layers disagree with the map.
(Its forward needs CUDA: `Router.gating` moves the gate to the GPU; see test_gpu_gptmodel.py.)"""

import os
import socket
import warnings

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install 'r3rl[megatron]')")

from r3rl.megatron.replay import MegatronReplay, MegatronReplayError  # noqa: E402


@pytest.fixture
def model_parallel():
    import torch.distributed as dist
    from megatron.core import parallel_state

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _gpt(spec_kind: str):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = TransformerConfig(
            num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, num_moe_experts=8,
            moe_router_topk=2, moe_layer_freq=[0, 1, 1, 1], moe_enable_routing_replay=True,
            moe_token_dispatcher_type="allgather", use_cpu_initialization=True, params_dtype=torch.float32,
        )
        spec = (get_gpt_decoder_block_spec(config, use_transformer_engine=False) if spec_kind == "block"
                else get_gpt_layer_local_spec(num_experts=8))  # the single-layer spec ignores moe_layer_freq
        return GPTModel(config, spec, vocab_size=64, max_sequence_length=16)


def test_gptmodel_routers_keyed_by_layer_number(model_parallel):
    replay = MegatronReplay(_gpt("block"), num_layers=4, moe_layer_freq=[0, 1, 1, 1])
    assert sorted((s.layer_number, s.trace_layer) for s in replay.sites) == [(2, 0), (3, 1), (4, 2)]
    assert replay.trace_layers == 3 and replay.top_k == 2


def test_gptmodel_with_moe_layers_the_map_lacks_is_refused(model_parallel):
    # negative control: every layer is MoE in this model, the map says layer 1 is dense
    with pytest.raises(MegatronReplayError, match="router of decoder layer 1 is not a MoE layer of the trace map"):
        MegatronReplay(_gpt("layer"), num_layers=4, moe_layer_freq=[0, 1, 1, 1])
