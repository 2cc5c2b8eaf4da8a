"""Rollout engine: `RolloutEngine` (admission and scheduling, step execution, request bookkeeping), its messages
(`SamplingParams`, `EngineRequest`, `EngineOutput`), config, sampling, CUDA graphs and weight loading.

May import: `r3rl.rollout.model` and the layers below `r3rl.rollout` (`r3rl.models`, `r3rl.trace`, `r3rl.sample`).
Never `r3rl.rollout.net`."""
