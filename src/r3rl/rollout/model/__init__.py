"""Rollout model: the paged forward of every supported MoE family, its attention and MoE blocks, the Triton kernels
(fused MoE, router, paged attention, sampling) and the memory they read and write (KV pages, routing capture).

May import: torch, triton, `r3rl.models`, `r3rl.trace`. Never `r3rl.rollout.engine` or `r3rl.rollout.net`."""
