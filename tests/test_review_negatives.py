"""Negative controls the issue-7 review asked for: each invariant the R3 core guards, made to fail."""

import numpy as np
import pytest
import torch

from r3rl.models.adapters import RouterOrderError, RouterSite, _check_layer_order
from r3rl.models.loading import set_activation_checkpointing
from r3rl.models.presets import make_model
from r3rl.replay import Recording, RoutingReplay, RoutingReplayError
from r3rl.trace import ReplayBatch, RoutingTrace, TraceError


def test_make_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_model("tiny-qwen3-moe", seed=7)
    assert torch.equal(torch.rand(3), expected)
    a, b = make_model("tiny-qwen3-moe", seed=7), make_model("tiny-qwen3-moe", seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_strict_mode_refuses_more_recomputes_than_forwards(qwen3_model, tokens):
    """Two backwards through one graph (retain_graph) recompute every layer twice for one forward: --ci-test says so."""
    qwen3_model.train()
    replay = RoutingReplay(qwen3_model, strict=True)
    set_activation_checkpointing(qwen3_model, True, context_fn=replay.checkpoint_context_fn)
    with replay.record() as rec:
        qwen3_model(tokens)
    batch = rec.batch()
    with pytest.raises(RoutingReplayError, match="more recompute calls than forward calls"):
        with replay.replay(batch):
            loss = qwen3_model(tokens).logits.sum()
            loss.backward(retain_graph=True)
            loss.backward()
    set_activation_checkpointing(qwen3_model, False)
    replay.close()


def test_incomplete_recording_is_refused():
    rec = Recording(num_layers=2, num_experts=16)
    rec.ids_per_layer[0].append(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(RoutingReplayError, match=r"recording is incomplete: calls per layer=\[1, 0\]"):
        rec.batch()


def test_narrow_outside_the_batch_is_refused():
    batch = ReplayBatch.from_tensor(torch.zeros(10, 2, 4, dtype=torch.long), 16)
    with pytest.raises(TraceError, match=r"micro-batch rows \[8, 12\) outside the batch of 10"):
        batch.narrow(8, 4)
    with pytest.raises(TraceError, match=r"rows \[-1, 1\)"):
        batch.narrow(-1, 2)


def test_compact_trace_header_and_dtype_errors():
    data = RoutingTrace.from_ids(np.zeros((2, 3, 4), dtype=np.int64) + np.arange(4), 16).to_bytes()
    with pytest.raises(TraceError, match="not a compact trace: got magic=b'XXXX'"):
        RoutingTrace.from_bytes(b"XXXX" + data[4:])
    bad_dtype = bytearray(data)
    bad_dtype[5] = 2  # int16 code for a 16-expert trace
    with pytest.raises(TraceError, match="dtype code 2 does not fit num_experts=16"):
        RoutingTrace.from_bytes(bytes(bad_dtype))
    with pytest.raises(TraceError, match="shorter than its 24-byte header"):
        RoutingTrace.from_bytes(data[:10])


def test_from_vllm_errors():
    with pytest.raises(TraceError, match="neither prompt_routed_experts nor routed_experts"):
        RoutingTrace.from_vllm(None, None, num_experts=16)
    with pytest.raises(TraceError, match="equal layers/top_k"):
        RoutingTrace.from_vllm(np.zeros((2, 3, 4), np.int16), np.zeros((1, 2, 4), np.int16), num_experts=16)


def test_routers_out_of_layer_order_are_refused(qwen3_model):
    from r3rl.models import find_routers

    sites = find_routers(qwen3_model)
    swapped = [RouterSite(layer=i, name=s.name, router=s.router, adapter=s.adapter, decoder_layer=s.decoder_layer)
               for i, s in enumerate([sites[1], sites[0], *sites[2:]])]
    with pytest.raises(RouterOrderError, match=r"decoder layers \[1, 0, 2, 3\]"):
        _check_layer_order(swapped)


def test_adapter_registry_is_explicit_not_global():
    """A custom router class is known to the registry it was added to, and nowhere else."""
    from r3rl.models import BUILTIN_ADAPTERS, UnsupportedRouterError, find_routers

    class MyRouter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, 8))
            self.top_k, self.num_experts, self.norm_topk_prob = 2, 4, True

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Module() for _ in range(2)])
            for layer in self.layers:
                layer.mlp = torch.nn.Module()
                layer.mlp.gate = MyRouter()

    adapter = BUILTIN_ADAPTERS.adapter_for(type(make_model("tiny-qwen3-moe").model.layers[0].mlp.gate))
    mine = BUILTIN_ADAPTERS.with_adapter(MyRouter, adapter)
    assert [s.layer for s in find_routers(Toy(), mine)] == [0, 1]
    with pytest.raises(UnsupportedRouterError, match="MyRouter"):
        find_routers(Toy())  # the built-in registry was not changed
