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

`fused_moe` runs the Triton kernels; `fused_moe_reference` is the pure-torch path over the same alignment (CPU,
tests). Triton is optional: without it `available()` is False and only the reference runs.

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
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

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


@dataclass
class Alignment:
    """(token, k) rows sorted by expert, each expert's group padded to whole blocks (all on the device)."""

    row_ids_M: torch.Tensor
    """Flattened (token, k) row at each padded position; R (= T * K) marks a padding slot. int32, static length."""
    block_expert_B: torch.Tensor
    """Expert of each block (int32). Blocks at or past `num_padded` hold no rows."""
    num_padded: torch.Tensor
    """[1] int32: padded rows in use (a multiple of block_m); the rest of `row_ids_M` is unused."""
    block_m: int


def align_block_size(ids_TK: torch.Tensor, num_experts: int, block_m: int,
                     valid_T: torch.Tensor | None = None) -> Alignment:
    """Sort (token, k) rows by expert and pad every expert's group to a multiple of `block_m`, without a host sync.

    `ids_TK` values must lie in [0, num_experts]; num_experts itself is the sentinel of a row to drop, and
    `valid_T` False drops every row of that token. The buffers have the static worst-case length
    `R + E * (block_m - 1)` rounded up to whole blocks, so the result has fixed shapes (CUDA graphs)."""
    if ids_TK.dim() != 2:
        raise ValueError(f"align_block_size: ids_TK must be [tokens, top_k], got shape {tuple(ids_TK.shape)}")
    (T, K), E, dev = ids_TK.shape, num_experts, ids_TK.device
    R = T * K
    flat_R = ids_TK.reshape(-1).long()
    if valid_T is not None:
        flat_R = flat_R.masked_fill(~valid_T.repeat_interleave(K), E)
    counts_E1 = torch.zeros(E + 1, dtype=torch.long, device=dev).scatter_add_(0, flat_R, torch.ones_like(flat_R))
    padded_E = (counts_E1[:E] + block_m - 1) // block_m * block_m
    padded_end_E = padded_E.cumsum(0)
    start_E1 = counts_E1.cumsum(0) - counts_E1  # first sorted position of each expert (sentinel last)
    sorted_R, order_R = torch.sort(flat_R, stable=True)
    rank_R = torch.arange(R, device=dev) - start_E1[sorted_R]
    expert_R = sorted_R.clamp(max=E - 1)
    num_blocks = _num_blocks(R, E, block_m)
    M = num_blocks * block_m
    dest_R = torch.where(sorted_R < E, padded_end_E[expert_R] - padded_E[expert_R] + rank_R, M)  # M: a dump slot
    row_ids_M = torch.full((M + 1,), R, dtype=torch.int32, device=dev)
    row_ids_M.scatter_(0, dest_R, order_R.to(torch.int32))
    block_start_B = torch.arange(num_blocks, device=dev) * block_m
    block_expert_B = torch.searchsorted(padded_end_E, block_start_B, right=True).clamp(max=E - 1).to(torch.int32)
    return Alignment(row_ids_M=row_ids_M[:M], block_expert_B=block_expert_B,
                     num_padded=padded_end_E[-1:].to(torch.int32), block_m=block_m)


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
        slots = _num_blocks(T * K, E, bm) * bm
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
def _align_triton(ids_TK: torch.Tensor, num_experts: int, block_m: int, valid_T: torch.Tensor | None) -> Alignment:
    """`align_block_size` in three launches (count, then `align_counted`'s scan and place); same buffers and
    invariants."""
    (T, K), E = ids_TK.shape, num_experts
    ids_R = ids_TK.reshape(-1).contiguous()
    valid = valid_T if valid_T is not None else ids_R  # any pointer when HAS_VALID is False
    counts_E = torch.zeros(E, dtype=torch.int32, device=ids_TK.device)
    _count_kernel[(triton.cdiv(T * K, _ALIGN_BLOCK),)](ids_R, valid, counts_E, T * K, E, TOP_K=K,
                                                      HAS_VALID=valid_T is not None, BLOCK=_ALIGN_BLOCK)
    return align_counted(ids_TK, counts_E, block_m, valid_T)


