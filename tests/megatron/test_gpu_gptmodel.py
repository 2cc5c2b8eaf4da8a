"""GPU: a small megatron-core GPTModel with MoE layers (local spec, one dense layer, full recompute) under R3.

The rollout is a no-grad forward recorded through mcore's RouterReplay; its routing becomes per-sample traces
(right-padded batch, the second sample 5 tokens shorter). The training forward and backward (mcore's reentrant
recompute, `recompute_granularity="full"`) replay them: evidence lines in both stages, the check passing, the
experts used (read at the token dispatcher's input, `dispatch_preprocess(hidden, routing_map, probs)`) equal to the
traces. A shifted trace (`Fault.SHIFT`) makes the check raise.

Run: bash bench/gpu_megatron.sh (the GPU image needs the megatron-core wheel, see docs/megatron.md).
"""

import logging
import os
import re
import socket
import warnings

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install 'r3rl[megatron]')")

from r3rl.check import ReplayCheck  # noqa: E402
from r3rl.config import Fault  # noqa: E402
from r3rl.faults import corrupt_trace  # noqa: E402
from r3rl.megatron.layout import RankLayout, rank_router_batch  # noqa: E402
from r3rl.trace import RoutingTrace  # noqa: E402


def _without_te_router_gemm() -> None:
    """megatron-core 0.16.1 without Transformer Engine: `router_gating_linear` reads the module global
    `te_general_gemm`, which its failed TE import never defines, so every GPU router forward raises NameError (seen on
    an H100, 2026-12-07). Defining it as None takes mcore's own torch path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

NUM_LAYERS, FREQ, E, TOPK, S, B, V = 4, [0, 1, 1, 1], 8, 2, 32, 2, 128
CHECK_RE = re.compile(r"^R3 check \(rank 0, stage (replay_forward|replay_backward)\): n_tokens=(\d+) mismatch=0 "
                      r"\(0\.00%\)$")
WRAPPER_RE = re.compile(r"^R3 wrapper: (replay_forward|replay_backward) branch taken \(rank 0, n_tokens=(\d+), "
                        r"topk=2, replay_idx_sum=(\d+)\)$")


@pytest.fixture(scope="module")
def gpt():
    import torch.distributed as dist

    _without_te_router_gemm()
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = TransformerConfig(
            num_layers=NUM_LAYERS, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
            moe_ffn_hidden_size=64, num_moe_experts=E, moe_router_topk=TOPK, moe_layer_freq=FREQ,
            moe_enable_routing_replay=True, moe_token_dispatcher_type="alltoall", moe_router_dtype="fp32",
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
            use_cpu_initialization=True, params_dtype=torch.float32,
            # no linear biases, as in Qwen3-MoE/DeepSeek; mcore 0.16.1's SequentialMLP adds the expert bias in place
            # on a view its tensor-parallel reduce returned, which autograd refuses in backward
            add_bias_linear=False,
            # no dropout (RL trainers turn it off): mcore's default 0.1 makes the replayed forward's live router
            # differ from the recording forward's on a few rows, which the check rightly counts
            hidden_dropout=0.0, attention_dropout=0.0,
        )
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)  # local spec, moe_layer_freq applied
        model = GPTModel(config, spec, vocab_size=V, max_sequence_length=S).cuda()
    maps = {}
    for module in model.modules():
        if hasattr(module, "token_dispatcher"):
            maps[module.layer_number] = _capture_dispatch(module.token_dispatcher)
    yield model, config, maps
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _capture_dispatch(dispatcher):
    """Record the routing map each first-pass dispatch receives (the experts' input), independently of replay."""
    seen, original = [], dispatcher.dispatch_preprocess

    def dispatch_preprocess(hidden_states, routing_map, probs):
        if torch._C._current_graph_task_id() == -1:
            seen.append(routing_map.detach().clone())
        return original(hidden_states, routing_map, probs)

    dispatcher.dispatch_preprocess = dispatch_preprocess
    return seen


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, S), generator=g).cuda()
    pos = torch.arange(S).expand(B, S).cuda()
    return ids, pos


