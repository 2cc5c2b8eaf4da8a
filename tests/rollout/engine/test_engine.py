"""RolloutEngine on CPU with tiny random MoE models: determinism, continuous batching, agreement with the HF forward
(logprobs and routing), replay of its traces, stopping, weight updates and request validation.

    pytest tests/rollout/engine/test_engine.py -q          # about 15 s on 2 CPU cores

The CPU engine is batch-invariant (row-wise kernels), so "same seed, same tokens" holds bitwise whatever the batch.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from r3rl.check import ReplayCheck
from r3rl.models import UnsupportedRouterError, find_routers
from r3rl.models.presets import EOS_ID, TINY_FAMILIES, init_model, make_config, make_model
from r3rl.replay import RoutingReplay
from r3rl.rollout import EngineRequest, RolloutEngine, SamplingParams
from r3rl.rollout.engine.graphs import batch_buckets
from r3rl.rollout.model.forward import MoEKernel
from r3rl.trace import RoutingTrace
from r3rl.train.data import layout_padded

FAMILIES = TINY_FAMILIES
# float32 on both sides, different kernels (fused qkv, row-wise matmuls, own attention, gathered experts): observed
# differences are ~1e-6. 1e-4 leaves margin for reduction order while staying far below what a wrong position, a
# stale cache entry or a different expert would cause (>= 1e-2 on these models).
LOGPROB_ATOL = 1e-4


def _requests(n=7, *, seed0=0, **sampling):
    """Staggered prompt lengths and budgets, mixed sampling modes (greedy, temperature, top-p, top-k)."""
    modes = [dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.8, top_p=0.9),
             dict(temperature=1.2, top_k=20)]
    return [
        EngineRequest(
            request_id=f"r{i}", input_ids=[(7 * i + 3 * j) % 256 for j in range(4 + 5 * i)],
            sampling=SamplingParams(max_new_tokens=6 + 5 * i, seed=seed0 + i, **{**modes[i % 4], **sampling}),
        )
        for i in range(n)
    ]


def _hf_logprobs_and_trace(model, out):
    tokens = out.prompt_ids + out.output_ids
    with RoutingReplay(model) as replay, replay.record() as rec, torch.no_grad():
        logits = model(torch.tensor([tokens], device=model.device)).logits[0].float().cpu()
    P = len(out.prompt_ids)
    logprobs = torch.log_softmax(logits, dim=-1)[P - 1 : -1].gather(1, torch.tensor(out.output_ids)[:, None])[:, 0]
    return logprobs, rec.traces([len(tokens)], len(tokens))[0]


@pytest.fixture(scope="module")
def qwen3():
    return make_model("tiny-qwen3-moe", seed=1)


# --- determinism and continuous batching ---------------------------------------------------------------------------
def test_seeded_sampling_is_deterministic(qwen3):
    engine = RolloutEngine(qwen3, max_slots=4, max_seq_len=128)
    a = engine.generate(_requests(4, temperature=1.0))
    b = engine.generate(_requests(4, temperature=1.0))
    c = engine.generate(_requests(4, temperature=1.0, seed0=100))
    assert [o.output_ids for o in a] == [o.output_ids for o in b]
    assert [o.output_logprobs for o in a] == [o.output_logprobs for o in b]
    assert [o.output_ids for o in a] != [o.output_ids for o in c]


def test_continuous_batching_equals_one_at_a_time(qwen3):
    engine = RolloutEngine(qwen3, max_slots=3, max_seq_len=128)  # 7 requests through 3 slots: joins as others finish
    batched = engine.generate(_requests())
    alone = [engine.generate([req])[0] for req in _requests()]
    for b, a in zip(batched, alone, strict=True):
        assert b.request_id == a.request_id
        assert b.output_ids == a.output_ids and b.output_logprobs == a.output_logprobs
        np.testing.assert_array_equal(b.trace.expert_ids, a.trace.expert_ids)


def test_interleaved_add_request_and_step(qwen3):
    engine = RolloutEngine(qwen3, max_slots=2, max_seq_len=128)
    reqs, done = _requests(5), {}
    engine.add_request(reqs[0])
    for req in reqs[1:]:  # requests arrive while others run
        done.update((o.request_id, o) for o in engine.step())
        engine.add_request(req)
    while engine.has_work():
        done.update((o.request_id, o) for o in engine.step())
    ref = RolloutEngine(qwen3, max_slots=5, max_seq_len=128).generate(_requests(5))
    assert [done[o.request_id].output_ids for o in ref] == [o.output_ids for o in ref]


# --- agreement with the HF forward ----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_invariant", [True, False], ids=["cpu-kernels", "gpu-kernels"])
@pytest.mark.parametrize("preset", FAMILIES)
def test_logprobs_and_trace_match_hf_forward(preset, batch_invariant):
    """gpu-kernels: the CUDA code path run on CPU (grouped_mm experts, batched padded prefill, KV-length buckets)."""
    model = make_model(preset, seed=1)
    engine = RolloutEngine(model, max_slots=3, max_seq_len=128, batch_invariant=batch_invariant)
    agreement = _agreement_with_hf(model, engine, engine.generate(_requests(5)))
    assert agreement["max_diff"] <= LOGPROB_ATOL, agreement
    assert agreement["exact"] >= 0.99, agreement  # same expert set for >= 99% of (token, layer)
    assert agreement["overlap"] == 1.0, agreement  # and at least one shared expert for every (token, layer)


def _agreement_with_hf(model, engine, outputs) -> dict:
    """Teacher-force each output through the HF model: logprob differences and routing agreement."""
    diffs, exact, overlap = [], [], []
    for out in outputs:
        hf_logprobs, hf_trace = _hf_logprobs_and_trace(model, out)
        out.trace.validate(num_tokens=len(out.prompt_ids) + len(out.output_ids), num_layers=engine.num_layers,
                           top_k=engine.top_k, num_experts=engine.num_experts)
        assert out.trace.expert_ids.dtype == np.uint8
        diffs.append((torch.tensor(out.output_logprobs) - hf_logprobs).abs())
        exact.append((np.sort(out.trace.expert_ids, -1) == np.sort(hf_trace.expert_ids, -1)).all(-1).ravel())
        shared = out.trace.expert_ids[..., :, None] == hf_trace.expert_ids[..., None, :]
        overlap.append(shared.any(-1).any(-1).ravel())
    diff = torch.cat(diffs)
    return dict(max_diff=float(diff.max()), mean_diff=float(diff.mean()), exact=float(np.concatenate(exact).mean()),
                overlap=float(np.concatenate(overlap).mean()))


def test_dense_layers_between_moe_layers():
    """Qwen3-MoE `mlp_only_layers`: dense MLPs have no router, and the trace's layer axis counts MoE layers only."""
    model = AutoModelForCausalLM.from_config(make_config("tiny-qwen3-moe", mlp_only_layers=[0, 2])).eval()
    with torch.no_grad():
        for site in find_routers(model):
            site.router.weight.normal_(0.0, 2.0 / 8)  # peaked routers, as the presets make them
    engine = RolloutEngine(model, max_slots=2, max_seq_len=64)
    assert engine.num_layers == 2
    agreement = _agreement_with_hf(model, engine, engine.generate(_requests(2)))
    assert agreement["max_diff"] <= LOGPROB_ATOL and agreement["exact"] >= 0.99, agreement


