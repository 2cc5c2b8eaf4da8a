"""Fault injection: corrupt a routing trace on purpose, so that the R3 check must fail (the negative control).

One definition for every command: `r3rl check --inject-fault` corrupts the laid-out replay batch of each sample,
`r3rl train --inject-fault` the per-sample traces of its first step; both call `corrupt_ids`.

  shift            row i takes the experts of row i + 1 (the last row keeps its own): an off-by-one between the
                   trace and the tokens, the bug a wrong prompt/response boundary produces
  permute-layers   MoE layer l takes the experts of layer l - 1: replay keyed by the wrong layer
"""

from __future__ import annotations

import logging

import torch

from r3rl.config import Fault
from r3rl.trace import RoutingTrace

__all__ = ["corrupt_ids", "corrupt_trace"]

logger = logging.getLogger(__name__)


def corrupt_ids(ids_TLK: torch.Tensor, fault: Fault) -> torch.Tensor:
    """Expert ids `[..., T, L, K]` (tokens, MoE layers, top-k; leading sample dims allowed) with `fault` applied."""
    if ids_TLK.dim() < 3:
        raise ValueError(f"corrupt_ids needs ids shaped [..., tokens, layers, top_k]: got shape {tuple(ids_TLK.shape)}")
    if fault is Fault.NONE:
        return ids_TLK
    if fault is Fault.SHIFT:
        return torch.cat([ids_TLK[..., 1:, :, :], ids_TLK[..., -1:, :, :]], dim=-3)
    if fault is Fault.PERMUTE_LAYERS:
        if ids_TLK.shape[-2] < 2:
            raise ValueError(f"permute-layers needs at least 2 MoE layers: got {ids_TLK.shape[-2]}")
        return ids_TLK.roll(1, dims=-2)
    raise ValueError(f"unknown fault {fault!r}")


def corrupt_trace(trace: RoutingTrace, fault: Fault) -> RoutingTrace:
    """`trace` with `fault` applied (same compact dtype and pad value)."""
    return RoutingTrace.from_ids(corrupt_ids(torch.from_numpy(trace.expert_ids), fault).numpy(), trace.num_experts)
