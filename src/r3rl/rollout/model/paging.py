"""Paged KV memory of the rollout engine: the block allocator and the per-slot block table.

The KV cache and the routing capture (kv_cache.py) store tokens in a pool of `num_blocks` blocks of `block_size`
positions, shared by every slot. Slot s's position p lives in block `table_SM[s, p // block_size]` at offset
`p % block_size`. So memory is bounded by the tokens in use, not by slots x max_seq_len, and the samples of one
prompt (a GRPO group) point their table rows at the same prompt blocks: the prompt is prefilled once.

    table = BlockTable(num_slots=8, max_seq_len=256, block_size=16, num_blocks=65, device=device)
    table.assign(0, table.allocate(4))          # a 64-token prompt in slot 0
    table.assign(1, table.blocks(0)[:3] + table.allocate(1))   # a sample sharing its first 48 positions
    table.sync()                                # host edits -> the device table the forward (and CUDA graphs) read

Block 0 is the null block: never allocated. Table entries past a slot's blocks, and every entry of a free slot,
point at it, so the padding rows of a CUDA-graph batch write there, never into a live request's blocks; reads of it
are masked out by attention. Blocks are reference counted: a block shared by n samples returns to the free list
when the last of them releases it. Blocks written after the prefill (decode positions) are never shared: a sample
that shares a prompt whose length is not a multiple of the block size gets a private copy of the last, partial
block (`KVCache.copy_blocks`).

Host state (free list, refcounts, each slot's blocks) is plain Python; `sync()` copies the edited rows of the host
mirror into the device table once per step (a small host-to-device copy, no device sync).
"""

from __future__ import annotations

import torch

__all__ = ["NULL_BLOCK", "BlockTable", "blocks_for"]

NULL_BLOCK = 0


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` positions."""
    return -(-num_tokens // block_size)


class BlockTable:
    """Block allocator (host) and the slot -> blocks table (host mirror + device tensor `table_SM`)."""

    def __init__(self, *, num_slots: int, max_seq_len: int, block_size: int, num_blocks: int,
                 device: torch.device) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1: got {block_size}")
        self.block_size, self.num_blocks = block_size, num_blocks
        self.max_blocks = blocks_for(max_seq_len, block_size)  # table width: one request's longest context
        if num_blocks - 1 < self.max_blocks:
            raise ValueError(f"the KV cache must hold one request of max_seq_len={max_seq_len} tokens: got "
                             f"{num_blocks - 1} blocks of {block_size} (needs {self.max_blocks})")
        self.table_SM = torch.zeros(num_slots, self.max_blocks, dtype=torch.int64, device=device)
        self._host_SM = torch.zeros(num_slots, self.max_blocks, dtype=torch.int64)
        self._dirty: set[int] = set()
        self._slots: list[list[int]] = [[] for _ in range(num_slots)]
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))  # a stack: low blocks are handed out first

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks(self, slot: int) -> list[int]:
        """The blocks of `slot`, in position order (a copy)."""
        return list(self._slots[slot])

    def num_blocks_of(self, slot: int) -> int:
        return len(self._slots[slot])

    def allocate(self, n: int) -> list[int]:
        """n free blocks (not yet referenced by any slot). Raises MemoryError when fewer are free: callers check
        `num_free` first and preempt."""
        if n > len(self._free):
            raise MemoryError(f"KV cache out of blocks: {n} wanted, {len(self._free)} free of {self.num_blocks - 1}")
        return [self._free.pop() for _ in range(n)]

    def assign(self, slot: int, blocks: list[int]) -> None:
        """Give an empty slot these blocks (each one's reference count goes up: shared blocks are counted once per
        slot)."""
        if self._slots[slot]:
            raise RuntimeError(f"slot {slot} still holds blocks {self._slots[slot][:4]}...: release it first")
        self._slots[slot] = []
        self.append(slot, blocks)

    def append(self, slot: int, blocks: list[int]) -> None:
        """Blocks for the next positions of `slot`."""
        row = self._slots[slot]
        if len(row) + len(blocks) > self.max_blocks:
            raise RuntimeError(f"slot {slot} would hold {len(row) + len(blocks)} blocks, more than max_seq_len "
                               f"allows ({self.max_blocks})")
        for b in blocks:
            self._refs[b] += 1
        self._host_SM[slot, len(row) : len(row) + len(blocks)] = torch.tensor(blocks, dtype=torch.int64)
        row += blocks
        self._dirty.add(slot)

    def append_each(self, slots: list[int], blocks: list[int]) -> None:
        """One more block for each of `slots` (blocks[i] to slots[i]): a decode step's reservations in one write."""
        for slot in slots:  # every bound first: a refusal changes nothing
            if len(self._slots[slot]) >= self.max_blocks:
                raise RuntimeError(f"slot {slot} would hold {len(self._slots[slot]) + 1} blocks, more than "
                                   f"max_seq_len allows ({self.max_blocks})")
        for slot, b in zip(slots, blocks, strict=True):
            row = self._slots[slot]
            self._refs[b] += 1
            row.append(b)
        if slots:
            cols = [len(self._slots[s]) - 1 for s in slots]
            self._host_SM[slots, cols] = torch.tensor(blocks, dtype=torch.int64)
            self._dirty.update(slots)

    def release(self, slot: int) -> None:
        """Drop the slot's references; blocks no other slot holds become free. The row points at the null block."""
        for b in self._slots[slot]:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
        self._slots[slot] = []
        self._host_SM[slot] = NULL_BLOCK
        self._dirty.add(slot)

    def move(self, src: int, dst: int) -> None:
        """Slot src's blocks become slot dst's (dst must be empty); src is left empty. No KV is copied."""
        if self._slots[dst]:
            raise RuntimeError(f"slot {dst} still holds blocks: release it before moving slot {src} into it")
        self._slots[dst], self._slots[src] = self._slots[src], []
        self._host_SM[dst] = self._host_SM[src]
        self._host_SM[src] = NULL_BLOCK
        self._dirty.update((src, dst))

    def reset(self) -> None:
        """Every slot released (abort_all)."""
        for slot in range(len(self._slots)):
            self.release(slot)

    def sync(self) -> None:
        """Copy the rows edited since the last sync into the device table."""
        if self._dirty:
            rows = torch.tensor(sorted(self._dirty))
            # non_blocking: the source is a temporary the driver stages at once; a blocking copy would wait for the
            # decode step in flight (overlap schedule)
            dev = self.table_SM.device
            self.table_SM[rows.to(dev, non_blocking=True)] = self._host_SM[rows].to(dev, non_blocking=True)
            self._dirty.clear()

    def check(self) -> None:
        """Invariants (tests, `--ci-test`-style debugging): every block is free xor referenced, counts match."""
        counted = [0] * self.num_blocks
        for row in self._slots:
            for b in row:
                counted[b] += 1
        if counted != self._refs:
            raise AssertionError("block reference counts do not match the slots' blocks")
        free = set(self._free)
        if len(free) != len(self._free) or NULL_BLOCK in free:
            raise AssertionError("the free list holds a block twice, or the null block")
        used = {b for b, n in enumerate(counted) if n}
        if used & free or len(used) + len(free) != self.num_blocks - 1:
            raise AssertionError(f"blocks leaked or double-owned: {len(used)} used + {len(free)} free != "
                                 f"{self.num_blocks - 1}")