def test_replaying_engine_trace_passes_check_and_shifted_trace_fails(qwen3):
    engine = RolloutEngine(qwen3, max_slots=2, max_seq_len=128)
    [out] = engine.generate([EngineRequest(request_id="a", input_ids=list(range(40, 60)),
                                           sampling=SamplingParams(max_new_tokens=24, seed=3))])
    tokens = torch.tensor([out.prompt_ids + out.output_ids])
    shifted = RoutingTrace(np.roll(out.trace.expert_ids, 1, axis=0), out.trace.num_experts)
    for trace, should_pass in ((out.trace, True), (shifted, False)):
        check = ReplayCheck(engine.num_layers, engine.top_k)
        with RoutingReplay(qwen3, check=check) as replay, torch.no_grad():
            with replay.replay(layout_padded([trace], seq_len=tokens.shape[1])):
                qwen3(tokens)
        if should_pass:
            assert check.summary().passed
        else:
            with pytest.raises(AssertionError, match="R3 mismatch"):
                check.summary()


# --- stopping --------------------------------------------------------------------------------------------------------
def test_stop_tokens_and_max_new_tokens(qwen3):
    engine = RolloutEngine(qwen3, max_slots=2, max_seq_len=128)
    prompt = list(range(30, 45))
    [free] = engine.generate([EngineRequest(request_id="a", input_ids=prompt,
                                            sampling=SamplingParams(max_new_tokens=12, temperature=0.0))])
    assert free.finish_reason == "length" and len(free.output_ids) == 12
    stop = free.output_ids[4]
    first = free.output_ids.index(stop)
    [stopped] = engine.generate([EngineRequest(request_id="b", input_ids=prompt, sampling=SamplingParams(
        max_new_tokens=12, temperature=0.0, stop_token_ids=[stop, EOS_ID]))])
    assert stopped.finish_reason == "stop"
    assert stopped.output_ids == free.output_ids[: first + 1]  # the stop token is part of the output
    assert stopped.trace.num_rows == len(prompt) + first  # len(prompt) + len(output) - 1
    [one] = engine.generate([EngineRequest(request_id="c", input_ids=prompt,
                                           sampling=SamplingParams(max_new_tokens=1, temperature=0.0))])
    assert one.output_ids == free.output_ids[:1] and one.trace.num_rows == len(prompt)


