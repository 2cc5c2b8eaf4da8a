"""Qwen3-Next (hybrid gated-delta-net linear attention + full attention, MoE with a sigmoid-gated shared expert):
what is particular to it beyond the golden replay of tests/test_replay_golden.py and the check of
tests/models/test_families_check.py.

- The trace's layer axis is the MoE layers only, keyed by decoder layer through linear- and full-attention layers
  alike (the tiny preset has a dense layer 0 through `mlp_only_layers`).
- Replay changes the routed selection only: the router and the shared expert's sigmoid gate keep receiving the same
  gradients as without replay (bitwise, fp32, own trace); a shifted trace changes the router's gradient (the negative
  control) while the shared-expert gate still gets one.
- Right-padded rows replay bitwise too (HF zeroes pad positions before the linear attention's convolution).
"""

import pytest
import torch

from r3rl.models import find_routers
from r3rl.models.presets import make_model, preset_available
from r3rl.replay import RoutingReplay
from r3rl.trace import ReplayBatch

PRESET = "tiny-qwen3-next"
pytestmark = pytest.mark.skipif(not preset_available(PRESET), reason="the installed transformers has no Qwen3-Next")


def _tokens(shape=(2, 12), seed=0):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def test_trace_covers_moe_layers_of_both_attention_kinds():
    model = make_model(PRESET, seed=0)
    cfg = model.config
    assert set(cfg.layer_types) == {"linear_attention", "full_attention"}
    moe_layers = [i for i in range(cfg.num_hidden_layers) if i not in cfg.mlp_only_layers]
    sites = find_routers(model)
    assert [type(s.router).__name__ for s in sites] == ["Qwen3NextTopKRouter"] * len(moe_layers)
    assert [s.decoder_layer for s in sites] == moe_layers and [s.layer for s in sites] == list(range(len(sites)))
    assert {cfg.layer_types[s.decoder_layer] for s in sites} == {"linear_attention", "full_attention"}
    with RoutingReplay(model) as replay:
        assert replay.num_layers == len(moe_layers) == cfg.num_hidden_layers - len(cfg.mlp_only_layers)
        assert replay.decoder_layers == moe_layers


def _grads(model, tokens, batch=None):
    """Gradients of a log-prob loss for the router of MoE layer 0 and its block's shared-expert gate."""
    model.zero_grad(set_to_none=True)
    with RoutingReplay(model) as replay:
        ctx = replay.replay(batch) if batch is not None else replay.off()
        with ctx:
            logits = model(tokens).logits
            logits.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None]).sum().backward()
    block = find_routers(model)[0].moe_block
    return block.gate.weight.grad.clone(), block.shared_expert_gate.weight.grad.clone()


def test_router_and_shared_expert_gate_get_the_same_gradients_under_replay():
    model = make_model(PRESET, seed=0).train()
    tokens = _tokens()
    with RoutingReplay(model) as replay, torch.no_grad(), replay.record() as rec:
        model(tokens)
    batch = rec.batch()
    router_ref, shared_ref = _grads(model, tokens)
    router_rep, shared_rep = _grads(model, tokens, batch)
    assert router_ref.abs().sum() > 0 and shared_ref.abs().sum() > 0
    assert torch.equal(router_rep, router_ref) and torch.equal(shared_rep, shared_ref)
    ids = batch.expert_ids.long()
    shifted = ReplayBatch.from_tensor((ids + 1) % 16, 16)
    router_moved, shared_moved = _grads(model, tokens, shifted)
    assert not torch.equal(router_moved, router_ref)  # negative control: the replayed ids do reach the gradient
    assert shared_moved.abs().sum() > 0  # the shared expert is not routed: its gate is trained whatever the ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_right_padded_batch_replays_bitwise(dtype):
    model = make_model(PRESET, seed=0, dtype=dtype)
    tokens = _tokens((3, 10), seed=1)
    mask = torch.ones_like(tokens)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        ref = model(tokens, attention_mask=mask).logits
        with RoutingReplay(model) as replay:
            with replay.record() as rec:
                model(tokens, attention_mask=mask)
            batch = rec.batch()
            with replay.replay(batch):
                rep = model(tokens, attention_mask=mask).logits
    assert torch.equal(rep, ref)
