"""The Triton decode attention over paged KV (paged_attention.py) against the torch path (gather the blocks, then
attention.decode_attention): under Triton's CPU interpreter (float32) and, on GPU, in bfloat16 inside the engine.

    pytest tests/rollout/model/test_paged_attention.py -q       # the interpreter test skips without triton
"""

from __future__ import annotations

import pytest
import torch
from _triton_util import compile_sm90, run_interpreted

from r3rl.rollout.model import paged_attention as pa

# Runs in a subprocess with TRITON_INTERPRET=1 (the interpreter must be chosen before triton is imported).
_INTERPRET = r"""
import torch
from r3rl.rollout.model.attention import AttentionWeights, decode_attention, decode_bias
from r3rl.rollout.model.paged_attention import paged_decode_attention

def reference(q, k_pool, v_pool, table, pos, scale, window, sinks):
    B, Hq, D = q.shape
    Hkv, bs = k_pool.shape[1], k_pool.shape[2]
    T = table.shape[1] * bs
    idx = table[:B].unsqueeze(1)
    heads = torch.arange(Hkv).view(1, -1, 1)
    k, v = k_pool[idx, heads].flatten(2, 3), v_pool[idx, heads].flatten(2, 3)
    w = AttentionWeights(qkv_QH=None, qkv_bias_Q=None, o_HQ=None, o_bias_H=None, window=window, sinks_H=sinks)
    return decode_attention(w, q, k, v, decode_bias(pos, T, Hq, Hkv, q.dtype, window), scale)

torch.manual_seed(0)
N, Hkv, bs, D, Hq, B, M = 24, 2, 16, 16, 6, 4, 4
k_pool, v_pool = torch.randn(N, Hkv, bs, D), torch.randn(N, Hkv, bs, D)
table = torch.randperm(N - 1)[: 5 * M].add(1).view(5, M)   # 5 slots, distinct blocks, none is the null block 0
pos = torch.tensor([0, 17, 40, 63])
q_full = torch.randn(B, Hq + Hkv, D)   # q as a view of a wider qkv tensor, as the engine passes it
q = q_full[:, :Hq]
for window in (None, 20):
    for sinks in (None, torch.randn(Hq)):
        got = paged_decode_attention(q, k_pool, v_pool, table, pos, scale=0.25, window=window, sinks_H=sinks)
        want = reference(q, k_pool, v_pool, table, pos, 0.25, window, sinks)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
# negative controls: a row reading another slot's blocks, an off-by-one length; both caught by the same comparison
bad = paged_decode_attention(q, k_pool, v_pool, table.roll(1, 0), pos, scale=0.25)
assert (bad - reference(q, k_pool, v_pool, table, pos, 0.25, None, None)).abs().max() > 1e-2
bad = paged_decode_attention(q, k_pool, v_pool, table, pos - 1, scale=0.25)
assert (bad[1:] - reference(q, k_pool, v_pool, table, pos, 0.25, None, None)[1:]).abs().max() > 1e-2
print("ok")
"""


@pytest.mark.skipif(not pa.available(), reason="triton not installed (the kernel runs in the GPU test)")
def test_paged_decode_kernel_in_interpreter_matches_the_gather_path():
    run_interpreted(_INTERPRET)