def test_routing_capture_off_and_not_requested(qwen3):
    req = EngineRequest(request_id="a", input_ids=[1, 2, 3], sampling=SamplingParams(max_new_tokens=3, seed=0))
    on = RolloutEngine(qwen3, max_slots=2, max_seq_len=64).generate([req])[0]
    off = RolloutEngine(qwen3, max_slots=2, max_seq_len=64, capture_routing=False).generate([req])[0]
    assert off.trace is None and off.output_ids == on.output_ids
    req.return_routed_experts = False
    assert RolloutEngine(qwen3, max_slots=2, max_seq_len=64).generate([req])[0].trace is None


# --- weights ---------------------------------------------------------------------------------------------------------
def test_update_weights_changes_outputs_bumps_version_and_keeps_buffers(qwen3):
    engine = RolloutEngine(qwen3, max_slots=2, max_seq_len=64)
    reqs = lambda: _requests(2, temperature=0.0)  # noqa: E731
    before = engine.generate(reqs())
    assert {o.weight_version for o in before} == {0}
    ptrs = (engine.kv.k_LNHbD.data_ptr(), engine.kv.v_LNHbD.data_ptr(), engine.routes.routes_NbLK.data_ptr())
    assert engine.update_weights(make_model("tiny-qwen3-moe", seed=2).state_dict()) == 1
    after = engine.generate(reqs())
    assert [o.output_ids for o in after] != [o.output_ids for o in before]
    assert {o.weight_version for o in after} == {1}
    assert (engine.kv.k_LNHbD.data_ptr(), engine.kv.v_LNHbD.data_ptr(), engine.routes.routes_NbLK.data_ptr()) == ptrs
    assert engine.update_weights(dict(qwen3.named_parameters())) == 2  # every parameter maps: the original is back
    assert [o.output_ids for o in engine.generate(reqs())] == [o.output_ids for o in before]


