"""Multi-head latent attention (MLA, DeepSeek-V3 / Kimi-K2) for the rollout engine, over a compressed-latent cache.

Per token the cache keeps only the normalized KV latent `c` (kv_lora_rank dims) and the shared rotary key `kr`
(qk_rope_head_dim dims), not per-head keys and values. In the engine's KV buffers (one "kv head"): K holds `c`,
V holds `kr` zero-padded to kv_lora_rank dims.

  prefill  expands the latents of the prompt (kv_b_proj) into per-head keys and values and runs causal attention,
           as HF does
  decode   absorbs kv_b_proj into the query and the output ("weight absorption"): scores = (q_nope W_uk) . c +
           q_rot . kr, out = (probs @ c) W_uv, so a step reads the latents and never expands the context

RoPE is applied to the rotary parts only, interleaved as DeepSeek lays them out (`rope_interleave`, the default), or
in halves. Used by `r3rl.rollout.model.forward.MoEForward`; not a public API.

Tensor suffixes: T tokens, B decode rows, N prefill requests, P positions, H heads, C kv latent (kv_lora_rank),
R rotary dims, A nope dims of q/k, U value dims, L q latent (q_lora_rank), M model hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r3rl.rollout.model.attention import rms_norm, rope
from r3rl.rollout.model.kv_cache import KVCache, TokenWhere

__all__ = ["MLAWeights", "mla_prefill", "mla_decode"]


@dataclass
class MLAWeights:
    """One layer's MLA weights (engine copies) and dimensions."""

    num_heads: int
    nope_dim: int  # A
    rope_dim: int  # R
    v_dim: int  # U
    kv_lora_rank: int  # C
    interleave: bool  # DeepSeek's interleaved rotary layout
    scale: float  # softmax scale (with the YaRN mscale when the config asks for it)
    q_eps: float
    kv_eps: float
    kv_a_QM: torch.Tensor  # kv_a_proj_with_mqa: [C + R, M]
    kv_a_bias: torch.Tensor | None
    kv_norm_C: torch.Tensor
    kv_b_XC: torch.Tensor  # kv_b_proj: [H * (A + U), C]
    o_MX: torch.Tensor
    o_bias_M: torch.Tensor | None
    q_XM: torch.Tensor | None = None  # q_proj, when there is no q latent
    q_a_LM: torch.Tensor | None = None  # q_a_proj, q_a_layernorm, q_b_proj
    q_a_bias_L: torch.Tensor | None = None
    q_norm_L: torch.Tensor | None = None
    q_b_XL: torch.Tensor | None = None
    window: None = None  # MLA layers have no sliding window (the decode mask is keyed by it)

    def absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk `[H, A, C]` and W_uv `[H, U, C]`: views of kv_b_proj, so weight updates reach them."""
        kv_b_HXC = self.kv_b_XC.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return kv_b_HXC[:, : self.nope_dim], kv_b_HXC[:, self.nope_dim :]


def mla_prefill(w: MLAWeights, h_TH: torch.Tensor, N: int, P: int, cos_TR: torch.Tensor, sin_TR: torch.Tensor,
                kv: KVCache, layer: int, where: TokenWhere, linear) -> torch.Tensor:
    """Attention output (after o_proj) `[T, M]` of N right-padded prompts; writes their latents into the cache."""
    H, A, U, C = w.num_heads, w.nope_dim, w.v_dim, w.kv_lora_rank
    q_nope_THA, q_rot_THR = _queries(w, h_TH, cos_TR, sin_TR, linear)
    c_TC, kr_TR = _latents(w, h_TH, cos_TR, sin_TR, linear)
    _write(kv, layer, where, c_TC, kr_TR, C)
    kv_THX = linear(c_TC, w.kv_b_XC).view(-1, H, A + U)
    k_THD = torch.cat([kv_THX[..., :A], kr_TR.unsqueeze(1).expand(-1, H, -1)], dim=-1)
    q_THD = torch.cat([q_nope_THA, q_rot_THR], dim=-1)
    # values zero-padded to the q/k head dim: SDPA's fused kernels (blockwise, so a row's result does not depend on
    # the padded prompt length P) want one head dim; the padding's output columns are dropped
    v_THD = F.pad(kv_THX[..., A:], (0, q_THD.shape[-1] - U))
    q_NHPD, k_NHPD, v_NHPD = (t.reshape(N, P, H, -1).transpose(1, 2) for t in (q_THD, k_THD, v_THD))
    o_NHPD = F.scaled_dot_product_attention(q_NHPD, k_NHPD, v_NHPD, is_causal=True, scale=w.scale)
    return linear(o_NHPD[..., :U].transpose(1, 2).reshape(N * P, H * U), w.o_MX, w.o_bias_M)


def mla_decode(w: MLAWeights, h_BH: torch.Tensor, cos_BR: torch.Tensor, sin_BR: torch.Tensor, kv: KVCache,
               layer: int, where: TokenWhere, T: int, bias_BHT: torch.Tensor,
               linear, *, batch_invariant: bool) -> torch.Tensor:
    """One token per row over its slot's cached latents (absorbed weights). Returns `[B, M]` after o_proj.

    `batch_invariant`: the absorbed projections run as one [1, A] @ [A, C] product per (row, head), so a row's
    result does not depend on how many rows the step has (else one batched matmul per head over all rows)."""
    B, H, C = h_BH.shape[0], w.num_heads, w.kv_lora_rank
    q_nope_BHA, q_rot_BHR = _queries(w, h_BH, cos_BR, sin_BR, linear)
    c_BC, kr_BR = _latents(w, h_BH, cos_BR, sin_BR, linear)
    _write(kv, layer, where, c_BC, kr_BR, C)
    c_ctx_B1TC, kr_ctx_B1TC = kv.context(layer, B, T)
    c_BTC, kr_BTR = c_ctx_B1TC[:, 0], kr_ctx_B1TC[:, 0, :, : w.rope_dim]
    w_uk_HAC, w_uv_HUC = w.absorbed()
    q_lat_BHC = _per_head(q_nope_BHA, w_uk_HAC, batch_invariant)
    scores_BHT = torch.baddbmm(bias_BHT.view(B, H, T), q_lat_BHC, c_BTC.transpose(1, 2), alpha=w.scale)
    scores_BHT = torch.baddbmm(scores_BHT, q_rot_BHR, kr_BTR.transpose(1, 2), alpha=w.scale)
    o_lat_BHC = torch.bmm(torch.softmax(scores_BHT, dim=-1), c_BTC)
    o_BHU = _per_head(o_lat_BHC, w_uv_HUC.transpose(1, 2), batch_invariant)
    return linear(o_BHU.reshape(B, -1), w.o_MX, w.o_bias_M)


def _per_head(x_BHI: torch.Tensor, w_HIO: torch.Tensor, batch_invariant: bool) -> torch.Tensor:
    """x[b, h] @ w[h] for every row b and head h: `[B, H, O]`."""
    if batch_invariant:  # contiguous: with a strided w the broadcast matmul's result depends on B
        return torch.matmul(x_BHI.unsqueeze(2), w_HIO.contiguous()).squeeze(2)
    return torch.bmm(x_BHI.transpose(0, 1), w_HIO).transpose(0, 1)


def _queries(w: MLAWeights, h_TM, cos_TR, sin_TR, linear):
    if w.q_a_LM is None:
        q_TX = linear(h_TM, w.q_XM)
    else:
        q_TX = linear(rms_norm(linear(h_TM, w.q_a_LM, w.q_a_bias_L), w.q_norm_L, w.q_eps), w.q_b_XL)
    q_THD = q_TX.view(h_TM.shape[0], w.num_heads, w.nope_dim + w.rope_dim)
    return q_THD[..., : w.nope_dim], _rope(w, q_THD[..., w.nope_dim :], cos_TR, sin_TR)


def _latents(w: MLAWeights, h_TM, cos_TR, sin_TR, linear):
    ckv_TX = linear(h_TM, w.kv_a_QM, w.kv_a_bias)
    c_TC = rms_norm(ckv_TX[:, : w.kv_lora_rank], w.kv_norm_C, w.kv_eps)
    kr_TR = _rope(w, ckv_TX[:, w.kv_lora_rank :].unsqueeze(1), cos_TR, sin_TR).squeeze(1)
    return c_TC, kr_TR


def _rope(w: MLAWeights, x_THR, cos_TR, sin_TR):
    if w.interleave:  # pairs (x0, x1), (x2, x3), ... rotate together; the output is laid out evens then odds
        x_THR = torch.cat([x_THR[..., 0::2], x_THR[..., 1::2]], dim=-1)
    return rope(x_THR, cos_TR, sin_TR)


def _write(kv: KVCache, layer: int, where: TokenWhere, c_TC, kr_TR, C: int) -> None:
    """K <- the latent c, V <- the rotary key kr zero-padded to C dims (one kv head), tokens laid out as `where`."""
    kr_TC = F.pad(kr_TR, (0, C - kr_TR.shape[-1]))
    shape = (*where.blk.shape, 1, C)
    kv.write(layer, where, c_TC.view(shape), kr_TC.view(shape))
