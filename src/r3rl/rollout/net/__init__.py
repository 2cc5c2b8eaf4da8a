"""Rollout network: `r3rl serve` (server, engine worker, wire format), the HTTP client, the rollout backends
(in-process engine, one server, a fleet) and the weight sync by disk or NCCL.

May import: `r3rl.rollout.engine`, `r3rl.rollout.model` and the layers below `r3rl.rollout`."""
