"""Lay out per-sample routing traces as one Megatron-core rank's routers see their tokens.

Pure tensor code (no megatron import): it runs and is tested without the extra installed.

A trace row i holds the experts used when token i was the input (`r3rl.trace`). mcore's router flattens its input
`[s, b, h]` with `view(-1, E)`, so router token t of a BSHD micro-batch is (position t // b, sample t % b):
sequence-major, not sample-major. The rank's sequence is what is left after, in this order:

  1. padding or packing: BSHD right padding to `seq_len`, or THD packing (each sample padded to a multiple of
     `pad_multiple`, mcore's `cu_seqlens_padded`);
  2. context parallel (mcore's zigzag, `get_batch_on_this_cp_rank` / TE's `thd_get_partitioned_indices`): the
     sequence (THD: each packed sample) is cut into 2*cp chunks and CP rank r keeps chunks r and 2*cp-1-r;
  3. sequence parallel: the embedding output is scattered along the sequence over the TP ranks (rank r keeps the
     r-th of tp equal parts). Without sequence parallel every TP rank's router sees the whole CP-local sequence.

Pipeline stages need no token layout: replay is keyed by layer number (`r3rl.megatron.replay`), and
`moe_layer_numbers` / `stage_trace_layers` say which trace layers a stage's routers read.

Positions with no trace row (padding, the last token of each sample) are pad rows (255 / -1): replay lets the live
router choose there, the check skips them.

Shapes: B samples, S positions, T router tokens, L trace layers, K top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from r3rl.trace import (
    ReplayBatch,
    RoutingTrace,
    TraceError,
    common_shape,
    compact_dtype,
    has_partial_rows,
    pad_value_for,
)

__all__ = ["RankLayout", "pad_bshd", "pack_thd", "zigzag_cp_slice", "thd_cp_slice", "sp_scatter", "router_order_bshd",
           "rank_router_batch", "moe_layer_numbers", "stage_trace_layers"]


@dataclass(kw_only=True, frozen=True)
class RankLayout:
    """Where one rank sits and how its micro-batch is laid out."""

    packed: bool = False
    """THD packing (one row of concatenated samples) instead of BSHD right padding."""
    seq_len: int | None = None
    """BSHD: padded sequence length (None: the longest sample, rounded up to the CP/SP multiple)."""
    cp_size: int = 1
    """Context-parallel size."""
    cp_rank: int = 0
    """This rank's context-parallel rank."""
    tp_size: int = 1
    """Tensor-parallel size."""
    tp_rank: int = 0
    """This rank's tensor-parallel rank."""
    sequence_parallel: bool = False
    """mcore's sequence parallel: the router's tokens are split over the TP ranks."""

    def __post_init__(self) -> None:
        for name, size, rank in (("cp", self.cp_size, self.cp_rank), ("tp", self.tp_size, self.tp_rank)):
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"RankLayout: {name}_rank must be in [0, {name}_size): got {name}_size={size}, "
                                 f"{name}_rank={rank}")

    @property
    def pad_multiple(self) -> int:
        """Each sequence (THD: each packed sample) must divide into 2*cp chunks, then into tp SP parts."""
        return (2 * self.cp_size if self.cp_size > 1 else 1) * (self.tp_size if self.sequence_parallel else 1)


def pad_bshd(traces: Sequence[RoutingTrace], seq_len: int, *, lengths: Sequence[int] | None = None) -> torch.Tensor:
    """Right-padded ids `[B, seq_len, L, K]` (compact dtype): sample b's row i at position i, pad rows after."""
    L, K, E = common_shape(traces)
    out = np.full((len(traces), seq_len, L, K), pad_value_for(E), dtype=compact_dtype(E))
    for b, trace in enumerate(traces):
        if lengths is not None:
            trace.validate(num_tokens=lengths[b], sample=b)
        if trace.num_rows + 1 > seq_len:
            raise TraceError(f"sample does not fit the padded forward (sample {b}): tokens={trace.num_rows + 1} > "
                             f"seq_len={seq_len}")
        out[b, : trace.num_rows] = trace.expert_ids
    return torch.from_numpy(out)