def test_update_weights_rejects_bad_names_and_shapes_atomically(qwen3):
    engine = RolloutEngine(qwen3, max_slots=2, max_seq_len=64)
    good = {"model.norm.weight": torch.zeros(64)}
    with pytest.raises(ValueError, match=r"unexpected \['model.nope'\]"):
        engine.update_weights({**good, "model.nope": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"shape-mismatched \['model.layers.0.mlp.gate.weight \(got \(3, 64\)"):
        engine.update_weights({**good, "model.layers.0.mlp.gate.weight": torch.zeros(3, 64)})
    assert engine.weight_version == 0 and torch.equal(engine.model.final_norm_H, qwen3.model.norm.weight)


def test_from_pretrained_checkpoint_matches_in_memory_model(tmp_path, qwen3):
    init_model("tiny-qwen3-moe", tmp_path / "ckpt", seed=1)
    req = lambda: [EngineRequest(request_id="a", input_ids=[5, 6, 7], sampling=SamplingParams(seed=1))]  # noqa: E731
    from_dir = RolloutEngine.from_pretrained(tmp_path / "ckpt", max_slots=2, max_seq_len=160, device="cpu")
    in_memory = RolloutEngine(qwen3, max_slots=2, max_seq_len=160)
    assert from_dir.generate(req())[0].output_ids == in_memory.generate(req())[0].output_ids


def test_dense_model_is_rejected():
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16)
    with pytest.raises(UnsupportedRouterError, match="no MoE router"):
        RolloutEngine(AutoModelForCausalLM.from_config(cfg), max_slots=1, max_seq_len=16)


def test_per_expert_loop_fallback_matches_grouped_mm(qwen3):
    """Where grouped_mm is unavailable (e.g. float32 on CUDA) the engine loops over experts instead."""
    grouped = RolloutEngine(qwen3, max_slots=3, max_seq_len=128, batch_invariant=False)
    loop = RolloutEngine(qwen3, max_slots=3, max_seq_len=128, batch_invariant=False)
    loop.model.moe._expert_mlp = loop.model.moe._expert_mlp_loop
    for a, b in zip(grouped.generate(_requests(4, temperature=0.0)), loop.generate(_requests(4, temperature=0.0)),
                    strict=True):
        assert a.output_ids == b.output_ids
        torch.testing.assert_close(torch.tensor(a.output_logprobs), torch.tensor(b.output_logprobs), atol=1e-5, rtol=0)


# --- the CUDA-graph batch layout, run eagerly on CPU ------------------------------------------------------------------
def test_padded_graph_batches_match_exact_batches(qwen3):
    """Graph replays decode a bucket of rows (>= the live ones); padding rows must change nothing."""
    assert batch_buckets(256) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert batch_buckets(6) == [1, 2, 4, 6]
    exact = RolloutEngine(qwen3, max_slots=8, max_seq_len=128, batch_invariant=False)
    padded = RolloutEngine(qwen3, max_slots=8, max_seq_len=128, batch_invariant=False)
    padded.config.use_cuda_graph = True  # replay = the same rows, eagerly, masked
    sizes = []

    def fake_graph(B, T, mode, *, masked):
        assert masked == (padded.num_running < B)
        sizes.append((B, padded.num_running))
        return SimpleNamespace(replay=lambda: padded._decode_rows(B, T, mode, masked=masked))

    padded._graph = fake_graph
    ref, out = exact.generate(_requests(5, temperature=0.0)), padded.generate(_requests(5, temperature=0.0))
    assert any(b > n for b, n in sizes), f"no padded batch was decoded: {sizes}"
    for r, o in zip(ref, out, strict=True):
        assert r.output_ids == o.output_ids
        torch.testing.assert_close(torch.tensor(o.output_logprobs), torch.tensor(r.output_logprobs), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(r.trace.expert_ids, o.trace.expert_ids)


# --- request validation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, request_kwargs", [
    ("input_ids", dict(input_ids=list(range(64)))),  # prompt fills the whole context
    ("input_ids", dict(input_ids=[])),
    ("input_ids", dict(input_ids=[1, 320])),  # vocab_size is 320
    ("input_ids", dict(input_ids=[1, -1])),
    ("input_ids", dict(input_ids=["a"])),
    ("max_new_tokens", dict(sampling=SamplingParams(max_new_tokens=0))),
    ("max_new_tokens", dict(input_ids=list(range(40)), sampling=SamplingParams(max_new_tokens=30))),  # 70 > 64
    ("temperature", dict(sampling=SamplingParams(temperature=-0.5))),
    ("temperature", dict(sampling=SamplingParams(temperature=float("nan")))),
    ("top_p", dict(sampling=SamplingParams(top_p=0.0))),
    ("top_p", dict(sampling=SamplingParams(top_p=1.5))),
    ("top_k", dict(sampling=SamplingParams(top_k=0))),
    ("stop_token_ids", dict(sampling=SamplingParams(stop_token_ids=[400]))),
    ("seed", dict(sampling=SamplingParams(seed="7"))),
    ("request_id", dict(request_id="")),
])
def test_bad_requests_raise_value_error_naming_the_field(qwen3, field, request_kwargs):
    engine = RolloutEngine(qwen3, max_slots=2, max_seq_len=64)
    kwargs = dict(request_id="x", input_ids=[1, 2, 3], sampling=SamplingParams(max_new_tokens=4)) | request_kwargs
    with pytest.raises(ValueError, match=field):
        engine.add_request(EngineRequest(**kwargs))
    assert not engine.has_work()


