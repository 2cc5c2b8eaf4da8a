"""Data-parallel training under torchrun: the process group, the device mesh, FSDP2 sharding, and rank arithmetic.

    torchrun --nproc-per-node 2 -m r3rl train --use-rollout-routing-replay --enable-r3-correctness-check

`DistEnv.from_environ` reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK); outside torchrun the run is a
single process and nothing here changes it. Under torchrun every rank:
  - joins one process group (NCCL on CUDA, gloo on CPU) and a 1-D device mesh named "dp";
  - shards the policy with FSDP2 (`fully_shard` per decoder layer, then the root) under a `MixedPrecisionPolicy`
    (params in `--dtype`, gradients reduced in float32; master weights float32), with torch's `checkpoint_wrapper`
    around each decoder layer (the torchtitan layout) and `RoutingReplay.checkpoint_context_fn` as its context_fn,
    so the recompute FSDP2 runs in backward replays the forward's batch;
  - takes its share of the step's prompts (whole GRPO groups, so advantages need no communication), rolls them out
    on its own colocated engine, and trains on its samples with their traces.

FSDP2 averages gradients over ranks; the step scales each rank's loss by the world size and normalizes by global
token / sample counts, so one optimizer step equals the single-process step on the same global batch.
Every FSDP forward is a collective: ranks must run the same number of micro-batches (`pad_micro_batches`).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DistEnv", "parallelize", "decoder_layers", "mean_over_ranks", "sum_over_ranks", "prompt_shard",
           "pad_count", "RankZeroWeightSync"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits. `mesh` is None in a single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @classmethod
    def from_environ(cls, device: str) -> DistEnv:
        """Join torchrun's process group when its variables are set; else a single process. Returns the env and, on
        CUDA, selects `cuda:LOCAL_RANK`."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls()
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        device_type = torch.device(device).type
        if device_type == "cuda":
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            timeout = datetime.timedelta(minutes=int(os.environ.get("R3RL_DIST_TIMEOUT_MIN", 30)))
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
        mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
        logger.info("rank %d/%d (local %d) joined the %s process group on %s", rank, world, local,
                    dist.get_backend(), device_type)
        return cls(rank=rank, world_size=world, local_rank=local, mesh=mesh)

    def device(self, device: str) -> str:
        """`cuda` becomes this rank's `cuda:LOCAL_RANK`; other devices are unchanged."""
        return f"cuda:{self.local_rank}" if self.distributed and device == "cuda" else device

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (`model.model.layers`), named in the error when absent."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"FSDP2 sharding wraps each decoder layer: {type(model).__name__} has no `model.layers` "
                        "ModuleList")
    return layers


def parallelize(model: nn.Module, env: DistEnv, *, param_dtype: torch.dtype, checkpoint_context_fn=None,
                trainable: bool = True) -> nn.Module:
    """Shard `model` in place with FSDP2 over `env.mesh`: each decoder layer (wrapped for activation checkpointing
    when `checkpoint_context_fn` is given) is one FSDP unit, the root holds the embeddings, final norm and LM head.
    Mixed precision: compute in `param_dtype`, reduce gradients in float32."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not env.distributed:
        raise ValueError("parallelize() needs a distributed DistEnv (run under torchrun)")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if checkpoint_context_fn is not None:
            # non-reentrant torch.utils.checkpoint (the only kind replay supports), recompute under the replay state
            # of its own forward
            layer = checkpoint_wrapper(layer, context_fn=checkpoint_context_fn, preserve_rng_state=False)
            layers[i] = layer
        # the last layer's backward comes right after its forward: keep its params gathered (torchtitan does too)
        fully_shard(layer, mesh=env.mesh, mp_policy=mp, reshard_after_forward=not trainable or i < len(layers) - 1)
    fully_shard(model, mesh=env.mesh, mp_policy=mp, reshard_after_forward=False)
    if not trainable:
        model.requires_grad_(False)
    return model


def prompt_shard(num_prompts: int, prompts_per_optimizer_step: int, env: DistEnv) -> list[int]:
    """This rank's prompts (whole GRPO groups): its share of each optimizer step's prompts, so that optimizer step c
    of every rank together trains on exactly the samples of the single-process optimizer step c."""
    if not env.distributed:
        return list(range(num_prompts))
    if prompts_per_optimizer_step % env.world_size:
        raise ValueError(f"each optimizer step's prompts ({prompts_per_optimizer_step} = global_batch_size / "
                         f"n_samples_per_prompt) must be divisible by the number of ranks ({env.world_size}), so that "
                         "every rank trains on whole groups and the same number of samples")
    share = prompts_per_optimizer_step // env.world_size
    return [chunk + env.rank * share + i for chunk in range(0, num_prompts, prompts_per_optimizer_step)
            for i in range(share)]


def pad_count(n: int, env: DistEnv) -> int:
    """The largest `n` over ranks (micro-batch counts must agree: each FSDP forward is a collective)."""
    if not env.distributed:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def sum_over_ranks(values: list[float], env: DistEnv) -> list[float]:
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def mean_over_ranks(metrics: dict, env: DistEnv) -> dict:
    """Average every float (and list of floats) over ranks; every rank holds the same keys. Per-sample and per-token
    means are averaged per rank, which equals the global mean because every rank has the same number of samples."""
    if not env.distributed:
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, float) or
                  (isinstance(v, list) and v and all(isinstance(x, float) for x in v)))
    flat = [x for k in keys for x in (metrics[k] if isinstance(metrics[k], list) else [metrics[k]])]
    summed = sum_over_ranks(flat, env)
    out, i = dict(metrics), 0
    for k in keys:
        n = len(metrics[k]) if isinstance(metrics[k], list) else 1
        vals = [x / env.world_size for x in summed[i : i + n]]
        out[k] = vals if isinstance(metrics[k], list) else vals[0]
        i += n
    return out


class RankZeroWeightSync:
    """`--rollout-url` under torchrun: every rank generates its share through the servers; a weight sync gathers
    the full state dict (a collective, one tensor at a time, onto rank 0's CPU), rank 0 alone writes it and calls
    the servers' `/update_weights_from_disk`, and the other ranks adopt the version after a barrier."""

    def __init__(self, backend, env: DistEnv) -> None:
        self.backend, self.env = backend, env

    @property
    def weight_version(self) -> int:
        return self.backend.weight_version

    def generate(self, *args, **kwargs):
        return self.backend.generate(*args, **kwargs)

    def update_weights(self, model: nn.Module, *, version: int) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.env.is_main:
            self.backend.update_weights(_Exported(model, full), version=version)
        self.env.barrier()
        if hasattr(self.backend, "share_live"):  # a fleet: the servers rank 0 dropped are dropped on every rank
            self.backend.share_live(src=0)
        if not self.env.is_main:
            self.backend.adopt_version(version)

    def close(self) -> None:
        self.backend.close()


class _Exported:
    """A sharded model seen through its gathered state dict: what the HTTP backends call (`save_pretrained` for the
    disk path, `state_dict` for the broadcast path)."""

    def __init__(self, model: nn.Module, state_dict: dict) -> None:
        self.model, self._state_dict = model, state_dict

    def state_dict(self) -> dict:
        return self._state_dict

    def save_pretrained(self, path, **kwargs) -> None:
        self.model.save_pretrained(path, state_dict=self._state_dict, **kwargs)


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