def pack_thd(traces: Sequence[RoutingTrace], *, pad_multiple: int = 1) -> tuple[torch.Tensor, list[int]]:
    """Packed ids `[T, L, K]` and `cu_seqlens_padded` (B + 1 offsets): sample b (rows + 1 tokens) padded to a
    multiple of `pad_multiple`, as mcore's THD batches with `cu_seqlens_padded`."""
    L, K, E = common_shape(traces)
    pad, dtype = pad_value_for(E), compact_dtype(E)
    chunks, cu = [], [0]
    for trace in traces:
        n = trace.num_rows + 1
        n_pad = -(-n // pad_multiple) * pad_multiple
        chunk = np.full((n_pad, L, K), pad, dtype=dtype)
        chunk[: trace.num_rows] = trace.expert_ids
        chunks.append(chunk)
        cu.append(cu[-1] + n_pad)
    return torch.from_numpy(np.concatenate(chunks)), cu


def zigzag_cp_slice(ids: torch.Tensor, cp_size: int, cp_rank: int, *, seq_dim: int = 0) -> torch.Tensor:
    """mcore's context-parallel split of one sequence: 2*cp chunks along `seq_dim`, rank r keeps r and 2cp-1-r."""
    if cp_size == 1:
        return ids
    S = ids.shape[seq_dim]
    if S % (2 * cp_size):
        raise ValueError(f"context parallel needs the sequence length divisible by 2*cp={2 * cp_size}: got {S}")
    chunks = ids.chunk(2 * cp_size, dim=seq_dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=seq_dim)


def thd_cp_slice(ids_TLK: torch.Tensor, cu_seqlens_padded: Sequence[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """THD context parallel: each packed sample is zigzag-split on its own, the rank's parts concatenated in order."""
    if cp_size == 1:
        return ids_TLK
    if cu_seqlens_padded[-1] != ids_TLK.shape[0]:
        raise ValueError(f"cu_seqlens_padded ends at {cu_seqlens_padded[-1]}, the packed ids have {ids_TLK.shape[0]}")
    parts = [zigzag_cp_slice(ids_TLK[a:b], cp_size, cp_rank) 
             for a, b in zip(cu_seqlens_padded[:-1], cu_seqlens_padded[1:], strict=True)]
    return torch.cat(parts)


def sp_scatter(ids: torch.Tensor, tp_size: int, tp_rank: int, *, seq_dim: int = 0) -> torch.Tensor:
    """Sequence parallel: the tp_rank-th of tp_size equal parts along `seq_dim`."""
    if tp_size == 1:
        return ids
    S = ids.shape[seq_dim]
    if S % tp_size:
        raise ValueError(f"sequence parallel needs the sequence length divisible by tp={tp_size}: got {S}")
    return ids.narrow(seq_dim, tp_rank * (S // tp_size), S // tp_size)


def router_order_bshd(ids_BSLK: torch.Tensor) -> torch.Tensor:
    """`[B, S, L, K]` -> `[S * B, L, K]` in the router's order (its input is `[s, b, h]`, flattened s-major)."""
    B, S = ids_BSLK.shape[:2]
    return ids_BSLK.transpose(0, 1).reshape(S * B, *ids_BSLK.shape[2:])


def rank_router_batch(traces: Sequence[RoutingTrace], layout: RankLayout) -> ReplayBatch:
    """The ids this rank's routers see for one micro-batch of `traces`, in router token order."""
    L, K, E = common_shape(traces)
    if layout.packed:
        ids, cu = pack_thd(traces, pad_multiple=layout.pad_multiple)
        ids = thd_cp_slice(ids, cu, layout.cp_size, layout.cp_rank)
        if layout.sequence_parallel:
            ids = sp_scatter(ids, layout.tp_size, layout.tp_rank)
    else:
        longest = max(t.num_rows + 1 for t in traces)
        m = layout.pad_multiple
        seq_len = layout.seq_len if layout.seq_len is not None else -(-longest // m) * m
        ids = pad_bshd(traces, seq_len)
        ids = zigzag_cp_slice(ids, layout.cp_size, layout.cp_rank, seq_dim=1)
        if layout.sequence_parallel:
            ids = sp_scatter(ids, layout.tp_size, layout.tp_rank, seq_dim=1)
        ids = router_order_bshd(ids)
    pad = pad_value_for(E)
    is_pad = ids.long() == pad
    return ReplayBatch(expert_ids=ids, pad_value=pad, has_pad=bool(is_pad.any()), num_experts=E, validated=True,
                       partial_pad=has_partial_rows(is_pad))


def moe_layer_numbers(num_layers: int, moe_layer_freq: int | Sequence[int] = 1) -> list[int]:
    """The decoder layer numbers (1-based, mcore's `layer_number`) that hold MoE layers, from mcore's
    `TransformerConfig.moe_layer_freq` (an int N: every N-th layer starting at the first; a 0/1 list per layer)."""
    if isinstance(moe_layer_freq, int):
        pattern = [1 if i % moe_layer_freq == 0 else 0 for i in range(num_layers)]
    else:
        pattern = list(moe_layer_freq)
        if len(pattern) != num_layers:
            raise ValueError(f"moe_layer_freq pattern has {len(pattern)} entries, num_layers={num_layers}")
    return [i + 1 for i, p in enumerate(pattern) if p]


def stage_trace_layers(moe_numbers: Sequence[int], layer_offset: int, num_stage_layers: int) -> dict[int, int]:
    """{decoder layer number: trace layer} for the MoE layers of one pipeline stage, whose decoder layers are
    `layer_offset + 1 .. layer_offset + num_stage_layers` (mcore's `get_transformer_layer_offset`)."""
    return {n: moe_numbers.index(n) for n in moe_numbers if layer_offset < n <= layer_offset + num_stage_layers}