def align_counted(ids_TK: torch.Tensor, counts_E: torch.Tensor, block_m: int,
                  valid_T: torch.Tensor | None = None) -> Alignment:
    """The alignment of `ids_TK` once its routed rows are counted per expert in `counts_E` (int32 `[E]`; rows of
    tokens with `valid_T` False, or with the sentinel id E, not counted): one scan program (group starts, block
    experts, the padded row buffer filled with the sentinel, `counts_E` zeroed again for reuse) and one placement
    launch. `r3rl.rollout.model.router_kernel` counts inside its routing kernel."""
    (T, K), E, dev = ids_TK.shape, counts_E.shape[0], ids_TK.device
    R = T * K
    num_blocks = _num_blocks(R, E, block_m)
    ids_R = ids_TK.reshape(-1).contiguous()
    valid = valid_T if valid_T is not None else ids_R  # any pointer when HAS_VALID is False
    cursor_E = torch.empty(E, dtype=torch.int32, device=dev)
    row_ids_M = torch.empty(num_blocks * block_m, dtype=torch.int32, device=dev)
    block_expert_B = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    _scan_kernel[(1,)](counts_E, cursor_E, block_expert_B, num_padded, row_ids_M, E, num_blocks, R, BLOCK_M=block_m,
                       E_POW2=triton.next_power_of_2(E), CHUNK=64, FILL=1024)
    _place_kernel[(triton.cdiv(R, _ALIGN_BLOCK),)](ids_R, valid, cursor_E, row_ids_M, R, E, row_ids_M.shape[0],
                                                   TOP_K=K, HAS_VALID=valid_T is not None, BLOCK=_ALIGN_BLOCK)
    return Alignment(row_ids_M=row_ids_M, block_expert_B=block_expert_B, num_padded=num_padded, block_m=block_m)


_ALIGN_BLOCK = 1024  # rows per program of the count and place kernels


def _num_blocks(rows: int, num_experts: int, block_m: int) -> int:
    """Blocks of the alignment's static worst case: every row placed, each expert's group padded by block_m - 1."""
    return (rows + num_experts * (block_m - 1) + block_m - 1) // block_m


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