def test_the_kernel_applies_only_where_its_tiles_fit():
    cuda = torch.device("cuda")
    ok = dict(device=cuda, head_dim=128, block_size=16, num_heads=32, num_kv_heads=4)
    assert pa.fits(**ok) == pa.available()
    assert not pa.fits(**{**ok, "device": torch.device("cpu")})
    assert not pa.fits(**{**ok, "block_size": 8})  # tl.dot tiles are >= 16
    assert not pa.fits(**{**ok, "head_dim": 96})


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and pa.available()), reason="needs CUDA and triton")
@pytest.mark.parametrize("window,sinks", [(None, False), (128, True)])  # Qwen3-MoE-like; GPT-OSS-like
def test_paged_decode_kernel_in_bf16_is_as_close_to_float32_as_the_gather_path(window, sinks):
    """Probe attention shape (32 q heads, 4 kv heads, head dim 128), 64 rows with contexts up to 700 tokens in
    scattered blocks. The kernel (float32 softmax inside) must be at least as close to a float32 computation as the
    bf16 torch path the engine used before (scores rounded to bf16, as HF's eager attention)."""
    from r3rl.rollout.model.attention import AttentionWeights, decode_attention, decode_bias

    g = torch.Generator(device="cuda").manual_seed(0)
    N, Hkv, bs, D, Hq, B, M = 3000, 4, 16, 128, 32, 64, 44
    k_pool = torch.randn(N, Hkv, bs, D, device="cuda", generator=g)
    v_pool = torch.randn(N, Hkv, bs, D, device="cuda", generator=g)
    table = (torch.randperm(N - 1, device="cuda", generator=g)[: B * M] + 1).view(B, M)
    pos = torch.randint(0, M * bs, (B,), device="cuda", generator=g)
    q = torch.randn(B, Hq, D, device="cuda", generator=g)
    sinks_H = torch.randn(Hq, device="cuda", generator=g) if sinks else None

    def gather_path(q, k_pool, v_pool, sinks_H):
        idx, heads = table.unsqueeze(1), torch.arange(Hkv, device="cuda").view(1, -1, 1)
        k, v = k_pool[idx, heads].flatten(2, 3), v_pool[idx, heads].flatten(2, 3)
        w = AttentionWeights(qkv_QH=None, qkv_bias_Q=None, o_HQ=None, o_bias_H=None, window=window, sinks_H=sinks_H)
        return decode_attention(w, q, k, v, decode_bias(pos, M * bs, Hq, Hkv, q.dtype, window), D**-0.5)

    want = gather_path(q, k_pool, v_pool, sinks_H)  # float32
    bf = lambda t: None if t is None else t.bfloat16()  # noqa: E731
    torch_err = (gather_path(bf(q), bf(k_pool), bf(v_pool), bf(sinks_H)).float() - want).abs().max()
    got = pa.paged_decode_attention(bf(q), bf(k_pool), bf(v_pool), table, pos, scale=D**-0.5, window=window,
                                    sinks_H=bf(sinks_H))
    kernel_err = (got.float() - want).abs().max()
    assert kernel_err <= torch_err * 1.05 + 1e-3, (kernel_err, torch_err)
    got32 = pa.paged_decode_attention(q, k_pool, v_pool, table, pos, scale=D**-0.5, window=window, sinks_H=sinks_H)
    torch.testing.assert_close(got32, want, atol=1e-4, rtol=1e-4)  # float32 pools: IEEE dots, no TF32


# --- q/k norm + RoPE + KV write in one kernel ------------------------------------------------------------------------
_INTERPRET_QK = r"""
import sys, torch
from test_paged_attention import qk_case
if sys.argv[1] == "bf16":
    from _triton_util import interpreter_with_gpu_bf16
    interpreter_with_gpu_bf16()
dtype = torch.bfloat16 if sys.argv[1] == "bf16" else torch.float32
for norm in (True, False):
    for R in (16, 8):   # full rotary; partial (GLM-4.5 rotates half of each head)
        print(norm, R, qk_case(dtype, norm, R))
print("ok")
"""


