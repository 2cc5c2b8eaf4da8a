"""Configuration of the rollout engine. Only cli.py knows argparse; it builds it (the server's is
`r3rl.rollout.net.config.ServerConfig`, which holds one).

    EngineConfig(max_slots=64, max_seq_len=1024)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r3rl.models.loading import resolve_dtype

__all__ = ["EngineConfig"]


@dataclass(kw_only=True)
class EngineConfig:
    """The rollout engine (`RolloutEngine(model, config)`)."""

    max_slots: int = 64
    """Requests decoded together (KV cache slots)."""
    max_seq_len: int = 1024
    """Context per slot: len(prompt) + max_new_tokens must fit."""
    use_cuda_graph: bool | None = None
    """Replay decode steps as CUDA graphs; None = on for CUDA devices."""
    capture_routing: bool = True
    """Record every token's experts; off holds a no-op capture (no trace is returned)."""
    batch_invariant: bool | None = None
    """Row-wise kernels, so a request's tokens do not depend on its batch (slow); None = on for CPU."""
    overlap_schedule: bool | None = None
    """Launch the next decode step before reading back the last one, so the host's scheduling runs while the device
    decodes (SGLang's overlap scheduler); a request that stops is then decoded once more, its extra token dropped,
    and a step's finished requests come back one `step()` later. Batch-invariant engines give the same tokens and
    traces either way; on GPU the batches differ (a stopped row stays one step longer, admissions wait one), and
    with them the kernels' rounding. None = on with CUDA graphs."""
    prefill_token_budget: int = 16384
    """Max padded tokens (requests x longest prompt) in one batched prefill."""
    kv_cache_tokens: int | None = None
    """KV cache (and routing capture) capacity in tokens, shared by all slots in blocks; None = max_slots x
    max_seq_len (every slot can reach max_seq_len at once). Smaller bounds memory by the tokens in use: when the
    blocks run out, the newest requests are preempted and recomputed later (same seeds, same tokens)."""
    block_size: int = 16
    """Tokens per KV block (the unit of paging and of prompt sharing between the samples of a group)."""
    fused_moe: bool = True
    """Run the experts through the fused Triton kernels on CUDA where they apply (SwiGLU and GPT-OSS experts);
    False = the grouped_mm path."""
    device: str | torch.device | None = None
    """Engine device; None = the model's device (a checkpoint path: cuda when available, else cpu)."""
    dtype: str | torch.dtype | None = None
    """Engine dtype name ('bfloat16', 'float32'); None = the model's (a checkpoint path: bfloat16 on cuda, else
    float32)."""

    def __post_init__(self) -> None:
        for name in ("max_slots", "max_seq_len", "prefill_token_budget", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1: got {getattr(self, name)}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.max_seq_len:
            raise ValueError(f"EngineConfig.kv_cache_tokens must hold one request of max_seq_len={self.max_seq_len} "
                             f"tokens: got {self.kv_cache_tokens}")
        if self.dtype is not None:
            resolve_dtype(self.dtype)  # raises naming the choices, before any model is loaded
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device must be a torch device such as 'cpu', 'cuda', 'cuda:1': got "
                                 f"{self.device!r} ({e})") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} needs CUDA, which this machine does not have")
