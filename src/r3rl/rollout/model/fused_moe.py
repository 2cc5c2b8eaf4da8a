"""Fused MoE experts for the rollout engine on GPU (Triton), on HF's fused `[E, 2I, H]` gate/up layout: SwiGLU
experts (gate rows then up rows) and GPT-OSS experts (interleaved gate/up rows, a clamped GLU), either with optional
biases on gate/up `[E, 2I]` and down `[E, H]` (GPT-OSS has both).

Three steps, no host sync (CUDA-graph safe):
  1. alignment: group the (token, k) rows by expert and pad each expert's group to a multiple of the block size, so
     that every block of BLOCK_M rows belongs to one expert; rows routed to the sentinel expert E (padding tokens)
     are dropped. By default three small Triton kernels (atomic counts, a one-program scan that also fills the row
     buffer, atomic placement: `align_counted` after the count); the engine's fused router counts inside its routing
     kernel (`r3rl.rollout.model.router_kernel`) and passes the alignment in
     (`align=`). `align_block_size` is the same in
     torch ops (a stable sort; `FusedMoEConfig.triton_align=False`).
  2. `_gate_up_kernel`: per block, `silu(x @ gate^T) * (x @ up^T)` (or GPT-OSS's `gpt_oss_glu` of the biased gate
     and up), gate and up accumulated side by side from the one fused weight. In bf16/fp16 every intermediate is
     rounded where HF's eager experts round it (the matmul result, the bias add, each op of the activation), so the
     rollout computes what the training forward computes; in float32 nothing is rounded.
  3. `_down_kernel`: per block, `act @ down^T` (+ the down bias, per (token, k) row), multiplied by each row's gate
     weight, stored in (token, k) order (float32; in the hidden dtype when the product is rounded to it, see below);
     the top-k reduction is `_sum_k_kernel` (float32 accumulation, deterministic, no atomics; dropped rows skipped),
     one cast to the hidden dtype, optionally the decoder layer's residual added in the same pass.
Rounding of the weighted sum is HF's (grouped_mm experts, `r3rl.rollout.model.moe._weighted_sum`): each expert output
(with its bias) is rounded to the hidden dtype (HF's expert matmul returns it); with gate weights in the hidden dtype
(bfloat16: Qwen, GPT-OSS) its product with the weight is rounded to it again, with float32 gate weights (the sigmoid
families) the product stays exact in float32; the sum over k is in float32, then one cast.
Each block reads its expert's weight tiles once; at decode (a few rows per expert) one block per expert reads every
active expert's weights once per step.

This module: the tile configs, the launcher `fused_moe` (which runs the Triton kernels) and `fused_moe_reference`,
the pure-torch path over the same alignment (CPU, tests). The alignment is in `fused_moe_align`, the GEMM and sum
kernels in `fused_moe_kernels`. Triton is optional: without it `available()` is False and only the reference runs.

    pytest tests/rollout/model/test_fused_moe.py     # with triton installed, runs the kernels under TRITON_INTERPRET=1
    python bench/bench_fused_moe.py            # GPU: vs the engine's grouped_mm path

Tensor suffixes: T tokens, H hidden, E experts, K top-k, I intermediate (2I: fused gate and up), R flattened
(token, k) rows, M padded rows (aligned to blocks), B blocks.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # optional: CPU CI has no triton
    import triton
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

from r3rl.rollout.model.fused_moe_align import Alignment, align_block_size, align_counted, padded_blocks
from r3rl.rollout.model.fused_moe_align import align_triton as _align_triton

if triton is not None:
    from r3rl.rollout.model.fused_moe_kernels import _down_kernel, _gate_up_kernel, _sum_k_kernel

__all__ = ["ExpertAct", "FusedMoEConfig", "Alignment", "available", "default_config", "config_tier_tokens",
           "align_block_size",
           "align_counted", "fused_moe", "fused_moe_reference", "gpt_oss_glu"]

logger = logging.getLogger(__name__)


class ExpertAct(enum.Enum):
    """The expert MLP's gated activation (re-exported by `r3rl.rollout.model.moe`)."""

    SWIGLU = "swiglu"  # act(gate) * up, gate then up halves (HF's fused layout)
    GPT_OSS = "gpt_oss"  # interleaved gate/up columns, clamped, gate * sigmoid(alpha * gate) * (up + 1)


def available() -> bool:
    """True when Triton imports (the kernels then run on CUDA tensors, or anywhere under TRITON_INTERPRET=1)."""
    return triton is not None


