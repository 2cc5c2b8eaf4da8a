"""Decode attention straight from the paged KV cache (Triton, GPU): no gathered copy of the context.

One program per (decode row, kv head) computes the G query heads that share the kv head: it walks the row's block
table, loads each block's keys and values once, and keeps an online (flash) softmax in float32. Scores, softmax and
the weighted sum are float32 inside; the output is rounded once to the model dtype. Sliding windows start the walk at
the block holding the first visible position and mask the rest; attention sinks (GPT-OSS) join the softmax's
denominator at the end, as the extra softmax column HF drops. No host sync: CUDA-graph safe (the row's length comes
from `pos_B` on the device).

The torch path (kv_cache.KVCache.context: gather the blocks, then attention.decode_attention) stays the CPU, the
batch-invariant and the MLA path, and the reference these kernels are tested against:

    pytest tests/rollout/test_paged_attention.py      # the kernel under TRITON_INTERPRET=1 on CPU, and on GPU

Tensor suffixes: B decode rows, H heads, D head dim, N blocks, b block size, S slots, M blocks per slot.
"""

from __future__ import annotations

import torch

try:  # optional: CPU CI has no triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = ["available", "fits", "paged_decode_attention"]


def available() -> bool:
    return triton is not None


def fits(*, device: torch.device, head_dim: int, block_size: int, num_heads: int, num_kv_heads: int) -> bool:
    """The kernel applies: triton on CUDA, tl.dot-sized tiles (head dim and block size powers of two >= 16)."""
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0  # noqa: E731
    return (available() and device.type == "cuda" and pow2(head_dim) and pow2(block_size)
            and num_heads % num_kv_heads == 0)


def paged_decode_attention(q_BHD: torch.Tensor, k_NHbD: torch.Tensor, v_NHbD: torch.Tensor, table_SM: torch.Tensor,
                           pos_B: torch.Tensor, *, scale: float, window: int | None = None,
                           sinks_H: torch.Tensor | None = None) -> torch.Tensor:
    """Row b's query heads `q_BHD[b]` over its positions [0, pos_B[b]] (and > pos_B[b] - window), read from the
    blocks `table_SM[b]` of one layer's pools `[blocks, kv_heads, block_size, head_dim]`. Returns `[B, Hq * D]`."""
    (B, Hq, D), (_, Hkv, bs, Dk) = q_BHD.shape, k_NHbD.shape
    if Dk != D or v_NHbD.shape != k_NHbD.shape or Hq % Hkv or q_BHD.stride(2) != 1:
        raise ValueError(f"paged_decode_attention: q {tuple(q_BHD.shape)} (last dim contiguous) against k/v pools "
                         f"{tuple(k_NHbD.shape)}/{tuple(v_NHbD.shape)}")
    if not (k_NHbD.is_contiguous() and v_NHbD.is_contiguous()):
        raise ValueError("paged_decode_attention: the KV pools must be contiguous")
    G = Hq // Hkv
    out_BHD = torch.empty(B, Hq, D, dtype=q_BHD.dtype, device=q_BHD.device)
    sinks = sinks_H if sinks_H is not None else q_BHD  # a dummy pointer when there are no sinks
    _decode_kernel[(B, Hkv)](
        q_BHD, k_NHbD, v_NHbD, table_SM, pos_B, sinks, out_BHD,
        q_BHD.stride(0), q_BHD.stride(1), table_SM.stride(0), out_BHD.stride(0),
        float(scale), int(window or 0),
        G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, BS=bs, HAS_WINDOW=window is not None,
        HAS_SINKS=sinks_H is not None, DOT_PRECISION="ieee" if q_BHD.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )
    return out_BHD.view(B, Hq * D)


if triton is not None:

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, pos_ptr, sinks_ptr, out_ptr, stride_qb, stride_qh,
                       stride_tb, stride_ob, scale, window, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                       BS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        Hkv = tl.num_programs(1)
        pos = tl.load(pos_ptr + b)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        t = tl.arange(0, BS)
        heads = h * G + g
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None], other=0.0)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        first = 0
        if HAS_WINDOW:
            first = tl.maximum(pos - window + 1, 0)
        kv_head = (h * BS * D).to(tl.int64)
        for blk in range(first // BS, pos // BS + 1):
            block = tl.load(table_ptr + b * stride_tb + blk).to(tl.int64)
            base = block * Hkv * BS * D + kv_head
            k = tl.load(k_ptr + base + t[:, None] * D + d[None, :])
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [G_PAD, BS], float32
            p_pos = blk * BS + t
            visible = (p_pos <= pos) & (p_pos >= first)
            s = tl.where(visible[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + base + t[:, None] * D + d[None, :])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        if HAS_SINKS:  # one more softmax column per head, dropped: it only adds to the denominator
            sink = tl.load(sinks_ptr + heads, mask=g < G, other=0.0).to(tl.float32)
            m_f = tl.maximum(m_i, sink)
            rescale = tl.exp(m_i - m_f)
            l_i = l_i * rescale + tl.exp(sink - m_f)
            acc = acc * rescale[:, None]
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(g < G)[:, None])
