"""Device buffers of the rollout engine: the paged KV cache and the routing capture.

Both store tokens in the blocks of one `BlockTable` (paging.py): slot s's position p is at block
`table_SM[s, p // block_size]`, offset `p % block_size`. Memory is bounded by the pool (`EngineConfig.kv_cache_tokens`),
not by slots x max_seq_len, and the samples of one prompt share its blocks.

    k_LNHbD, v_LNHbD   [layers, blocks, kv_heads, block_size, head_dim]   model dtype
    routes_NbLK        [blocks, block_size, moe_layers, top_k]            compact dtype (uint8 below 255 experts)

Decode on GPU reads the blocks in place (paged_attention.py, Triton). Elsewhere (CPU, batch-invariant, MLA) `context`
gathers each row's blocks into a `[rows, kv_heads, T, head_dim]` context (whole blocks by `index_select`), whose rows
then merge with the kv heads into one batch dimension of a plain batched matmul.

Routing capture writes the top-k ids of every (token, MoE layer) into `routes_NbLK` on the device, inside the forward
(and inside the CUDA graph; on GPU inside the fused router kernel, through a layer's `RouteTarget`): no host sync per
token. Rows are copied to the host once, when requests finish
(`read_later`: one gather and one copy for all the requests that finish in a step); a sample that shares its prompt's
blocks reads the prompt's routing from them, so every trace covers its whole prompt. With capture off the engine
holds a `NullRoutingCapture` instead, chosen once, so the forward never branches on a flag.

Both allocate once; nothing here reallocates, so CUDA graphs that captured these buffers stay valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from r3rl.rollout.model.paging import BlockTable, blocks_for
from r3rl.trace import RoutingTrace, compact_dtype

__all__ = ["TokenWhere", "RouteTarget", "KVCache", "RoutingCapture", "NullRoutingCapture"]

_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int16): torch.int16}


@dataclass(frozen=True)
class TokenWhere:
    """Where new tokens go: block `blk[...]`, offset `off[...]`, `[B]` for a decode step or `[N, P]` for a prefill.
    Computed once per forward and shared by every layer's KV and routing writes."""

    blk: torch.Tensor
    off: torch.Tensor

    @classmethod
    def decode(cls, table: BlockTable, rows_B: torch.Tensor, pos_B: torch.Tensor) -> TokenWhere:
        """Slot rows_B[b]'s token at position pos_B[b]."""
        bs = table.block_size
        return cls(table.table_SM[rows_B, pos_B // bs], pos_B % bs)

    @classmethod
    def prefill(cls, table: BlockTable, rows_N: torch.Tensor, pos_P: torch.Tensor) -> TokenWhere:
        """Positions pos_P (= [0, P)) of slots rows_N. Positions past a slot's blocks (the padding of a right-padded
        prompt) land in the null block."""
        bs = table.block_size
        return cls(table.table_SM[rows_N.unsqueeze(1), pos_P // bs],
                   (pos_P % bs).expand(rows_N.shape[0], -1).contiguous())  # [N, P] once, not per layer


@dataclass(frozen=True)
class RouteTarget:
    """Where one MoE layer's top-k ids go in the routing capture: token t's at `routes_NbK[blk_T[t], off_T[t]]`.
    The MoE block writes them (`write`, or inside the fused router kernel: `r3rl.rollout.model.router_kernel`)."""

    routes_NbK: torch.Tensor
    """The capture's `[blocks, block_size, top_k]` view of one MoE layer (strided: the layer axis is sliced)."""
    blk_T: torch.Tensor
    """KV block of each token (int64)."""
    off_T: torch.Tensor
    """Offset in that block (int64)."""

    def write(self, ids_TK: torch.Tensor) -> None:
        """The torch path: one cast and one scatter."""
        self.routes_NbK[self.blk_T, self.off_T] = ids_TK.to(self.routes_NbK.dtype)


@dataclass(frozen=True)
class KVCache:
    k_LNHbD: torch.Tensor
    v_LNHbD: torch.Tensor
    table: BlockTable

    @classmethod
    def allocate(cls, *, num_layers: int, table: BlockTable, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> KVCache:
        shape = (num_layers, table.num_blocks, num_kv_heads, table.block_size, head_dim)
        # zeros, not empty: masked positions are multiplied by 0 in attention, and 0 * NaN would leak
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   table)

    @property
    def nbytes(self) -> int:
        return 2 * self.k_LNHbD.numel() * self.k_LNHbD.element_size()

    def write(self, layer: int, where: TokenWhere, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys/values `[*where.blk.shape, kv_heads, head_dim]` of one layer at `where`."""
        self.k_LNHbD[layer][where.blk, :, where.off] = k
        self.v_LNHbD[layer][where.blk, :, where.off] = v

    def context(self, layer: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`[batch, kv_heads, length, head_dim]` of slots [0, batch), positions [0, length) (a multiple of the block
        size), gathered from their blocks."""
        M = length // self.table.block_size
        idx_R = self.table.table_SM[:batch, :M].flatten()
        _, H, bs, D = self.k_LNHbD.shape[1:]
        out = []
        for pool in (self.k_LNHbD[layer], self.v_LNHbD[layer]):
            blocks_BMHbD = pool.index_select(0, idx_R).view(batch, M, H, bs, D)  # whole blocks: a row copy each
            # one kv head (MLA's latent) is already [B, 1, M * block, D]; else one more copy puts heads before time
            out.append(blocks_BMHbD.view(batch, 1, M * bs, D) if H == 1 else
                       blocks_BMHbD.transpose(1, 2).reshape(batch, H, M * bs, D))
        return out[0], out[1]

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Blocks src[i]'s keys/values of every layer into blocks dst[i] (a shared prompt's partial last block)."""
        src_M, dst_M = (torch.tensor(x, device=self.k_LNHbD.device) for x in (src, dst))
        self.k_LNHbD[:, dst_M] = self.k_LNHbD[:, src_M]
        self.v_LNHbD[:, dst_M] = self.v_LNHbD[:, src_M]


class RoutingCapture:
    """Device buffer of the experts every (block position, MoE layer) was routed to."""

    def __init__(self, *, table: BlockTable, num_layers: int, top_k: int, num_experts: int,
                 device: torch.device) -> None:
        self.num_experts, self.table = num_experts, table
        dtype = _TORCH_DTYPES[compact_dtype(num_experts)]
        self.routes_NbLK = torch.zeros(table.num_blocks, table.block_size, num_layers, top_k, dtype=dtype,
                                       device=device)

    @property
    def nbytes(self) -> int:
        return self.routes_NbLK.numel() * self.routes_NbLK.element_size()

    def target(self, layer: int, where: TokenWhere) -> RouteTarget:
        """Where MoE layer `layer`'s top-k ids of the tokens at `where` go (flattened in the forward's token order)."""
        return RouteTarget(self.routes_NbLK[:, :, layer], where.blk.reshape(-1), where.off.reshape(-1))

    def read_later(self, slots: list[int], num_rows: list[int]) -> Callable[[], list[RoutingTrace]]:
        """Traces of `slots`, each of its first `num_rows` positions: their gather and copy to the host are queued
        now (before their blocks can be reused); the returned function waits for the copy and builds the traces, so
        the host can do other work meanwhile.
        One gather and one device-to-host copy for all of them. Ids come from top-k (torch's, or the fused router's,
        which keeps a row's ids distinct and in range even on NaN scores), so the row invariants hold by
        construction and `RoutingTrace.from_ids`'s O(rows) check is skipped."""
        if not slots:
            return list
        bs = self.table.block_size
        blocks = [self.table.blocks(s)[: blocks_for(n, bs)] for s, n in zip(slots, num_rows, strict=True)]
        dev = self.routes_NbLK.device
        idx = torch.tensor([b for row in blocks for b in row]).to(dev, non_blocking=True)
        gathered = self.routes_NbLK[idx]  # a copy: later writes into these blocks do not reach it
        done = None
        if gathered.is_cuda:  # to (pinned) host memory without waiting; the event marks its end
            host = gathered.to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(dev))
        else:
            host = gathered

        def traces() -> list[RoutingTrace]:
            if done is not None:
                done.synchronize()  # note: a host sync, once per step that finishes requests
            ids = host.numpy()
            ids = ids.reshape(-1, *ids.shape[2:])
            out, start = [], 0
            for row, n in zip(blocks, num_rows, strict=True):
                out.append(RoutingTrace(np.ascontiguousarray(ids[start : start + n]), self.num_experts))
                start += len(row) * bs
            return out

        return traces

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        src_M, dst_M = (torch.tensor(x, device=self.routes_NbLK.device) for x in (src, dst))
        self.routes_NbLK[dst_M] = self.routes_NbLK[src_M]


class NullRoutingCapture:
    """Routing capture turned off: same interface, does nothing, returns no trace."""

    nbytes = 0

    def target(self, layer: int, where: TokenWhere) -> None:
        return None

    def read_later(self, slots: list[int], num_rows: list[int]) -> Callable[[], list[None]]:
        return lambda: [None] * len(slots)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        pass