@dataclass(kw_only=True, frozen=True)
class FusedMoEConfig:
    """Tile sizes of the two GEMM kernels."""

    block_m: int = 16
    """Rows per block; each expert's row group is padded to a multiple of it (>= 16 for tl.dot)."""
    block_n: int = 64
    """Output columns per program (I for gate/up, H for down)."""
    block_k: int = 128
    """Reduction slice per loop iteration (H for gate/up, I for down)."""
    num_warps: int = 4
    """Warps per program."""
    num_stages: int = 4
    """Software pipelining depth of the reduction loop."""
    triton_align: bool = True
    """Align with three small Triton kernels (atomic counts and placement; the row order inside an expert's group
    then varies from run to run, which changes no output value) instead of ~25 torch ops (`align_block_size`).
    On an H200 at the probe shape it takes the layer from 330 to 270 µs at 32 tokens and 417 to 342 µs at 256."""


def default_config(num_rows: int, num_experts: int) -> FusedMoEConfig:
    """Tiles by rows per expert: decode (a few rows per expert) wants the smallest block, prefill larger ones.

    The first two are the best of a sweep on an H200 at the probe shape (bench/bench_fused_moe.py --sweep: 2 and 16
    rows per expert); the prefill tile is not tuned."""
    per_expert = num_rows / num_experts
    if per_expert <= 4:
        return FusedMoEConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
    if per_expert <= 64:
        return FusedMoEConfig(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=3)
    return FusedMoEConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


