"""The GEMM kernels of the fused MoE experts (Triton; launched by `r3rl.rollout.model.fused_moe.fused_moe` over an
alignment from `r3rl.rollout.model.fused_moe_align`):
  - `_gate_up_kernel`: per block, `silu(x @ gate^T) * (x @ up^T)` (or GPT-OSS's clamped GLU of the biased gate and
    up), gate and up accumulated side by side from the one fused weight, rounded where HF's eager experts round in
    bf16/fp16;
  - `_down_kernel`: per block, `act @ down^T` (+ the down bias per (token, k) row), times each row's gate weight,
    stored in (token, k) order;
  - `_sum_k_kernel`: the sum over top-k per token (float32, deterministic, no atomics), one cast, optionally plus the
    decoder layer's residual.
Defined only when triton imports. The rounding rules are in `fused_moe`'s module docstring.
"""

from __future__ import annotations

try:  # optional: CPU CI has no triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = ["_gate_up_kernel", "_down_kernel", "_sum_k_kernel"]

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