def test_duplicate_request_id_is_rejected(qwen3):
    engine = RolloutEngine(qwen3, max_slots=2, max_seq_len=64)
    engine.add_request(EngineRequest(request_id="x", input_ids=[1, 2], sampling=SamplingParams(max_new_tokens=4)))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request(EngineRequest(request_id="x", input_ids=[3], sampling=SamplingParams(max_new_tokens=4)))


# --- GPU (pytest -m gpu on a CUDA machine) ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", FAMILIES)
def test_cuda_graph_engine_matches_hf_forward_in_bf16(preset):
    model = make_model(preset, seed=1, device="cuda", dtype=torch.bfloat16)
    engine = RolloutEngine(model, max_slots=8, max_seq_len=128)
    # the fused Triton kernels where triton is installed (the GPU image has it), else grouped_mm
    assert engine.config.use_cuda_graph and engine.model.moe_kernel in (MoEKernel.FUSED, MoEKernel.GROUPED_MM)
    outputs = engine.generate(_requests(7))
    assert engine._graphs, "decode ran without CUDA graphs"
    agreement = _agreement_with_hf(model, engine, outputs)  # bf16: both sides round, differently
    assert agreement["mean_diff"] <= 0.05 and agreement["exact"] >= 0.8 and agreement["overlap"] >= 0.98, agreement
    no_capture = RolloutEngine(model, max_slots=8, max_seq_len=128, capture_routing=False).generate(_requests(7))
    assert [o.output_ids for o in no_capture] == [o.output_ids for o in outputs]  # capture never changes numerics
    ptr = engine.kv.k_LNHbD.data_ptr()
    engine.update_weights(make_model(preset, seed=2, device="cuda", dtype=torch.bfloat16).state_dict())
    assert engine.kv.k_LNHbD.data_ptr() == ptr
    assert [o.output_ids for o in engine.generate(_requests(7))] != [o.output_ids for o in outputs]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_warmup_captures_every_batchs_graph_up_front_and_changes_no_token():
    model = make_model("tiny-qwen3-moe", seed=1, device="cuda", dtype=torch.bfloat16)
    engine = RolloutEngine(model, max_slots=8, max_seq_len=128)
    assert engine.model.decodes_in_place(engine.kv)
    warm = engine.warmup()
    n = len(engine._graphs)
    assert warm["graphs"] == n == len(engine._graphs.buckets) * 2 * 2  # buckets x padded/exact x two modes
    assert warm["prefills"] == (6 if engine.model.moe_kernel is MoEKernel.FUSED else 0)
    reqs = lambda: _requests(7, top_p=1.0, top_k=-1)  # noqa: E731 - greedy and sampled rows, no filters
    outputs = engine.generate(reqs())  # 7, 6, ... live rows
    assert len(engine._graphs) == n, "a step still captured a graph"
    lazy = RolloutEngine(model, max_slots=8, max_seq_len=128).generate(reqs())
    assert [o.output_ids for o in lazy] == [o.output_ids for o in outputs]


