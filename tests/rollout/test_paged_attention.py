"""The Triton decode attention over paged KV (paged_attention.py) against the torch path (gather the blocks, then
attention.decode_attention): under Triton's CPU interpreter (float32) and, on GPU, in bfloat16 inside the engine.

    pytest tests/rollout/test_paged_attention.py -q       # the interpreter test skips without triton
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from r3rl.rollout import paged_attention as pa

# Runs in a subprocess with TRITON_INTERPRET=1 (the interpreter must be chosen before triton is imported).
_INTERPRET = r"""
import torch
from r3rl.rollout.attention import AttentionWeights, decode_attention, decode_bias
from r3rl.rollout.paged_attention import paged_decode_attention

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
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _INTERPRET], capture_output=True, text=True, timeout=180, env=env)
    assert out.stdout.strip().endswith("ok"), out.stderr[-3000:]


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
    from r3rl.rollout.attention import AttentionWeights, decode_attention, decode_bias

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