def _rollout_traces(model, replay, lengths):
    ids, pos = _inputs()
    with torch.no_grad(), replay.record() as rec:
        model(ids, pos, None)
    ids_TLK = torch.stack([rec[layer][0] for layer in sorted(rec)], dim=1).cpu()  # router order t = s * B + b
    return [RoutingTrace.from_ids(ids_TLK[b::B][: n - 1].numpy().astype(np.uint8), E) for b, n in enumerate(lengths)]


def _train_step(model, replay, batch):
    ids, pos = _inputs()
    with replay.replay():
        replay.set_micro_batch(batch)
        logits = model(ids, pos, None)
        logits.float().logsumexp(-1).mean().backward()


def test_gptmodel_replay_forward_backward_recompute(gpt, caplog):
    from r3rl.megatron.replay import MegatronReplay

    model, config, maps = gpt
    lengths = [S, S - 5]
    check = ReplayCheck(3, TOPK, device="cuda")
    replay = MegatronReplay(model, num_layers=NUM_LAYERS, moe_layer_freq=FREQ, check=check)
    assert sorted((s.layer_number, s.trace_layer) for s in replay.sites) == [(2, 0), (3, 1), (4, 2)]
    traces = _rollout_traces(model, replay, lengths)
    batch = rank_router_batch(traces, RankLayout(seq_len=S))
    for seen in maps.values():
        seen.clear()
    with caplog.at_level(logging.INFO, logger="r3rl"):
        _train_step(model, replay, batch)
        summary = check.summary()
    lines = [r.getMessage() for r in caplog.records if r.name == "r3rl"]
    print("\n".join(lines))
    assert summary.passed
    checks = [CHECK_RE.match(line).groups() for line in lines if line.startswith("R3 check")]
    rows = 3 * sum(n - 1 for n in lengths)
    assert checks == [("replay_forward", str(rows)), ("replay_backward", str(rows))]
    wrappers = [WRAPPER_RE.match(line).groups() for line in lines if line.startswith("R3 wrapper")]
    assert len(wrappers) == 6 and [w[1:] for w in wrappers[:3]] == [w[1:] for w in wrappers[3:]]
    # the experts used, read at the dispatcher's input, are the traces (pad rows: the live router's choice)
    for layer_number, trace_layer in ((2, 0), (3, 1), (4, 2)):
        (routing_map,) = maps[layer_number]
        used = routing_map.nonzero()[:, 1].view(-1, TOPK).cpu()
        want = batch.expert_ids[:, trace_layer, :].long()
        valid = (want != batch.pad_value).all(-1)
        assert valid.sum() == sum(n - 1 for n in lengths)
        assert torch.equal(used[valid], want[valid].sort(-1).values)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()


def test_gptmodel_shift_fault_fails_the_check(gpt, caplog):
    from r3rl.megatron.replay import MegatronReplay

    model, config, _ = gpt
    lengths = [S, S]
    check = ReplayCheck(3, TOPK, device="cuda")
    replay = MegatronReplay(model, num_layers=NUM_LAYERS, moe_layer_freq=FREQ, check=check)
    traces = [corrupt_trace(t, Fault.SHIFT) for t in _rollout_traces(model, replay, lengths)]
    with caplog.at_level(logging.INFO, logger="r3rl"):
        _train_step(model, replay, rank_router_batch(traces, RankLayout(seq_len=S)))
        with pytest.raises(AssertionError, match=r"^R3 mismatch tokens \(\d+\) > threshold \(\d+\.\d\d\)$") as exc:
            check.summary()
    print("\n".join(r.getMessage() for r in caplog.records if r.getMessage().startswith("R3 check")))
    print("AssertionError:", exc.value)
    model.zero_grad()