def test_warmup_is_a_no_op_on_cpu_and_needs_an_idle_engine(qwen3):
    engine = RolloutEngine(qwen3, max_slots=2, max_seq_len=64)
    assert engine.warmup() == {"graphs": 0, "prefills": 0}  # CPU: no CUDA graphs, no Triton kernels
    engine.add_request(_requests(1)[0])
    with pytest.raises(RuntimeError, match="needs an idle engine: got 0 running and 1 waiting"):
        engine.warmup()


# --- sampling distribution and edge cases -------------------------------------------------------------------------
def _draws(logits_V, n, **params):
    """n seeded draws from one row of logits through the engine's sampler (one row per seed)."""
    from r3rl.rollout.engine.sampling import SamplingMode, SlotParams, fold_seed, sample_tokens, vocab_keys

    V = logits_V.shape[0]
    p = SamplingParams(**params)
    slot = SlotParams(torch.full((n,), p.temperature), torch.full((n,), p.top_p),
                      torch.full((n,), p.top_k if p.top_k <= V else -1, dtype=torch.int64),
                      torch.tensor([fold_seed(s) for s in range(n)], dtype=torch.int64),
                      torch.full((n,), p.logprob_temperature))
    tokens, logprobs = sample_tokens(logits_V.expand(n, V), slot, torch.full((n,), 5), SamplingMode.for_params([p]),
                                     vocab_keys(V, "cpu"))
    return tokens, logprobs


def test_sampler_follows_the_distribution_and_its_filters():
    logits = torch.randn(12, generator=torch.Generator().manual_seed(0)) * 1.5
    n = 20000

    def freq(t):
        return torch.bincount(t, minlength=12).double() / n

    probs = torch.softmax(logits.double(), -1)
    tokens, logprobs = _draws(logits, n, temperature=1.0)
    assert 0.5 * (freq(tokens) - probs).abs().sum() < 0.02  # total variation vs softmax
    torch.testing.assert_close(logprobs.double(), torch.log(probs)[tokens], rtol=0, atol=1e-5)
    hot = torch.softmax(logits.double() / 0.5, -1)  # temperature sharpens the distribution
    assert 0.5 * (freq(_draws(logits, n, temperature=0.5)[0]) - hot).abs().sum() < 0.02
    top5 = torch.topk(logits, 5).indices
    t5 = _draws(logits, n, temperature=1.0, top_k=5)[0]
    assert torch.isin(t5, top5).all()
    p5 = torch.zeros(12, dtype=torch.float64).index_copy_(0, top5, torch.softmax(logits[top5].double(), -1))
    assert 0.5 * (freq(t5) - p5).abs().sum() < 0.02
    order = torch.argsort(logits, descending=True)
    nucleus = order[: int((torch.cumsum(probs[order], 0) < 0.6).sum()) + 1]
    assert set(_draws(logits, n, temperature=1.0, top_p=0.6)[0].unique().tolist()) == set(nucleus.tolist())


def test_sampler_edge_cases_are_greedy_or_unfiltered():
    logits = torch.randn(12, generator=torch.Generator().manual_seed(1))
    greedy = int(logits.argmax())
    for params in (dict(temperature=1e-39), dict(temperature=1.0, top_p=1e-300), dict(temperature=1.0, top_k=1)):
        assert (_draws(logits, 50, **params)[0] == greedy).all(), params
    huge = _draws(logits, 2000, temperature=1.0, top_k=2**70)[0]
    assert torch.equal(huge, _draws(logits, 2000, temperature=1.0)[0])  # top_k >= vocab keeps every token


def test_huge_top_k_does_not_break_the_engine(qwen3):
    engine = RolloutEngine(qwen3, max_slots=2, max_seq_len=32)
    big = SamplingParams(max_new_tokens=3, temperature=1.0, top_k=2**63, seed=1)
    out = engine.generate([EngineRequest(request_id="big", input_ids=[1, 2, 3], sampling=big)])
    assert len(out[0].output_ids) == 3 and not engine.has_work()


def test_structured_seeds_do_not_collide():
    from r3rl.rollout.engine.sampling import fold_seed

    keys = {fold_seed((step << 32) | i) for step in range(64) for i in range(64)}
    assert len(keys) == 64 * 64 and fold_seed(1) != fold_seed(2**32)
