"""Alignment for the fused MoE kernels (`r3rl.rollout.model.fused_moe`): group the (token, k) rows by expert and pad
each expert's group to a multiple of the block size, so that every block of BLOCK_M rows belongs to one expert; rows
routed to the sentinel expert E (padding tokens) are dropped. No host sync (CUDA-graph safe), static buffer lengths.

Two implementations with the same buffers and invariants: `align_block_size` in torch ops (a stable sort), and three
small Triton kernels (`align_triton`: atomic counts, then `align_counted`'s one-program scan that also fills the row
buffer, and atomic placement). The engine's fused router counts inside its routing kernel
(`r3rl.rollout.model.router_kernel`) and calls `align_counted` itself.

Tensor suffixes: T tokens, E experts, K top-k, R flattened (token, k) rows, M padded rows, B blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # optional: CPU CI has no triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = ["Alignment", "align_block_size", "align_counted", "align_triton", "padded_blocks"]


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
    num_blocks = padded_blocks(R, E, block_m)
    M = num_blocks * block_m
    dest_R = torch.where(sorted_R < E, padded_end_E[expert_R] - padded_E[expert_R] + rank_R, M)  # M: a dump slot
    row_ids_M = torch.full((M + 1,), R, dtype=torch.int32, device=dev)
    row_ids_M.scatter_(0, dest_R, order_R.to(torch.int32))
    block_start_B = torch.arange(num_blocks, device=dev) * block_m
    block_expert_B = torch.searchsorted(padded_end_E, block_start_B, right=True).clamp(max=E - 1).to(torch.int32)
    return Alignment(row_ids_M=row_ids_M[:M], block_expert_B=block_expert_B,
                     num_padded=padded_end_E[-1:].to(torch.int32), block_m=block_m)


def align_triton(ids_TK: torch.Tensor, num_experts: int, block_m: int, valid_T: torch.Tensor | None) -> Alignment:
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
    num_blocks = padded_blocks(R, E, block_m)
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


def padded_blocks(rows: int, num_experts: int, block_m: int) -> int:
    """Blocks of the alignment's static worst case: every row placed, each expert's group padded by block_m - 1."""
    return (rows + num_experts * (block_m - 1) + block_m - 1) // block_m


if triton is not None:

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
