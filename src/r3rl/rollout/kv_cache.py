"""Preallocated per-slot device buffers of the rollout engine: the KV cache and the routing capture.

Layout: static, one slot per running request (no paging). Slot s holds its request's tokens at positions
[0, length) of every buffer; positions past the length hold stale but finite values that attention masks out.

    k_LSHTD, v_LSHTD   [layers, slots, kv_heads, max_seq_len, head_dim]   model dtype
    routes_SPLK        [slots, max_seq_len, moe_layers, top_k]             compact dtype (uint8 below 255 experts)

The engine keeps the running requests in slots [0, n) (a finished request's slot is refilled by moving the last
one into it, see `move`), so decode reads `k_LSHTD[l, :B, :, :T]` as a strided view: attention needs no gather,
and `[B, kv_heads]` merge into one batch dimension of a plain batched matmul.

Routing capture writes the top-k ids of every (token, MoE layer) into `routes_SPLK` on the device, inside the
forward (and inside the CUDA graph): no host sync per token. Rows are copied to the host once, when requests finish
(`read`: one copy for all the requests that finish in a step). With capture off the engine holds a
`NullRoutingCapture` instead, chosen once, so the forward never branches on a flag.

Both allocate once; nothing here reallocates, so CUDA graphs that captured these buffers stay valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from r3rl.trace import RoutingTrace, compact_dtype

__all__ = ["KVCache", "RoutingCapture", "NullRoutingCapture"]

_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int16): torch.int16}


@dataclass(frozen=True)
class KVCache:
    k_LSHTD: torch.Tensor
    v_LSHTD: torch.Tensor

    @classmethod
    def allocate(
        cls, *, num_layers: int, num_slots: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> KVCache:
        shape = (num_layers, num_slots, num_kv_heads, max_seq_len, head_dim)
        # zeros, not empty: masked positions are multiplied by 0 in attention, and 0 * NaN would leak
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def nbytes(self) -> int:
        return 2 * self.k_LSHTD.numel() * self.k_LSHTD.element_size()

    def write_prefill(self, layer: int, slot0: int, k_NHPD: torch.Tensor, v_NHPD: torch.Tensor) -> None:
        """Keys/values of N prompts (padded to P) into slots [slot0, slot0 + N), positions [0, P)."""
        N, _, P, _ = k_NHPD.shape
        self.k_LSHTD[layer, slot0 : slot0 + N, :, :P] = k_NHPD
        self.v_LSHTD[layer, slot0 : slot0 + N, :, :P] = v_NHPD

    def write_decode(self, layer: int, rows_B: torch.Tensor, pos_B: torch.Tensor, k_BHD: torch.Tensor,
                     v_BHD: torch.Tensor) -> None:
        """One token per slot: slot rows_B[b] at position pos_B[b]."""
        self.k_LSHTD[layer, rows_B, :, pos_B] = k_BHD
        self.v_LSHTD[layer, rows_B, :, pos_B] = v_BHD

    def context(self, layer: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views `[batch, kv_heads, length, head_dim]` of slots [0, batch), positions [0, length)."""
        return self.k_LSHTD[layer, :batch, :, :length], self.v_LSHTD[layer, :batch, :, :length]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src's first `length` positions of every layer into slot dst."""
        self.k_LSHTD[:, dst, :, :length] = self.k_LSHTD[:, src, :, :length]
        self.v_LSHTD[:, dst, :, :length] = self.v_LSHTD[:, src, :, :length]


class RoutingCapture:
    """Device buffer of the experts every (slot, position, MoE layer) was routed to."""

    def __init__(self, *, num_slots: int, max_seq_len: int, num_layers: int, top_k: int, num_experts: int,
                 device: torch.device) -> None:
        self.num_experts = num_experts
        dtype = _TORCH_DTYPES[compact_dtype(num_experts)]
        self.routes_SPLK = torch.zeros(num_slots, max_seq_len, num_layers, top_k, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.routes_SPLK.numel() * self.routes_SPLK.element_size()

    def write_prefill(self, layer: int, slot0: int, ids_NPK: torch.Tensor) -> None:
        N, P, _ = ids_NPK.shape
        self.routes_SPLK[slot0 : slot0 + N, :P, layer] = ids_NPK.to(self.routes_SPLK.dtype)

    def write_decode(self, layer: int, rows_B: torch.Tensor, pos_B: torch.Tensor, ids_BK: torch.Tensor) -> None:
        self.routes_SPLK[rows_B, pos_B, layer] = ids_BK.to(self.routes_SPLK.dtype)

    def read(self, slots: list[int], num_rows: list[int]) -> list[RoutingTrace]:
        """Traces of `slots`, each of its first `num_rows` positions, in one device-to-host copy. Ids come from
        top-k, so the row invariants hold by construction and `RoutingTrace.from_ids`'s O(rows) check is skipped."""
        if not slots:
            return []
        # note: a host sync, once per step that finishes requests; copy=True since on CPU .cpu() would alias
        ids = self.routes_SPLK[torch.tensor(slots), : max(num_rows)].to("cpu", copy=True).numpy()
        return [RoutingTrace(np.ascontiguousarray(ids[b, :n]), self.num_experts) for b, n in enumerate(num_rows)]

    def move(self, src: int, dst: int, length: int) -> None:
        self.routes_SPLK[dst, :length] = self.routes_SPLK[src, :length]


class NullRoutingCapture:
    """Routing capture turned off: same interface, does nothing, returns no trace."""

    nbytes = 0

    def write_prefill(self, layer: int, slot0: int, ids_NPK: torch.Tensor) -> None:
        pass

    def write_decode(self, layer: int, rows_B: torch.Tensor, pos_B: torch.Tensor, ids_BK: torch.Tensor) -> None:
        pass

    def read(self, slots: list[int], num_rows: list[int]) -> list[None]:
        return [None] * len(slots)

    def move(self, src: int, dst: int, length: int) -> None:
        pass
