"""The rollout engine on GLM-4.5, MiniMax-M2, GPT-OSS, DeepSeek-V3 and Qwen3-Next (tiny presets, float32, CPU): its
served trace equals a full HF forward's routing on >= 99% of (token, layer), its log-probs match, and greedy decoding
picks HF's tokens. GPT-OSS in bfloat16 (CPU, hidden 512): the engine stays within bf16 noise of HF (it rounds where HF
rounds). GPT-OSS negative controls: the same engine without its sliding windows, or without its sinks, no longer
matches HF. DeepSeek-V3: the KV cache holds the compressed latent, and decoding is batch-invariant on CPU.

    pytest tests/rollout/engine/test_engine_families.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r3rl.models import find_routers
from r3rl.models.presets import TINY_NEW_FAMILIES, make_model, preset_available
from r3rl.rollout import EngineRequest, RolloutEngine, SamplingParams

ENGINE_FAMILIES = TINY_NEW_FAMILIES
LOGPROB_ATOL = 1e-4  # as tests/rollout/engine/test_engine.py: float32 both sides, different kernels


def _needs(preset):
    if not preset_available(preset):
        pytest.skip(f"the installed transformers has no model class for {preset}")


def _requests(n=4, **sampling):
    """Prompts and outputs long enough to leave GPT-OSS's 8-token window behind."""
    return [EngineRequest(request_id=f"r{i}", input_ids=[(11 * i + 5 * j) % 256 for j in range(6 + 7 * i)],
                          sampling=SamplingParams(max_new_tokens=10 + 4 * i, seed=i, **sampling))
            for i in range(n)]


def _hf_forward(model, tokens):
    """Full (no KV cache) HF forward of one sequence: log-probs `[T, V]` and the routers' own top-k `[T, L, K]`."""
    ids = []
    hooks = [s.router.register_forward_hook(lambda m, a, out: ids.append(out[2].detach())) for s in find_routers(model)]
    with torch.no_grad():
        logits = model(torch.tensor([tokens], device=model.device)).logits[0].float()
    for h in hooks:
        h.remove()
    return torch.log_softmax(logits, dim=-1), torch.stack(ids, dim=1).cpu().numpy()


def _agreement(model, outputs):
    """(max |log-prob diff|, fraction of (token, layer) with HF's expert set)."""
    diffs, exact = _agreement_stats(model, outputs)
    return float(diffs.max()), exact


def _agreement_stats(model, outputs):
    """(|log-prob diff| per output token, fraction of (token, layer) with HF's expert set)."""
    diffs, exact = [], []
    for out in outputs:
        tokens = out.prompt_ids + out.output_ids
        logp, ids_TLK = _hf_forward(model, tokens)
        P = len(out.prompt_ids)
        hf_logp = logp[P - 1 : -1].gather(1, torch.tensor(out.output_ids)[:, None])[:, 0]
        diffs.append((torch.tensor(out.output_logprobs) - hf_logp).abs())
        served = out.trace.expert_ids
        assert served.shape == ids_TLK[:-1].shape  # the last token never went through the model
        exact.append((np.sort(served, -1) == np.sort(ids_TLK[:-1], -1)).all(-1).ravel())
    return torch.cat(diffs), float(np.concatenate(exact).mean())


@pytest.mark.parametrize("batch_invariant", [True, False], ids=["cpu-kernels", "gpu-kernels"])
@pytest.mark.parametrize("preset", ENGINE_FAMILIES)
def test_served_trace_and_logprobs_match_hf_forward(preset, batch_invariant):
    _needs(preset)
    model = make_model(preset, seed=1)
    engine = RolloutEngine(model, max_slots=3, max_seq_len=128, batch_invariant=batch_invariant)
    max_diff, exact = _agreement(model, engine.generate(_requests(temperature=1.0)))
    assert max_diff <= LOGPROB_ATOL, max_diff
    assert exact >= 0.99, exact  # same expert set on >= 99% of (token, layer)


