"""The rollout engine's attention block, shared by every family: fused QKV with optional biases, q/k norms (per head
or over the whole projection; zero-centered, `x * (1 + w)`, for Qwen3-Next), full or partial RoPE, GQA over the paged
KV cache, an optional per-head output gate (Qwen3-Next's q_proj emits it), and per layer an optional sliding window
and attention sinks (GPT-OSS). Used by `r3rl.rollout.model.forward.MoEForward`; not a public API.

Without a window or sinks, prefill runs `scaled_dot_product_attention`. Decode reads the KV blocks in place on GPU
(`paged_attention.py`); elsewhere `decode_attention` is a batched matmul over the gathered context, as HF's eager
attention computes it (float32 softmax inside, rounded once).

Tensor suffixes: T tokens, B decode rows, N prefill requests, P positions, H heads or hidden, Q fused qkv width,
D head dim, X q + k heads, R rows of a flattened (row, kv head) product, G q heads per kv head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

__all__ = ["AttentionWeights", "rope_tables", "rope", "rms_norm", "rowwise_linear", "qkv", "prefill_attention",
           "decode_attention", "decode_bias"]


@dataclass
class AttentionWeights:
    """One decoder layer's attention weights (engine copies) and its per-layer options."""

    qkv_QH: torch.Tensor  # q, k, v projections fused along the output dim
    qkv_bias_Q: torch.Tensor | None
    o_HQ: torch.Tensor
    o_bias_H: torch.Tensor | None
    qk_norm_XD: torch.Tensor | None = None  # per-head norms (Qwen3-MoE, GLM-4.5): q_norm on q heads, then k_norm
    q_norm: torch.Tensor | None = None  # norms over the whole q / k projection (OLMoE, MiniMax-M2)
    k_norm: torch.Tensor | None = None
    window: int | None = None  # sliding window: a token sees itself and the window - 1 tokens before it
    sinks_H: torch.Tensor | None = None  # per q head sink logit, an extra softmax column that is then dropped
    gated: bool = False  # q_proj emits [query, gate] per head; the output is multiplied by sigmoid(gate) (Qwen3-Next)
    norm_offset: bool = False  # zero-centered q/k norms: normed * (1 + w) in float32 (Qwen3-Next)


def qkv(w: AttentionWeights, h_TH: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor, *, num_heads: int,
        num_kv_heads: int, head_dim: int, eps: float, clip_qkv: float | None, linear):
    """q `[T, Hq, D]`, k and v `[T, Hkv, D]` (views), and the output gate `[T, Hq * D]` of a gated layer (else None);
    the q and k heads are normed and rotated as one tensor."""
    T, D, Hq, Hkv = h_TH.shape[0], head_dim, num_heads, num_kv_heads
    qkv_TQ = linear(h_TH, w.qkv_QH, w.qkv_bias_Q)
    gate_TQ = None
    if w.gated:  # per head [query, gate] (HF chunks q_proj's output per head)
        qg_THE = qkv_TQ[:, : 2 * Hq * D].view(T, Hq, 2 * D)
        gate_TQ = qg_THE[..., D:].reshape(T, Hq * D)
        qk_TXD = torch.cat([qg_THE[..., :D], qkv_TQ[:, 2 * Hq * D : (2 * Hq + Hkv) * D].view(T, Hkv, D)], dim=1)
        v_THD = qkv_TQ[:, (2 * Hq + Hkv) * D :].view(T, Hkv, D)
    else:
        qk_TXD = qkv_TQ[:, : (Hq + Hkv) * D].view(T, Hq + Hkv, D)
        v_THD = qkv_TQ[:, (Hq + Hkv) * D :].view(T, Hkv, D)
    if w.q_norm is not None:  # RMSNorm over each whole projection
        q_TQ, k_TQ = qkv_TQ[:, : Hq * D], qkv_TQ[:, Hq * D : (Hq + Hkv) * D]
        qk_TXD = torch.cat([rms_norm(q_TQ, w.q_norm, eps), rms_norm(k_TQ, w.k_norm, eps)], dim=-1)
        qk_TXD = qk_TXD.view(T, Hq + Hkv, D)
    if clip_qkv is not None:
        qk_TXD, v_THD = qk_TXD.clamp(-clip_qkv, clip_qkv), v_THD.clamp(-clip_qkv, clip_qkv)
    if w.qk_norm_XD is not None and w.norm_offset:  # zero-centered per-head RMSNorm, in float32 (Qwen3-Next)
        qk_TXD = rms_norm(qk_TXD, w.qk_norm_XD, eps, offset=True)
    elif w.qk_norm_XD is not None:  # RMSNorm per head, q_norm on q heads and k_norm on k heads
        qk_TXD = F.rms_norm(qk_TXD, (D,), eps=eps) * w.qk_norm_XD
    qk_TXD = rope(qk_TXD, cos_TD, sin_TD)
    return qk_TXD[:, :Hq], qk_TXD[:, Hq:], v_THD, gate_TQ