def config_tier_tokens(num_experts: int, top_k: int, max_tokens: int) -> list[int]:
    """A token count in each of `default_config`'s tiers (at most `max_tokens`): running the kernels once at each
    builds every variant a rollout will use (`RolloutEngine.warmup`), instead of inside the first prefill that
    reaches a tier (a Triton build takes seconds)."""
    counts = [max(1, 2 * num_experts // top_k), 32 * num_experts // top_k, 128 * num_experts // top_k]  # mid-tier
    return sorted({min(c, max_tokens) for c in counts})




def fused_moe(x_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, gate_up_EIH: torch.Tensor,
              down_EHI: torch.Tensor, *, valid_T: torch.Tensor | None = None,
              gate_up_bias_EI: torch.Tensor | None = None, down_bias_EH: torch.Tensor | None = None,
              act: ExpertAct = ExpertAct.SWIGLU, alpha: float = 1.702, limit: float = 7.0,
              config: FusedMoEConfig | None = None, align: Alignment | None = None,
              residual_TH: torch.Tensor | None = None) -> torch.Tensor:
    """`sum_k weights_TK[t, k] * (down[e] @ glu(gate_up[e] @ x_t + b_gate_up[e]) + b_down[e])`, e = ids_TK[t, k]
    (Triton). glu: `silu(gate) * up` (SWIGLU, gate rows first) or `gpt_oss_glu` (GPT_OSS, interleaved rows).

    gate_up_EIH: `[E, 2I, H]`; down_EHI: `[E, H, I]`; optional biases `[E, 2I]` and `[E, H]` (the down bias is added
    to each (token, k) row before its gate weight multiplies it, as HF does). `valid_T` False (or id E) drops a row
    (its token's output is zero, or the residual). Returns `[T, H]` in x's dtype, the weighted sum rounded as HF
    rounds it (module docstring). `align`: the rows already aligned for `config` (`align_counted`,
    `router_kernel.route_align`), with the same `valid_T` passed here too (the sum over k skips the rows it
    dropped). `residual_TH`: returns `residual_TH + out` instead (x's shape and dtype; the decoder layer's residual
    add, in the same kernel as the sum over k, rounded as the two torch ops round)."""
    if not available():
        raise RuntimeError("fused_moe needs triton (not importable here); use fused_moe_reference")
    T, H, E, n_inter = _check_shapes(x_TH, ids_TK, weights_TK, gate_up_EIH, down_EHI, gate_up_bias_EI, down_bias_EH)
    K = ids_TK.shape[1]
    cfg = config or default_config(T * K, E)
    if residual_TH is not None and (residual_TH.shape != x_TH.shape or residual_TH.dtype != x_TH.dtype):
        raise ValueError(f"fused_moe: residual_TH must match x ({x_TH.dtype} {tuple(x_TH.shape)}): got "
                         f"{residual_TH.dtype} {tuple(residual_TH.shape)}")
    if align is not None:
        bm = cfg.block_m
        slots = padded_blocks(T * K, E, bm) * bm
        if align.block_m != bm or align.row_ids_M.shape[0] != slots:
            raise ValueError(f"fused_moe: the alignment must be for this call's {T * K} rows in blocks of {bm} "
                             f"({slots} slots): got blocks of {align.block_m}, {align.row_ids_M.shape[0]} slots")
    elif cfg.triton_align:
        align = _align_triton(ids_TK, E, cfg.block_m, valid_T)
    else:
        align = align_block_size(ids_TK, E, cfg.block_m, valid_T)
    M, num_blocks = align.row_ids_M.shape[0], align.block_expert_B.shape[0]
    x_TH, gate_up_EIH, down_EHI = x_TH.contiguous(), gate_up_EIH.contiguous(), down_EHI.contiguous()
    # without a bias the kernels never read the pointer: pass any tensor
    gu_bias = gate_up_EIH if gate_up_bias_EI is None else gate_up_bias_EI.contiguous()
    dn_bias = down_EHI if down_bias_EH is None else down_bias_EH.contiguous()
    act_MI = torch.empty(M, n_inter, dtype=x_TH.dtype, device=x_TH.device)
    _gate_up_kernel[(num_blocks, triton.cdiv(n_inter, cfg.block_n))](
        x_TH, gate_up_EIH, gu_bias, act_MI, align.row_ids_M, align.block_expert_B, align.num_padded,
        T * K, H, n_inter, x_TH.stride(0), gate_up_EIH.stride(0), gate_up_EIH.stride(1), gu_bias.stride(0),
        act_MI.stride(0), float(alpha), float(limit),
        TOP_K=K, GPT_OSS=act is ExpertAct.GPT_OSS, HAS_BIAS=gate_up_bias_EI is not None,
        ROUND_GLU=_low_precision(x_TH), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # a product rounded to x's dtype is stored in it (exact, half the traffic); dropped rows are left unwritten and
    # skipped by the sum over k
    y_RH = torch.empty(T * K, H, dtype=x_TH.dtype if _rounds_product(x_TH, weights_TK) else torch.float32,
                       device=x_TH.device)
    weights_R = weights_TK.reshape(-1).contiguous()
    _down_kernel[(num_blocks, triton.cdiv(H, cfg.block_n))](
        act_MI, down_EHI, dn_bias, y_RH, weights_R, align.row_ids_M, align.block_expert_B, align.num_padded,
        T * K, H, n_inter, act_MI.stride(0), down_EHI.stride(0), down_EHI.stride(1), dn_bias.stride(0),
        y_RH.stride(0), HAS_BIAS=down_bias_EH is not None, ROUND_OUTPUT=_low_precision(x_TH),
        ROUND_PRODUCT=_rounds_product(x_TH, weights_TK),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out_TH = torch.empty_like(x_TH)
    res = residual_TH.contiguous() if residual_TH is not None else x_TH  # any pointer when HAS_RESIDUAL is False
    ids = ids_TK.contiguous()
    valid = valid_T if valid_T is not None else ids
    block_h = min(1024, triton.next_power_of_2(H))
    _sum_k_kernel[(T, triton.cdiv(H, block_h))](
        y_RH, ids, valid, res, out_TH, H, E, TOP_K=K, K_POW2=triton.next_power_of_2(K), HAS_VALID=valid_T is not None,
        HAS_RESIDUAL=residual_TH is not None, BLOCK_H=block_h, num_warps=4)
    return out_TH


def fused_moe_reference(x_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                        gate_up_EIH: torch.Tensor, down_EHI: torch.Tensor, *, valid_T: torch.Tensor | None = None,
                        gate_up_bias_EI: torch.Tensor | None = None, down_bias_EH: torch.Tensor | None = None,
                        act: ExpertAct = ExpertAct.SWIGLU, alpha: float = 1.702, limit: float = 7.0,
                        block_m: int = 16, compute_dtype: torch.dtype = torch.float32,
                        emulate_rounding: bool = False) -> torch.Tensor:
    """The same computation in torch over the same `align_block_size` blocks (CPU, tests; one matmul per block).

    Computes in `compute_dtype` (float32 by default: the accuracy yardstick) and returns x's dtype. With
    `emulate_rounding`, rounds where the kernels (and HF's eager experts) round for a bf16/fp16 x: each matmul result,
    each bias add, each op of the activation, each expert output and, when the gate weights are in x's dtype too,
    each weighted product, all to x's dtype; the sum over k stays in `compute_dtype`."""
    T, H, E, n_inter = _check_shapes(x_TH, ids_TK, weights_TK, gate_up_EIH, down_EHI, gate_up_bias_EI, down_bias_EH)
    K, out_dtype = ids_TK.shape[1], x_TH.dtype
    round_output = emulate_rounding and _low_precision(x_TH)
    round_product = emulate_rounding and _rounds_product(x_TH, weights_TK)
    def rnd(t: torch.Tensor) -> torch.Tensor:  # HF's rounding of a result to the hidden dtype (bf16/fp16 only)
        return t.to(out_dtype).to(compute_dtype) if round_output else t

    align = align_block_size(ids_TK, E, block_m, valid_T)
    num_blocks = int(align.num_padded.item()) // block_m  # host sync: fine for a reference
    x_TH = torch.cat([x_TH, x_TH.new_zeros(1, H)]).to(compute_dtype)  # row T: padding slots read zeros
    w_R = torch.cat([weights_TK.reshape(-1), weights_TK.new_zeros(1)]).to(compute_dtype)
    y_RH = torch.zeros(T * K + 1, H, dtype=compute_dtype, device=x_TH.device)  # row T * K: padding slots' dump
    for b in range(num_blocks):
        rows_M = align.row_ids_M[b * block_m : (b + 1) * block_m].long()
        e = int(align.block_expert_B[b])
        gate_up_MI = rnd(x_TH[torch.where(rows_M < T * K, rows_M // K, T)] @ gate_up_EIH[e].to(compute_dtype).T)
        if gate_up_bias_EI is not None:
            gate_up_MI = rnd(gate_up_MI + gate_up_bias_EI[e].to(compute_dtype))
        if act is ExpertAct.GPT_OSS:
            act_MI = gpt_oss_glu(gate_up_MI, alpha, limit, round_to=out_dtype if round_output else None)
        else:
            act_MI = rnd(F.silu(gate_up_MI[:, :n_inter])) * gate_up_MI[:, n_inter:]
        act_MI = rnd(act_MI)
        out_MH = rnd(act_MI @ down_EHI[e].to(compute_dtype).T)
        if down_bias_EH is not None:
            out_MH = rnd(out_MH + down_bias_EH[e].to(compute_dtype))
        out_MH = out_MH * w_R[rows_M].unsqueeze(1)
        y_RH[rows_M] = out_MH.to(out_dtype).to(compute_dtype) if round_product else out_MH
    return y_RH[: T * K].view(T, K, H).sum(1).to(out_dtype)


def gpt_oss_glu(gate_up_RI: torch.Tensor, alpha: float, limit: float,
                round_to: torch.dtype | None = None) -> torch.Tensor:
    """GPT-OSS's clamped GLU on interleaved gate/up columns (HF's `GptOssExperts._apply_gate`, same op order).
    `round_to` rounds every op's result to that dtype, as HF's eager ops on bf16 tensors do (float32 compute)."""
    def rnd(t: torch.Tensor) -> torch.Tensor:
        return t if round_to is None else t.to(round_to).to(gate_up_RI.dtype)

    gate_RI = gate_up_RI[..., ::2].clamp(min=None, max=limit)
    up_RI = gate_up_RI[..., 1::2].clamp(min=-limit, max=limit)
    return rnd(up_RI + 1) * rnd(gate_RI * rnd(torch.sigmoid(rnd(gate_RI * alpha))))


# --- private ---------------------------------------------------------------------------------------------------------




def _low_precision(x_TH: torch.Tensor) -> bool:
    return x_TH.dtype in (torch.bfloat16, torch.float16)


def _rounds_product(x_TH: torch.Tensor, weights_TK: torch.Tensor) -> bool:
    """torch promotes `y * w` to x's dtype when the gate weights share it: then HF rounds each product (bf16/fp16)."""
    return weights_TK.dtype == x_TH.dtype and _low_precision(x_TH)


def _check_shapes(x_TH, ids_TK, weights_TK, gate_up_EIH, down_EHI, gate_up_bias_EI=None,
                  down_bias_EH=None) -> tuple[int, int, int, int]:
    if x_TH.dim() != 2 or ids_TK.dim() != 2 or gate_up_EIH.dim() != 3 or down_EHI.dim() != 3:
        raise ValueError(f"fused_moe: expected x [T, H], ids [T, K], gate_up [E, 2I, H], down [E, H, I]; got "
                         f"x {tuple(x_TH.shape)}, ids {tuple(ids_TK.shape)}, gate_up {tuple(gate_up_EIH.shape)}, "
                         f"down {tuple(down_EHI.shape)}")
    (T, H), (E, I2, H2), (E2, H3, n_inter) = x_TH.shape, gate_up_EIH.shape, down_EHI.shape
    problems = []
    if ids_TK.shape[0] != T or weights_TK.shape != ids_TK.shape:
        problems.append(f"ids {tuple(ids_TK.shape)} and weights {tuple(weights_TK.shape)} must both be [T={T}, K]")
    if H2 != H or H3 != H:
        problems.append(f"hidden size: x has {H}, gate_up has {H2}, down has {H3}")
    if E2 != E or 2 * n_inter != I2:
        problems.append(f"experts/intermediate: gate_up [E={E}, 2I={I2}], down [E={E2}, I={n_inter}] "
                        "(need 2I = 2 * I)")
    if gate_up_bias_EI is not None and tuple(gate_up_bias_EI.shape) != (E, I2):
        problems.append(f"gate_up bias must be [E={E}, 2I={I2}], got {tuple(gate_up_bias_EI.shape)}")
    if down_bias_EH is not None and tuple(down_bias_EH.shape) != (E, H):
        problems.append(f"down bias must be [E={E}, H={H}], got {tuple(down_bias_EH.shape)}")
    if problems:
        raise ValueError("fused_moe: inconsistent shapes: " + "; ".join(problems))
    return T, H, E, n_inter


