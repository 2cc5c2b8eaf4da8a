"""The sampler of `r3rl.rollout.engine.sampling` as one Triton kernel (GPU): one pass over each row's logits.

`sampling.sample_tokens` computes, per row, log_softmax of the logits (at the row's log-prob temperature), the greedy
argmax, and the Gumbel-max sample argmax(logits / temperature + g) with the counter-based hash noise g. In torch
that is ~25 kernels over `[B, V]` (the hash alone is ten int64 passes), ~0.45 ms of a 5 ms decode step at batch 256
on an H200. Here one program per row walks the vocabulary in chunks once and keeps, in float32 registers: the online
max and sum of exp for the log-softmax, the running greedy argmax, and the running sampled argmax (whose raw logit is
read once at the end). Same hash, same uniform bits, same Gumbel transform, same first-index tie-breaking: the tokens
are the torch path's (the transcendental functions may differ in the last float32 bit, which flips a token only on
an exact tie of noisy scores), the log-probs agree to float32 rounding.

Top-k / top-p rows (SamplingMode.FILTERED) need a sort of the vocabulary and stay on the torch path.

    pytest tests/rollout/model/test_sampling_kernel.py    # under TRITON_INTERPRET=1 on CPU, and on GPU

Tensor suffixes: B rows, V vocabulary.
"""

from __future__ import annotations

import torch

try:  # optional: CPU CI has no triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = ["available", "sample_fused"]


def available() -> bool:
    return triton is not None


def sample_fused(logits_BV: torch.Tensor, temperature_B: torch.Tensor, seed_B: torch.Tensor,
                 logprob_temperature_B: torch.Tensor, counter_B: torch.Tensor, *, sample: bool,
                 greedy_temperature: float, block_v: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens_B int64, logprobs_B float32), as `sampling.sample_tokens` computes them for the GREEDY
    (`sample=False`) and SAMPLE modes. `seed_B` holds folded 32-bit keys, `counter_B` each sampled token's position."""
    if not available():
        raise RuntimeError("sample_fused needs triton (not importable here)")
    if logits_BV.dim() != 2 or logits_BV.stride(1) != 1:
        raise ValueError(f"sample_fused: logits must be [B, V] with a contiguous last dim, got shape "
                         f"{tuple(logits_BV.shape)} strides {logits_BV.stride()}")
    B, V = logits_BV.shape
    for name, t in (("temperature", temperature_B), ("seed", seed_B), ("logprob_temperature", logprob_temperature_B),
                    ("counter", counter_B)):
        if t.shape != (B,):
            raise ValueError(f"sample_fused: {name} must be [B={B}], got {tuple(t.shape)}")
    tokens_B = torch.empty(B, dtype=torch.int64, device=logits_BV.device)
    logprobs_B = torch.empty(B, dtype=torch.float32, device=logits_BV.device)
    block = min(block_v, triton.next_power_of_2(V))
    _sample_kernel[(B,)](logits_BV, logits_BV.stride(0), V, temperature_B, seed_B, logprob_temperature_B, counter_B,
                         tokens_B, logprobs_B, float(greedy_temperature), SAMPLE=sample, BLOCK_V=block,
                         num_warps=8 if block >= 2048 else 4)
    return tokens_B, logprobs_B


if triton is not None:

    @triton.jit
    def _mix32(x):
        """sampling._mix32 on uint32 (multiplication wraps mod 2**32, shifts are logical)."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x2C1B3C6D
        return x ^ (x >> 16)

    @triton.jit
    def _sample_kernel(logits_ptr, stride_b, V, temperature_ptr, seed_ptr, lp_temperature_ptr, counter_ptr,
                       tokens_ptr, logprobs_ptr, greedy_temperature, SAMPLE: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * stride_b
        lp_t = tl.load(lp_temperature_ptr + row)
        temperature = tl.load(temperature_ptr + row)
        samples = temperature > greedy_temperature
        t_safe = tl.where(samples, temperature, 1.0)
        counter = tl.load(counter_ptr + row).to(tl.uint32)  # low 32 bits: what `& 0xFFFFFFFF` keeps
        row_key = _mix32(tl.load(seed_ptr + row).to(tl.uint32) ^ _mix32(counter * 0x61C88647 + 0x3C6EF372))
        offs = tl.arange(0, BLOCK_V)
        m = tl.full((), -3.0e38, tl.float32)  # running max of logits / lp_t (finite: no inf - inf)
        s = tl.zeros((), tl.float32)  # running sum of exp(logits / lp_t - m)
        g_best = tl.full((), float("-inf"), tl.float32)
        g_idx = tl.zeros((), tl.int32)
        s_best = tl.full((), float("-inf"), tl.float32)
        s_idx = tl.zeros((), tl.int32)
        for v0 in range(0, V, BLOCK_V):
            v = v0 + offs
            ok = v < V
            x = tl.load(base + v, mask=ok, other=float("-inf")).to(tl.float32)
            xl = tl.math.div_rn(x, lp_t)  # IEEE division, as torch's
            m_new = tl.maximum(m, tl.max(xl, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(xl - m_new), 0)
            m = m_new
            c_best = tl.max(x, 0)
            c_idx = tl.argmax(x, 0, tie_break_left=True)
            take = c_best > g_best  # strictly: an earlier chunk keeps a tie (first index, as torch.argmax)
            g_idx = tl.where(take, v0 + c_idx, g_idx)
            g_best = tl.where(take, c_best, g_best)
            if SAMPLE:
                key = _mix32(v.to(tl.uint32) * 0x9E3779B1 + 0x7F4A7C15)  # sampling.vocab_keys
                bits = _mix32(row_key ^ key) >> 9
                uniform = (bits.to(tl.float32) + 0.5) * (1.0 / 8388608.0)
                y = tl.math.div_rn(x, t_safe) - tl.log(-tl.log(uniform))
                y = tl.where(ok, y, float("-inf"))
                c_best = tl.max(y, 0)
                c_idx = tl.argmax(y, 0, tie_break_left=True)
                take = c_best > s_best
                s_idx = tl.where(take, v0 + c_idx, s_idx)
                s_best = tl.where(take, c_best, s_best)
        token = g_idx
        raw = g_best
        if SAMPLE:
            token = tl.where(samples, s_idx, g_idx)
            raw = tl.where(samples, tl.load(base + s_idx).to(tl.float32), g_best)  # the sampled token's logit
        tl.store(tokens_ptr + row, token.to(tl.int64))
        tl.store(logprobs_ptr + row, tl.math.div_rn(raw, lp_t) - m - tl.log(s))