def qk_case(dtype, norm: bool, R: int, device: str = "cpu") -> dict:
    """Kernel vs the torch path (attention.qkv, then KVCache.write's scatter) on one decode step; asserts."""
    from r3rl.rollout.model.attention import AttentionWeights, qkv
    from r3rl.rollout.model.kv_cache import TokenWhere
    from r3rl.rollout.model.paged_attention import qk_norm_rope_write

    g = torch.Generator().manual_seed(R + norm)
    B, Hq, Hkv, D, N, bs = 5, 4, 2, 16, 9, 16
    qkv_BQ = (torch.randn(B, (Hq + 2 * Hkv) * D, generator=g) * 2).to(dtype)
    norm_XD = (1 + 0.3 * torch.randn(Hq + Hkv, D, generator=g)).to(dtype) if norm else None
    inv = 1.0 / 10000 ** (torch.arange(0, R, 2).float() / R)
    emb = torch.cat([torch.arange(64).float().unsqueeze(1) * inv] * 2, dim=1)
    sign = torch.cat([-torch.ones(R // 2), torch.ones(R // 2)])
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype) * sign.to(dtype)
    pos = torch.tensor([0, 5, 17, 40, 62])  # pos + 1 (the control) stays inside the 64-row tables
    where = TokenWhere(blk=torch.tensor([3, 1, 8, 4, 6]).to(device), off=(pos % bs).to(device))
    qkv_BQ, cos, sin, pos = qkv_BQ.to(device), cos.to(device), sin.to(device), pos.to(device)
    norm_XD = None if norm_XD is None else norm_XD.to(device)
    w = AttentionWeights(qkv_QH=None, qkv_bias_Q=None, o_HQ=None, o_bias_H=None, qk_norm_XD=norm_XD)
    q_want, k_want, v_want, _ = qkv(w, qkv_BQ, cos[pos], sin[pos], num_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                                    eps=1e-6, clip_qkv=None, linear=lambda x, W, b: x)
    k_pool_want = torch.zeros(N, Hkv, bs, D, dtype=dtype, device=device)
    v_pool_want = torch.zeros_like(k_pool_want)
    k_pool_want[where.blk, :, where.off] = k_want
    v_pool_want[where.blk, :, where.off] = v_want
    k_pool, v_pool = torch.zeros_like(k_pool_want), torch.zeros_like(v_pool_want)
    q = qk_norm_rope_write(qkv_BQ, norm_XD, cos, sin, pos, where.blk, where.off, k_pool, v_pool, num_heads=Hq,
                           num_kv_heads=Hkv, eps=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(q, q_want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k_pool, k_pool_want, atol=1e-5, rtol=1e-5)
    same = ((q == q_want).float().mean().item(), (k_pool == k_pool_want).float().mean().item())
    if dtype == torch.bfloat16:  # bitwise but for float32 sums that round differently now and then
        assert min(same) >= 0.98, same
    assert torch.equal(v_pool, v_pool_want)
    # negative control: the next position's rotation (an off-by-one pos) is caught by the same comparison
    q_bad = qk_norm_rope_write(qkv_BQ, norm_XD, cos, sin, pos + 1, where.blk, where.off, k_pool.clone(),
                               v_pool.clone(), num_heads=Hq, num_kv_heads=Hkv, eps=1e-6)
    assert (q_bad.float() - q_want.float()).abs().max() > 1e-2
    return {"q bitwise": same[0], "k bitwise": same[1]}


@pytest.mark.skipif(not pa.available(), reason="triton not installed (the kernel runs in the GPU test)")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_qk_norm_rope_write_kernel_in_interpreter_matches_the_torch_path(dtype):
    run_interpreted(_INTERPRET_QK, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and pa.available()), reason="needs CUDA and triton")
def test_qk_norm_rope_write_kernel_on_gpu_matches_the_torch_path():
    for norm in (True, False):
        for R in (16, 8):
            print(norm, R, qk_case(torch.bfloat16, norm, R, device="cuda"))


@pytest.mark.skipif(not pa.available(), reason="triton not installed")
def test_qk_norm_rope_write_kernel_compiles_for_sm90():
    """The interpreter runs the kernel's Python; compile it for an H100/H200 here (no GPU needed), with and without
    the norm, full and partial rotary."""
    types = dict(qkv_ptr="*bf16", norm_ptr="*bf16", cos_ptr="*bf16", sin_ptr="*bf16", pos_ptr="*i64", blk_ptr="*i64",
                 off_ptr="*i64", k_ptr="*bf16", v_ptr="*bf16", q_ptr="*bf16", stride_b="i32", eps="fp32")
    for norm, R in [(True, 128), (False, 64)]:
        ptx = compile_sm90(pa._qk_rope_write_kernel, types, dict(HQ=32, HKV=4, D=128, R=R, BS=16, HAS_NORM=norm))
        assert ("sqrt.rn.f32" in ptx) == norm, (norm, R)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and pa.available()), reason="needs CUDA and triton")
def test_models_with_attention_sinks_keep_the_torch_decode_attention():
    """GPT-OSS's HF attention rounds scores and the sink softmax to bf16; the kernel's float32 softmax moved its
    engine-vs-HF gate from 0.030 to 0.117 mean |d logprob| on an H200 (fail), so sinks keep the gathered torch path
    (the gate then passes again, with the fused experts too). Qwen3-MoE (no sinks) reads the blocks in place."""
    from r3rl.models.presets import make_model
    from r3rl.rollout import RolloutEngine

    for preset, in_place in (("tiny-gpt-oss", False), ("tiny-qwen3-moe", True)):
        engine = RolloutEngine(make_model(preset, seed=0, device="cuda", dtype=torch.bfloat16), max_slots=2,
                               max_seq_len=64)
        assert engine.model.decodes_in_place(engine.kv) is in_place, preset