@pytest.mark.parametrize("preset", ENGINE_FAMILIES)
def test_greedy_tokens_match_hf(preset):
    _needs(preset)
    model = make_model(preset, seed=1)
    engine = RolloutEngine(model, max_slots=2, max_seq_len=128)
    for out in engine.generate(_requests(2, temperature=0.0)):
        tokens = list(out.prompt_ids)
        for _ in out.output_ids:  # HF greedy, one full forward per token
            tokens.append(int(_hf_forward(model, tokens)[0][-1].argmax()))
        assert out.output_ids == tokens[len(out.prompt_ids):]


@pytest.mark.parametrize("feature", ["window", "sinks_H"])
def test_gpt_oss_without_windows_or_sinks_no_longer_matches(feature):
    """Negative controls: the features are really in use (the prompts outgrow the 8-token window)."""
    _needs("tiny-gpt-oss")
    model = make_model("tiny-gpt-oss", seed=1)
    engine = RolloutEngine(model, max_slots=3, max_seq_len=128)
    assert {lw.attn.window for lw in engine.model.layers} == {8, None}
    with torch.no_grad():  # make the sinks matter as much as a trained model's (HF's init draws them with std 0.02)
        for lw in engine.model.layers:
            lw.attn.sinks_H.fill_(2.0)
        for name, t in model.named_parameters():
            if name.endswith("sinks"):
                t.fill_(2.0)
    assert _agreement(model, engine.generate(_requests(3, temperature=1.0)))[0] <= LOGPROB_ATOL
    for lw in engine.model.layers:
        setattr(lw.attn, feature, None)
    assert _agreement(model, engine.generate(_requests(3, temperature=1.0)))[0] > 1e-3


def _gpt_oss_bf16_agreement():
    model = make_model("tiny-gpt-oss", seed=0, dtype=torch.bfloat16, hidden_size=512, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=64, intermediate_size=512)
    engine = RolloutEngine(model, max_slots=4, max_seq_len=128)
    requests = [EngineRequest(request_id=f"r{i}", input_ids=[(11 * i + 5 * j) % 256 for j in range(24 + 7 * i)],
                              sampling=SamplingParams(max_new_tokens=24, seed=i, temperature=1.0)) for i in range(4)]
    diffs, exact = _agreement_stats(model, engine.generate(requests))
    return float(diffs.mean()), exact


# mean |log-prob diff| and expert-set agreement that separate HF's rounding from a misplaced one on every CPU
GPT_OSS_BF16_MEAN_DIFF, GPT_OSS_BF16_EXACT = 6e-3, 0.98


def test_gpt_oss_bf16_follows_hf_rounding():
    """bfloat16 on CPU at a moderate width (hidden 512, 8 heads of 64, as GPT-OSS's head dim): the engine rounds where
    HF rounds (RoPE as three rounded ops, biased linears rounded once, each expert output times its bf16 gate weight
    rounded before the sum over k), so its log-probs are within bf16 noise of HF's.

    How close depends on the CPU, not on transformers (5.17 and 5.25 give the same numbers): ATen computes bf16
    exp-based ops (sigmoid, softmax) in vector chunks plus a scalar tail that rounds differently, so where an element
    falls depends on the tensor's size, and the engine's decode (B rows) and HF's whole-sequence forward split
    differently. Measured (AMD EPYC, torch 2.13): AVX-512-BF16 kernels 0.0 (bit-identical, experts 100%); AVX2
    kernels (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2) 4.2e-3, experts 99.6%. With the bias added after a
    bf16 product (the negative control below): 1.26e-2 / 1.07e-2, experts 95.0% / 95.8%."""
    _needs("tiny-gpt-oss")
    mean_diff, exact = _gpt_oss_bf16_agreement()
    assert mean_diff <= GPT_OSS_BF16_MEAN_DIFF, mean_diff
    assert exact >= GPT_OSS_BF16_EXACT, exact


def test_gpt_oss_bf16_bound_catches_a_misplaced_rounding(monkeypatch):
    """Negative control: biased linears rounded twice (bf16 product, then + bias) break both bounds above."""
    _needs("tiny-gpt-oss")
    import r3rl.rollout.model.forward as forward

    def rounded_twice(x_TI, w_OI, b_O=None):
        y_TO = torch.bmm(x_TI.unsqueeze(1), w_OI.t().expand(x_TI.shape[0], -1, -1)).squeeze(1)
        return y_TO if b_O is None else y_TO + b_O

    monkeypatch.setattr(forward, "rowwise_linear", rounded_twice)
    mean_diff, exact = _gpt_oss_bf16_agreement()
    assert mean_diff > GPT_OSS_BF16_MEAN_DIFF and exact < GPT_OSS_BF16_EXACT, (mean_diff, exact)