def prefill_attention(w: AttentionWeights, q_NHPD: torch.Tensor, k_NHPD: torch.Tensor, v_NHPD: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Causal attention of right-padded prompts (a real token never attends to a pad). Returns `[N, Hq, P, D]`."""
    Hq, Hkv = q_NHPD.shape[1], k_NHPD.shape[1]
    if w.window is None and w.sinks_H is None:
        return F.scaled_dot_product_attention(q_NHPD, k_NHPD, v_NHPD, is_causal=True, scale=scale,
                                              enable_gqa=Hq != Hkv)
    N, _, P, _ = q_NHPD.shape
    k_NHPD, v_NHPD = k_NHPD.repeat_interleave(Hq // Hkv, dim=1), v_NHPD.repeat_interleave(Hq // Hkv, dim=1)
    scores_NHPP = torch.matmul(q_NHPD, k_NHPD.transpose(2, 3)) * scale
    i_P = torch.arange(P, device=q_NHPD.device)
    hidden_PP = i_P.unsqueeze(0) > i_P.unsqueeze(1)  # [query, key]: the future
    if w.window is not None:
        hidden_PP |= i_P.unsqueeze(0) <= i_P.unsqueeze(1) - w.window
    scores_NHPP = scores_NHPP.masked_fill(hidden_PP, float("-inf"))
    probs_NHPP = _softmax_with_sinks(scores_NHPP, None if w.sinks_H is None else w.sinks_H.view(1, Hq, 1, 1))
    return torch.matmul(probs_NHPP.to(v_NHPD.dtype), v_NHPD)


def decode_bias(pos_B: torch.Tensor, T: int, num_heads: int, num_kv_heads: int, dtype: torch.dtype,
                window: int | None = None) -> torch.Tensor:
    """Additive mask `[B * Hkv, G, T]`, built once per step: row b sees positions <= pos_B[b] (and, with a window,
    > pos_B[b] - window)."""
    B, G = pos_B.shape[0], num_heads // num_kv_heads
    j_T = torch.arange(T, device=pos_B.device)
    hidden_BT = j_T.unsqueeze(0) > pos_B.unsqueeze(1)
    if window is not None:
        hidden_BT = hidden_BT | (j_T.unsqueeze(0) <= pos_B.unsqueeze(1) - window)
    return torch.zeros(B, num_kv_heads, G, T, dtype=dtype, device=pos_B.device).masked_fill_(
        hidden_BT.view(B, 1, 1, T), float("-inf")).view(B * num_kv_heads, G, T)


def decode_attention(w: AttentionWeights, q_BHD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor,
                     bias_RGT: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per row over its slot's cached keys (strided views: no copy). Returns `[B, Hq * D]`."""
    (B, Hq, D), (Hkv, T) = q_BHD.shape, k_BHTD.shape[1:3]
    k_RTD, v_RTD = k_BHTD.reshape(B * Hkv, T, D), v_BHTD.reshape(B * Hkv, T, D)  # views: no copy
    scores_RGT = torch.baddbmm(bias_RGT, q_BHD.reshape(B * Hkv, Hq // Hkv, D), k_RTD.transpose(1, 2), alpha=scale)
    if w.sinks_H is None:
        probs_RGT = torch.softmax(scores_RGT, dim=-1)  # float32 inside, rounded once, as HF's eager softmax
    else:
        sinks_RG1 = w.sinks_H.view(1, Hkv, Hq // Hkv).expand(B, -1, -1).reshape(B * Hkv, Hq // Hkv, 1)
        probs_RGT = _softmax_with_sinks(scores_RGT, sinks_RG1)
    return torch.bmm(probs_RGT, v_RTD).view(B, Hq * D)


def _softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim with one extra sink column per head that absorbs mass and is then dropped, as
    GPT-OSS computes it (max-subtracted, in the scores' dtype)."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    combined = torch.cat([scores, sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    return torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]


def rope_tables(model: PreTrainedModel, max_seq_len: int, device: torch.device, dtype: torch.dtype):
    """cos and signed sin `[max_seq_len, R]` (R = rotary dims: the head dim, or less with partial rotary) as the HF
    rotary module computes them (float32, then cast); the first half of sin is negated for `rope`. Static RoPE only."""
    rotary = next(m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor))
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if "dynamic" in rope_type or rope_type == "longrope":
        raise NotImplementedError(f"the rollout engine needs a static RoPE: got rope_type={rope_type!r}")
    freqs_PF = torch.arange(max_seq_len, device=device).float().unsqueeze(1) * rotary.inv_freq.to(device).float()
    emb_PD = torch.cat((freqs_PF, freqs_PF), dim=-1)
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    sign_D = torch.ones(emb_PD.shape[1], device=device)
    sign_D[: emb_PD.shape[1] // 2] = -1.0
    return (emb_PD.cos() * scaling).to(dtype), (emb_PD.sin() * scaling).to(dtype) * sign_D.to(dtype)


def rope(x_THD: torch.Tensor, cos_TR: torch.Tensor, signed_sin_TR: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin on the first R dims of each head (all of them without partial rotary), with
    rotate_half(x) * sin = roll(x, R/2) * [-sin_1, sin_2]; the remaining dims pass through.

    Three separately rounded ops, as HF computes it (`q * cos + rotate_half(q) * sin`, or GPT-OSS's
    `x1 * cos - x2 * sin`, which rounds the same): a fused multiply-add (addcmul) rounds the second product away and
    in bfloat16 differs from HF on ~10% of the rotated elements, which GPT-OSS's unnormed, YaRN-scaled q.k amplifies."""
    R = cos_TR.shape[-1]
    if x_THD.shape[-1] != R:
        return torch.cat([rope(x_THD[..., :R], cos_TR, signed_sin_TR), x_THD[..., R:]], dim=-1)
    rolled_THD = x_THD.roll(R // 2, dims=-1)
    return x_THD * cos_TR.unsqueeze(1) + rolled_THD * signed_sin_TR.unsqueeze(1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor:
    """HF's RMSNorm (float32 statistics, then the weight) as one op. A float32 weight on a lower-precision input
    (GPT-OSS keeps its norms in float32) is applied in float32, then the result is cast once, as HF does. `offset`:
    a zero-centered weight (Qwen3-Next), `normed * (1 + w)` in float32, then one cast."""
    if offset:
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * (1.0 + weight.float())).to(x.dtype)
    if weight.dtype != x.dtype:
        return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps=eps).to(x.dtype)
    return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)


def rowwise_linear(x_TI: torch.Tensor, w_OI: torch.Tensor, b_O: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b as T independent [1, I] @ [I, O] products: each row's result does not depend on T. The bias goes
    into the product's accumulator and the sum is rounded once, as F.linear (HF) does; adding it after a bfloat16
    product would round twice (GPT-OSS's biased router logits then differ from HF's on ~30% of entries)."""
    T = x_TI.shape[0]
    if b_O is None:
        return torch.bmm(x_TI.unsqueeze(1), w_OI.t().expand(T, -1, -1)).squeeze(1)
    return torch.baddbmm(b_O.expand(T, 1, -1), x_TI.unsqueeze(1), w_OI.t().expand(T, -1, -1)).squeeze(1)
