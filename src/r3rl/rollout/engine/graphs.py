"""CUDA graphs of the rollout engine's decode step: one per (batch bucket, KV-length bucket, sampling mode, padded or
not), captured on first use (or all at once by `RolloutEngine.warmup`) and replayed after.

    graphs = DecodeGraphs(max_slots=64, device=torch.device("cuda"))
    graphs.get((graphs.bucket(n), T, mode, masked), run=lambda: decode_rows(...)).replay()

`run` must be idempotent for a given device state (it writes K/V, routing and outputs, never advances positions):
it runs once eagerly as a warm-up (cuBLAS, allocator) before the capture. All graphs share one memory pool, since
they never run concurrently. A batch is padded up to its bucket (1, 2, 4, 8, then 1.5x/2x steps); rows past the live
count are masked out of the experts by the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import torch

from r3rl.rollout.model.forward import MoEKernel

__all__ = ["DecodeGraphs", "batch_buckets", "graph_safe", "next_power_of_two"]

logger = logging.getLogger(__name__)


class DecodeGraphs:
    """The captured decode graphs of one engine."""

    def __init__(self, max_slots: int, device: torch.device) -> None:
        self.device = device
        self.buckets = batch_buckets(max_slots)
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def bucket(self, n: int) -> int:
        """The smallest graph batch size that holds n rows."""
        return next(b for b in self.buckets if b >= n)

    def get(self, key: Hashable, run: Callable[[], None]) -> torch.cuda.CUDAGraph:
        if key not in self._graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()  # shared: graphs never run concurrently
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                run()  # warm-up (cuBLAS, allocator), harmless: idempotent
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                run()
            self._graphs[key] = graph
            logger.info("captured decode CUDA graph %s (%d graphs)", key, len(self._graphs))
        return self._graphs[key]


def batch_buckets(max_slots: int) -> list[int]:
    """CUDA-graph batch sizes: 1, 2, 4, 8, then steps of 1.5x/2x (16, 24, 32, 48, ...), and max_slots itself."""
    buckets, b = [], 1
    while b < max_slots:
        buckets.append(b)
        b = b * 2 if b < 16 else (b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3)
    return [*buckets, max_slots]


def graph_safe(kernel: MoEKernel, device: torch.device, dtype: torch.dtype) -> bool:
    """torch's grouped_mm takes a host-syncing fallback below sm90 or outside bfloat16; the loop always syncs."""
    if kernel is MoEKernel.GATHER:
        return True
    if kernel is MoEKernel.FUSED:  # no host sync (tested under CUDA graphs)
        return device.type == "cuda"
    sm90 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
    return kernel is MoEKernel.GROUPED_MM and dtype == torch.bfloat16 and sm90


def next_power_of_two(n: int, *, minimum: int, maximum: int) -> int:
    p = minimum
    while p < n:
        p *= 2
    return min(p, maximum)
