"""The rollout engine's router on GPU in one Triton kernel per MoE layer, plus the fused experts' alignment in two.

At decode a MoE layer's routing was a chain of ~13 small kernels (softmax, top-k and its sort, gather, sum, divide,
cast, the capture's cast and scatter, the alignment's two fills, count, scan, place): on an H200 at the bench shape
(batch 256) ~45 µs per layer, a quarter of a decode step. Here:

  1. `_route_kernel` (one program per BLOCK_T tokens): the family's scores from the router logits, the live top-k
     (descending, the lowest expert first among equal scores), the gate weights (renormalized, scaled and cast as
     `r3rl.models.routing.gate_weights` does), the ids written into the routing capture at each token's (block,
     offset) for this MoE layer (`RouteTarget`), and each routed (token, k) row counted per expert (atomics) for the
     alignment;
  2. `fused_moe_align._scan_kernel` (one program): each expert's padded group start, the expert of every block, the
     padded row count; it also fills the padded row buffer with the sentinel and zeroes the counts for the next layer
     (the counts buffer is the engine's, allocated once, and left zeroed by every call);
  3. `fused_moe_align._place_kernel`: each routed row into its expert's group.

The arithmetic is the family's (`routing.route`) in the same operations: float32 softmax of the logits as CUDA's
`expf` computes it (libdevice), correctly rounded divisions, the renormalizing sum over k. Top-k on the softmax
probabilities equals top-k on the logits except among equal logits, where the order is the lowest index first; the
sums' reduction order is Triton's, so a gate weight can differ from torch's in its last float32 bit (the routing tests
bound both). Families: SOFTMAX (Qwen, Mixtral, OLMoE) and TOPK_SOFTMAX (GPT-OSS); sigmoid scoring with correction
bias and expert groups (DeepSeek-V3, GLM, MiniMax) keeps the torch path (`fits`).

    weights_TK, ids_TK, align = route_align(spec, logits_TE, counts_E, block_m=16, target=target)

`python -m pytest tests/rollout/model/test_router_kernel.py` runs it under Triton's CPU interpreter against
`routing.route`.

Tensor suffixes: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import os

import torch

from r3rl.models.routing import RouterSpec, Scoring
from r3rl.rollout.model.fused_moe import available
from r3rl.rollout.model.fused_moe_align import Alignment, align_counted
from r3rl.rollout.model.kv_cache import RouteTarget

try:  # optional: CPU CI has no triton
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = libdevice = None

__all__ = ["fits", "route_align", "MAX_EXPERTS"]

MAX_EXPERTS = 1024
"""Widest router the kernel takes (one program holds BLOCK_T rows of all E scores)."""


def fits(spec: RouterSpec, correction_E: torch.Tensor | None, device: torch.device) -> bool:
    """The kernel computes this router: triton, a CUDA device (or the interpreter), softmax or top-k-softmax scoring,
    no selection-only correction bias and no expert groups, at most MAX_EXPERTS experts."""
    if not available() or not (device.type == "cuda" or _interpreted()):
        return False
    return (spec.scoring in (Scoring.SOFTMAX, Scoring.TOPK_SOFTMAX) and correction_E is None and spec.n_group == 1
            and spec.num_experts <= MAX_EXPERTS)


def route_align(spec: RouterSpec, logits_TE: torch.Tensor, counts_E: torch.Tensor, *, block_m: int,
                valid_T: torch.Tensor | None = None,
                target: RouteTarget | None = None) -> tuple[torch.Tensor, torch.Tensor, Alignment]:
    """(weights_TK, ids_TK, alignment): `routing.route(spec, logits_TE, sorted_topk=True)`, the ids written to
    `target` (every token, padding included, as the torch path writes them), and the (token, k) rows of valid tokens
    grouped by expert in blocks of `block_m` (`fused_moe.Alignment`, for `fused_moe.fused_moe(..., align=)`).

    `counts_E`: an int32 `[E]` buffer of zeros, owned by the caller and reused across calls (left zeroed)."""
    if not available():
        raise RuntimeError("route_align needs triton (not importable here); use routing.route")
    T, E = logits_TE.shape
    K = spec.top_k
    problems = []
    if spec.num_experts != E:
        problems.append(f"logits have {E} experts, the router spec {spec.num_experts}")
    if counts_E.shape != (E,) or counts_E.dtype != torch.int32:
        problems.append(f"counts_E must be int32 [{E}], got {counts_E.dtype} {tuple(counts_E.shape)}")
    if valid_T is not None and valid_T.shape != (T,):
        problems.append(f"valid_T must be [{T}], got {tuple(valid_T.shape)}")
    if target is not None and (target.blk_T.shape != (T,) or target.off_T.shape != (T,)
                               or target.routes_NbK.shape[-1] != K or target.routes_NbK.stride(-1) != 1):
        problems.append(f"target must hold [{T}] blocks and offsets and a [blocks, block_size, {K}] capture, got "
                        f"{tuple(target.blk_T.shape)}, {tuple(target.off_T.shape)}, {tuple(target.routes_NbK.shape)}")
    if problems:
        raise ValueError("route_align: " + "; ".join(problems))
    dev = logits_TE.device
    logits_TE = logits_TE.contiguous()
    softmax_first = spec.scoring is Scoring.SOFTMAX
    out_dtype = logits_TE.dtype if (not softmax_first or spec.cast_to_logits_dtype) else torch.float32
    weights_TK = torch.empty(T, K, dtype=out_dtype, device=dev)
    ids_TK = torch.empty(T, K, dtype=torch.int64, device=dev)
    e_pow2 = triton.next_power_of_2(E)
    block_t = max(1, min(16, 1024 // e_pow2))
    routes = target.routes_NbK if target is not None else ids_TK  # any pointer when HAS_TARGET is False
    blk = target.blk_T if target is not None else ids_TK
    off = target.off_T if target is not None else ids_TK
    valid = valid_T if valid_T is not None else ids_TK
    _route_kernel[(triton.cdiv(T, block_t),)](
        logits_TE, weights_TK, ids_TK, counts_E, valid, routes, blk, off, T, E,
        routes.stride(0) if target is not None else 0, routes.stride(1) if target is not None else 0,
        float(spec.renorm_eps), float(spec.scaling_factor),
        K=K, K_POW2=triton.next_power_of_2(K), E_POW2=e_pow2, BLOCK_T=block_t, SOFTMAX_FIRST=softmax_first,
        RENORMALIZE=spec.renormalize and softmax_first, SCALE=spec.scaling_factor != 1.0 and softmax_first,
        HAS_VALID=valid_T is not None, HAS_TARGET=target is not None, LIBDEVICE=not _interpreted())
    try:
        return weights_TK, ids_TK, align_counted(ids_TK, counts_E, block_m, valid_T)
    except BaseException:  # the scan never ran: leave the shared counts zeroed for the next call
        counts_E.zero_()
        raise


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit(do_not_specialize=["T"])  # one build for every token count
    def _route_kernel(logits_ptr, weights_ptr, ids_ptr, counts_ptr, valid_ptr, routes_ptr, blk_ptr, off_ptr, T, E,
                      stride_rn, stride_rb, renorm_eps, scaling, K: tl.constexpr, K_POW2: tl.constexpr,
                      E_POW2: tl.constexpr, BLOCK_T: tl.constexpr, SOFTMAX_FIRST: tl.constexpr,
                      RENORMALIZE: tl.constexpr, SCALE: tl.constexpr, HAS_VALID: tl.constexpr,
                      HAS_TARGET: tl.constexpr, LIBDEVICE: tl.constexpr):
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        offs_e = tl.arange(0, E_POW2)
        e_ok = offs_e < E
        x = tl.load(logits_ptr + offs_t[:, None].to(tl.int64) * E + offs_e[None, :],
                    mask=t_ok[:, None] & e_ok[None, :], other=float("-inf")).to(tl.float32)
        if SOFTMAX_FIRST:  # float32 softmax over all experts; rank and gate on its probabilities
            ex = _exp(x - tl.max(x, axis=1)[:, None], LIBDEVICE)
            s = tl.math.div_rn(ex, tl.sum(ex, axis=1)[:, None])
            s = tl.where(e_ok[None, :], s, float("-inf"))
        else:  # GPT-OSS: rank on the logits, softmax over the chosen k only
            s = x
        offs_k = tl.arange(0, K_POW2)
        ids = tl.zeros((BLOCK_T, K_POW2), dtype=tl.int32)
        vals = tl.full((BLOCK_T, K_POW2), float("-inf"), dtype=tl.float32)
        free = e_ok[None, :] & (offs_t[:, None] >= 0)  # [BLOCK_T, E_POW2]: experts not chosen yet
        for k in tl.static_range(K):  # k passes of argmax: descending, the lowest expert first among ties
            best = tl.max(tl.where(free, s, float("-inf")), axis=1)
            idx = tl.min(tl.where(free & (s == best[:, None]), offs_e[None, :], E_POW2), axis=1)
            # a NaN score matches nothing: the lowest free expert, so that a row's k ids stay distinct and in range
            idx = tl.where(idx < E_POW2, idx, tl.min(tl.where(free, offs_e[None, :], E_POW2), axis=1))
            ids = tl.where(offs_k[None, :] == k, idx[:, None], ids)
            vals = tl.where(offs_k[None, :] == k, best[:, None], vals)
            free = free & (offs_e[None, :] != idx[:, None])
        k_ok = offs_k < K
        if SOFTMAX_FIRST:
            w = vals
            if RENORMALIZE:
                w = tl.math.div_rn(w, tl.sum(tl.where(k_ok[None, :], w, 0.0), axis=1)[:, None] + renorm_eps)
            if SCALE:
                w = w * scaling
        else:
            ex = _exp(vals - tl.max(vals, axis=1)[:, None], LIBDEVICE)
            w = tl.math.div_rn(ex, tl.sum(tl.where(k_ok[None, :], ex, 0.0), axis=1)[:, None])
        tk_ok = t_ok[:, None] & k_ok[None, :]
        out = offs_t[:, None].to(tl.int64) * K + offs_k[None, :]
        tl.store(weights_ptr + out, w.to(weights_ptr.dtype.element_ty), mask=tk_ok)
        tl.store(ids_ptr + out, ids.to(tl.int64), mask=tk_ok)
        if HAS_TARGET:  # the routing capture, inside the forward
            blk = tl.load(blk_ptr + offs_t, mask=t_ok, other=0)
            off = tl.load(off_ptr + offs_t, mask=t_ok, other=0)
            dst = routes_ptr + blk[:, None] * stride_rn + off[:, None] * stride_rb + offs_k[None, :]
            tl.store(dst, ids.to(routes_ptr.dtype.element_ty), mask=tk_ok)
        counted = tk_ok
        if HAS_VALID:
            counted = counted & (tl.load(valid_ptr + offs_t, mask=t_ok, other=0) != 0)[:, None]
        tl.atomic_add(counts_ptr + ids, tl.full((BLOCK_T, K_POW2), 1, tl.int32), mask=counted)

    @triton.jit
    def _exp(x, LIBDEVICE: tl.constexpr):
        """CUDA's expf (what torch's softmax calls) on a GPU; the interpreter has no libdevice."""
        if LIBDEVICE:
            return libdevice.exp(x)
        return tl.exp(x)