if triton is not None:

    @triton.jit
    def _block_rows(row_ids_ptr, block_expert_ptr, pid_m, num_rows, BLOCK_M: tl.constexpr):
        """Block `pid_m`'s expert, its row slots, the (token, k) rows in them and which slots hold a row."""
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(row_ids_ptr + offs_m)
        return expert, offs_m, rows, rows < num_rows

    @triton.jit(do_not_specialize=["num_rows"])  # one build for every token count
    def _gate_up_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, row_ids_ptr, block_expert_ptr, num_padded_ptr, num_rows, H,
                        n_inter, stride_xt, stride_we, stride_wn, stride_be, stride_om, alpha, limit,
                        TOP_K: tl.constexpr, GPT_OSS: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_GLU: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        expert, offs_m, rows, row_ok = _block_rows(row_ids_ptr, block_expert_ptr, pid_m, num_rows, BLOCK_M)
        tok = (rows // TOP_K).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_inter
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
        if GPT_OSS:  # interleaved: gate j is row 2j, up j is row 2j + 1
            gate_rows = 2 * offs_n
            up_rows = gate_rows + 1
        else:  # gate rows first, then up rows
            gate_rows = offs_n
            up_rows = offs_n + n_inter
        g_ptrs = w_ptr + expert * stride_we + gate_rows[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        u_ptrs = w_ptr + expert * stride_we + up_rows[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(H, BLOCK_K)):
            k_ok = offs_k < H - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        dt = out_ptr.dtype.element_ty
        if ROUND_GLU:  # HF: the expert matmul returns the hidden dtype
            acc_g = acc_g.to(dt).to(tl.float32)
            acc_u = acc_u.to(dt).to(tl.float32)
        if HAS_BIAS:
            b_ptr = bias_ptr + expert * stride_be
            acc_g += tl.load(b_ptr + gate_rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(b_ptr + up_rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if ROUND_GLU:  # and then adds the bias in it
                acc_g = acc_g.to(dt).to(tl.float32)
                acc_u = acc_u.to(dt).to(tl.float32)
        if GPT_OSS:  # in `gpt_oss_glu`'s op order
            gate = tl.minimum(acc_g, limit)
            up = tl.minimum(tl.maximum(acc_u, -limit), limit)
            if ROUND_GLU:  # every elementwise op of HF's eager GLU rounds to the hidden dtype
                scaled = (gate * alpha).to(dt).to(tl.float32)
                sig = (1.0 / (1.0 + tl.exp(-scaled))).to(dt).to(tl.float32)
                glu = (gate * sig).to(dt).to(tl.float32)
                act = (up + 1.0).to(dt).to(tl.float32) * glu
            else:
                act = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
        else:
            silu = acc_g / (1.0 + tl.exp(-acc_g))  # torch's silu formula
            if ROUND_GLU:
                silu = silu.to(dt).to(tl.float32)
            act = silu * acc_u
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, act.to(dt), mask=n_ok[None, :])

    @triton.jit
    def _program_rows(ids_ptr, valid_ptr, num_rows, E, TOP_K: tl.constexpr, HAS_VALID: tl.constexpr,
                      BLOCK: tl.constexpr):
        """This program's (token, k) rows, their experts, and which count: in range, routed, of a valid token."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < num_rows
        e = tl.load(ids_ptr + offs, mask=ok, other=0).to(tl.int32)
        ok = ok & (e < E)
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + offs // TOP_K, mask=ok, other=0) != 0)
        return offs, e, ok

    @triton.jit(do_not_specialize=["num_rows"])  # one build for every token count
    def _count_kernel(ids_ptr, valid_ptr, counts_ptr, num_rows, E, TOP_K: tl.constexpr, HAS_VALID: tl.constexpr,
                      BLOCK: tl.constexpr):
        offs, e, ok = _program_rows(ids_ptr, valid_ptr, num_rows, E, TOP_K, HAS_VALID, BLOCK)
        tl.atomic_add(counts_ptr + e, tl.full((BLOCK,), 1, tl.int32), mask=ok)

    @triton.jit(do_not_specialize=["num_blocks", "num_rows"])  # one build for every token count
    def _scan_kernel(counts_ptr, cursor_ptr, block_expert_ptr, num_padded_ptr, row_ids_ptr, E, num_blocks, num_rows,
                     BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr):
        offs_e = tl.arange(0, E_POW2)
        e_ok = offs_e < E
        padded = (tl.load(counts_ptr + offs_e, mask=e_ok, other=0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        tl.debug_barrier()
        tl.store(counts_ptr + offs_e, tl.zeros((E_POW2,), tl.int32), mask=e_ok)  # zeroed for the next call
        for m0 in range(0, num_blocks * BLOCK_M, FILL):  # every padded slot starts as the sentinel (no row)
            offs_m = m0 + tl.arange(0, FILL)
            tl.store(row_ids_ptr + offs_m, tl.full((FILL,), num_rows, tl.int32), mask=offs_m < num_blocks * BLOCK_M)
        end = tl.cumsum(padded, 0)
        tl.store(cursor_ptr + offs_e, end - padded, mask=e_ok)  # each expert's first padded position
        tl.store(num_padded_ptr, tl.sum(padded, 0))
        for b0 in range(0, num_blocks, CHUNK):  # expert of block b: how many experts end at or before b * BLOCK_M
            offs_b = b0 + tl.arange(0, CHUNK)
            before = (end[None, :] <= offs_b[:, None] * BLOCK_M) & e_ok[None, :]
            expert = tl.minimum(tl.sum(before.to(tl.int32), 1), E - 1)
            tl.store(block_expert_ptr + offs_b, expert, mask=offs_b < num_blocks)

    @triton.jit(do_not_specialize=["num_rows"])  # one build for every token count
    def _place_kernel(ids_ptr, valid_ptr, cursor_ptr, row_ids_ptr, num_rows, E, num_slots, TOP_K: tl.constexpr,
                      HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
        offs, e, ok = _program_rows(ids_ptr, valid_ptr, num_rows, E, TOP_K, HAS_VALID, BLOCK)
        pos = tl.atomic_add(cursor_ptr + e, tl.full((BLOCK,), 1, tl.int32), mask=ok)
        tl.store(row_ids_ptr + pos, offs.to(tl.int32), mask=ok & (pos < num_slots))  # never past the buffer

    @triton.jit
    def _sum_k_kernel(y_ptr, ids_ptr, valid_ptr, res_ptr, out_ptr, H, E, TOP_K: tl.constexpr, K_POW2: tl.constexpr,
                      HAS_VALID: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr):
        """Token t's output: the sum over its routed (token, k) rows (float32, then one cast), plus the residual
        (`residual + out` in the hidden dtype: float32 add, one more rounding). Dropped rows (an invalid token, the
        sentinel expert) add nothing; the down kernel never wrote them."""
        t = tl.program_id(0).to(tl.int64)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        offs_k = tl.arange(0, K_POW2)
        routed = (offs_k < TOP_K) & (tl.load(ids_ptr + t * TOP_K + offs_k, mask=offs_k < TOP_K, other=E) < E)
        if HAS_VALID:
            routed = routed & (tl.load(valid_ptr + t + offs_k * 0) != 0)  # (a vector: the interpreter's masks)
        y = tl.load(y_ptr + (t * TOP_K + offs_k)[:, None] * H + offs_h[None, :], mask=routed[:, None] & h_ok[None, :],
                    other=0.0)
        dt = out_ptr.dtype.element_ty
        out = tl.sum(y.to(tl.float32), axis=0).to(dt)
        if HAS_RESIDUAL:
            out = (tl.load(res_ptr + t * H + offs_h, mask=h_ok, other=0.0).to(tl.float32) + out.to(tl.float32)).to(dt)
        tl.store(out_ptr + t * H + offs_h, out, mask=h_ok)

    @triton.jit(do_not_specialize=["num_rows"])  # one build for every token count
    def _down_kernel(act_ptr, w_ptr, bias_ptr, out_ptr, weights_ptr, row_ids_ptr, block_expert_ptr, num_padded_ptr,
                     num_rows, H, n_inter, stride_am, stride_we, stride_wn, stride_be, stride_or,
                     HAS_BIAS: tl.constexpr, ROUND_OUTPUT: tl.constexpr, ROUND_PRODUCT: tl.constexpr,
                     BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        expert, offs_m, rows, row_ok = _block_rows(row_ids_ptr, block_expert_ptr, pid_m, num_rows, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < H
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
        w_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(n_inter, BLOCK_K)):
            k_ok = offs_k < n_inter - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if ROUND_OUTPUT:  # HF's rounding: the expert matmul returns the hidden dtype
            acc = acc.to(act_ptr.dtype.element_ty).to(tl.float32)
        if HAS_BIAS:  # per (token, k) row, before the gate weight (HF: weight * (down(act) + bias))
            acc += tl.load(bias_ptr + expert * stride_be + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if ROUND_OUTPUT:  # the bias is added in the hidden dtype
                acc = acc.to(act_ptr.dtype.element_ty).to(tl.float32)
        gate_w = tl.load(weights_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * gate_w[:, None]
        if ROUND_PRODUCT:  # and, with gate weights in that dtype, the product too
            acc = acc.to(act_ptr.dtype.element_ty).to(tl.float32)
        out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_or + offs_n[None, :]
        tl.store(out_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])
