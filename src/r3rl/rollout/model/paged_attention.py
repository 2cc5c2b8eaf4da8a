"""Decode attention straight from the paged KV cache (Triton, GPU): no gathered copy of the context.

One program per (decode row, kv head) computes the G query heads that share the kv head: it walks the row's block
table, loads each block's keys and values once, and keeps an online (flash) softmax in float32. Scores, softmax and
the weighted sum are float32 inside; the output is rounded once to the model dtype. Sliding windows start the walk at
the block holding the first visible position and mask the rest; attention sinks (GPT-OSS) join the softmax's
denominator at the end, as the extra softmax column HF drops. No host sync: CUDA-graph safe (the row's length comes
from `pos_B` on the device).

Before it, `qk_norm_rope_write` turns each row's fused q/k/v projection into normed, rotated queries and writes the
key and value into the row's block (one launch per layer instead of ~9 torch kernels), rounding as the torch ops do.

The torch path (kv_cache.KVCache.context: gather the blocks, then attention.decode_attention) stays the CPU, the
batch-invariant and the MLA path, the path of models with attention sinks (GPT-OSS: HF rounds its scores and sink
softmax to bf16, this kernel does not), and the reference these kernels are tested against:

    pytest tests/rollout/model/test_paged_attention.py      # the kernel under TRITON_INTERPRET=1 on CPU, and on GPU

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

__all__ = ["available", "fits", "qk_fits", "paged_decode_attention", "qk_norm_rope_write"]


def available() -> bool:
    return triton is not None


def fits(*, device: torch.device, head_dim: int, block_size: int, num_heads: int, num_kv_heads: int) -> bool:
    """The kernel applies: triton on CUDA, tl.dot-sized tiles (head dim and block size powers of two >= 16)."""
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0  # noqa: E731
    return (available() and device.type == "cuda" and pow2(head_dim) and pow2(block_size)
            and num_heads % num_kv_heads == 0)


def qk_fits(*, whole_projection_norm: bool, gated: bool, zero_centered: bool, clip_qkv: float | None,
            rotary_dims: int, head_dim: int) -> bool:
    """`qk_norm_rope_write` computes this layer's q/k: per-head RMSNorm or none, RoPE on the first `rotary_dims`
    (even) dims, no output gate, no clipping, no whole-projection or zero-centered norms (those keep the torch ops)."""
    return (not (whole_projection_norm or gated or zero_centered) and clip_qkv is None and rotary_dims % 2 == 0
            and 0 < rotary_dims <= head_dim)


def qk_norm_rope_write(qkv_BQ: torch.Tensor, qk_norm_XD: torch.Tensor | None, cos_PR: torch.Tensor,
                       sin_PR: torch.Tensor, pos_B: torch.Tensor, blk_B: torch.Tensor, off_B: torch.Tensor,
                       k_NHbD: torch.Tensor, v_NHbD: torch.Tensor, *, num_heads: int, num_kv_heads: int, eps: float
                       ) -> torch.Tensor:
    """One decode token per row: from the fused projection `qkv_BQ` ([q heads, k heads, v heads] x head dim), the
    per-head RMSNorm of q and k (`qk_norm_XD`: q_norm's weight on the q heads, k_norm's on the k heads; None: no
    norm), RoPE at position `pos_B` (cos and signed sin tables `[P, R]`, as `attention.rope_tables` makes them), the
    key and value written into the pools at (`blk_B`, `off_B`); returns the rotated queries `[B, Hq, D]`. One launch
    for what the torch path does in ~9 (copy, norm, weight, roll, three rounded RoPE ops, two KV scatters); every
    intermediate is rounded to the model dtype where those ops (and HF) round it."""
    (B, Q), (_, Hkv, bs, D), R = qkv_BQ.shape, k_NHbD.shape, cos_PR.shape[1]
    Hq = num_heads
    if Q != (Hq + 2 * Hkv) * D or Hkv != num_kv_heads or qkv_BQ.stride(1) != 1:  # noqa: SIM300 (Q: a width)
        raise ValueError(f"qk_norm_rope_write: qkv {tuple(qkv_BQ.shape)} (last dim contiguous) must be "
                         f"[B, (Hq={Hq} + 2 * Hkv={num_kv_heads}) * D={D}] for pools {tuple(k_NHbD.shape)}")
    if qk_norm_XD is not None and tuple(qk_norm_XD.shape) != (Hq + Hkv, D):
        raise ValueError(f"qk_norm_rope_write: qk norm weight {tuple(qk_norm_XD.shape)}, expected "
                         f"[{Hq + Hkv}, {D}]")
    q_BHD = torch.empty(B, Hq, D, dtype=qkv_BQ.dtype, device=qkv_BQ.device)
    norm = qk_norm_XD if qk_norm_XD is not None else qkv_BQ  # a dummy pointer without a norm
    _qk_rope_write_kernel[(B, Hq + 2 * Hkv)](
        qkv_BQ, norm, cos_PR, sin_PR, pos_B, blk_B, off_B, k_NHbD, v_NHbD, q_BHD, qkv_BQ.stride(0), float(eps),
        HQ=Hq, HKV=Hkv, D=D, R=R, BS=bs, HAS_NORM=qk_norm_XD is not None, num_warps=1)
    return q_BHD


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

    @triton.jit
    def _qk_rope_write_kernel(qkv_ptr, norm_ptr, cos_ptr, sin_ptr, pos_ptr, blk_ptr, off_ptr, k_ptr, v_ptr, q_ptr,
                              stride_b, eps, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                              BS: tl.constexpr, HAS_NORM: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)  # q heads, then k heads, then v heads
        dt = q_ptr.dtype.element_ty
        d = tl.arange(0, D)
        row = qkv_ptr + b.to(tl.int64) * stride_b
        slot = (tl.load(blk_ptr + b).to(tl.int64) * HKV * BS + tl.load(off_ptr + b)) * D  # + head * BS * D
        if h < HQ + HKV:
            partner = tl.where(d < R, (d + R // 2) % R, d)  # rotate_half's source of each rotated dim
            x = tl.load(row + h * D + d).to(tl.float32)
            x_p = tl.load(row + h * D + partner).to(tl.float32)
            if HAS_NORM:  # HF: x * rsqrt(mean(x^2) + eps), rounded, then times the weight, rounded
                rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, 0) / D + eps))
                x = (x * rstd).to(dt).to(tl.float32)
                x = (x * tl.load(norm_ptr + h * D + d).to(tl.float32)).to(dt).to(tl.float32)
                x_p = (x_p * rstd).to(dt).to(tl.float32)
                x_p = (x_p * tl.load(norm_ptr + h * D + partner).to(tl.float32)).to(dt).to(tl.float32)
            pos = tl.load(pos_ptr + b).to(tl.int64)
            rot = d < R
            c = tl.load(cos_ptr + pos * R + d, mask=rot, other=1.0).to(tl.float32)
            s = tl.load(sin_ptr + pos * R + d, mask=rot, other=0.0).to(tl.float32)
            # x * cos + rotate_half(x) * sin, three rounded ops (attention.rope); dims past R pass through
            y = tl.where(rot, ((x * c).to(dt).to(tl.float32) + (x_p * s).to(dt).to(tl.float32)), x)
            if h < HQ:
                tl.store(q_ptr + (b.to(tl.int64) * HQ + h) * D + d, y.to(dt))
            else:
                tl.store(k_ptr + slot + (h - HQ) * BS * D + d, y.to(dt))
        else:
            v = tl.load(row + h * D + d)
            tl.store(v_ptr + slot + (h - HQ - HKV) * BS * D + d, v)