def test_gpt_oss_weight_update_reaches_transposed_experts():
    """GPT-OSS experts are stored transposed; an update through their HF names lands in the engine's copy."""
    _needs("tiny-gpt-oss")
    engine = RolloutEngine(make_model("tiny-gpt-oss", seed=1), max_slots=2, max_seq_len=128)
    other = make_model("tiny-gpt-oss", seed=2)
    engine.update_weights(other.state_dict(), strict=True)
    fresh = RolloutEngine(other, max_slots=2, max_seq_len=128)
    a, b = engine.generate(_requests(2, temperature=0.0)), fresh.generate(_requests(2, temperature=0.0))
    assert [o.output_ids for o in a] == [o.output_ids for o in b]
    assert [o.output_logprobs for o in a] == [o.output_logprobs for o in b]


@pytest.mark.parametrize("preset", ENGINE_FAMILIES)
def test_continuous_batching_equals_one_at_a_time(preset):
    """CPU kernels are batch-invariant: a request's tokens, log-probs and trace do not depend on its neighbours
    (sigmoid routers and MLA's absorbed projections included)."""
    _needs(preset)
    engine = RolloutEngine(make_model(preset, seed=1), max_slots=3, max_seq_len=128)
    batched = engine.generate(_requests(4, temperature=1.0))
    alone = [engine.generate([req])[0] for req in _requests(4, temperature=1.0)]
    for b, a in zip(batched, alone, strict=True):
        assert b.output_ids == a.output_ids and b.output_logprobs == a.output_logprobs
        np.testing.assert_array_equal(b.trace.expert_ids, a.trace.expert_ids)


def test_deepseek_v3_caches_the_compressed_latent():
    _needs("tiny-deepseek-v3")
    model = make_model("tiny-deepseek-v3", seed=1)
    cfg = model.config
    engine = RolloutEngine(model, max_slots=3, max_seq_len=128)
    # one latent "head" of kv_lora_rank dims per token and layer, not num_heads x (k + v) head dims
    assert engine.kv.k_LNHbD.shape[2:] == (1, engine.table.block_size, cfg.kv_lora_rank)
    per_token_full = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    assert engine.kv.k_LNHbD[0, 0, :, 0].numel() * 2 < per_token_full


# --- GPU (pytest -m gpu on a CUDA machine) ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ENGINE_FAMILIES)
def test_cuda_graph_engine_matches_hf_forward_in_bf16(preset):
    _needs(preset)
    model = make_model(preset, seed=1, device="cuda", dtype=torch.bfloat16)
    engine = RolloutEngine(model, max_slots=8, max_seq_len=128)
    assert engine.config.use_cuda_graph, "bf16 grouped_mm on sm90+ decodes in CUDA graphs"
    outputs = engine.generate(_requests(6, temperature=1.0))
    assert engine._graphs, "decode ran without CUDA graphs"
    diffs, exact = [], []
    for out in outputs:  # bf16: both sides round, differently
        logp, ids_TLK = _hf_forward(model, out.prompt_ids + out.output_ids)
        P = len(out.prompt_ids)
        hf_logp = logp[P - 1 : -1].gather(1, torch.tensor(out.output_ids, device="cuda")[:, None])[:, 0].cpu()
        diffs.append((torch.tensor(out.output_logprobs) - hf_logp).abs())
        exact.append((np.sort(out.trace.expert_ids, -1) == np.sort(ids_TLK[:-1], -1)).all(-1).ravel())
    mean_diff, exact = float(torch.cat(diffs).mean()), float(np.concatenate(exact).mean())
    assert mean_diff <= 0.05 and exact >= 0.8, (mean_diff, exact)
    no_capture = RolloutEngine(model, max_slots=8, max_seq_len=128, capture_routing=False)
    assert [o.output_ids for o in no_capture.generate(_requests(6, temperature=1.0))] == [o.output_ids for o in outputs]
