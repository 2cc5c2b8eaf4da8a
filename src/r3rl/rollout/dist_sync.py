"""NCCL (or gloo) weight sync: SGLang's `/init_weights_update_group` + `/update_weights_from_distributed`.

Trainer side (rank 0 of a group of `world_size` = 1 trainer + the servers):

    pg = init_update_group("10.0.0.1", 29600, world_size=2, rank=0, backend="nccl")   # while the servers join
    await init_weights_update_group(client, master_address="10.0.0.1", master_port=29600, rank_offset=1,
                                    world_size=2, backend="nccl")     # posted concurrently with the line above
    await update_weights_from_distributed(client, model_tensors(model), weight_version="7")  # announce, then...
    broadcast_weights(model_tensors(model), pg)                                   # ...send in the announced order

The group is a standalone one (a TCPStore at master_address:master_port + ProcessGroupNCCL/Gloo), not the
default `torch.distributed` group, so it lives beside the trainer's torchrun group and the server needs no default
group. One update group per server (a second init is refused). The server receives every announced tensor by
broadcast from rank 0 (strict on names, shapes, dtypes: checked BEFORE receiving, so a refused update is answered
at once; the trainer must then not broadcast), then applies them between engine steps like update_weights_from_disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import logging
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from pydantic import BaseModel

__all__ = ["InitWeightsUpdateGroupRequest", "UpdateWeightsFromDistributedRequest", "init_update_group",
           "broadcast_weights", "init_weights_update_group", "update_weights_from_distributed", "DistReceiver",
           "WeightBroadcaster"]

logger = logging.getLogger(__name__)
TIMEOUT = datetime.timedelta(seconds=600)


class InitWeightsUpdateGroupRequest(BaseModel):
    """SGLang's fields."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class UpdateWeightsFromDistributedRequest(BaseModel):
    """SGLang's fields: one entry per tensor, in broadcast order."""

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    weight_version: str | None = None


def init_update_group(master_address: str, master_port: int, *, world_size: int, rank: int,
                      backend: str = "nccl") -> dist.ProcessGroup:
    """A standalone process group (rank 0 hosts the TCPStore). Blocks until all `world_size` ranks joined."""
    store = dist.TCPStore(master_address, master_port, world_size, rank == 0, timeout=TIMEOUT,
                          wait_for_workers=False)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, TIMEOUT)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    raise ValueError(f"backend must be 'nccl' or 'gloo': got {backend!r}")


def _broadcast(pg: dist.ProcessGroup, t: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    pg.broadcast([t], opts).wait()


def broadcast_weights(tensors: Mapping[str, torch.Tensor], group: dist.ProcessGroup, *,
                      device: torch.device | str | None = None) -> None:
    """Trainer rank 0: send every tensor in `tensors`' order (the order announced to the servers). `device`: where
    the group's backend needs them ("cuda" for NCCL)."""
    from r3rl.rollout.weights import materialize

    for t in tensors.values():
        t = materialize(t).detach().contiguous()
        _broadcast(group, t.to(device) if device is not None else t)


def _dtype(name: str, where: str) -> torch.dtype:
    d = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"{where}: unknown dtype {name!r}")
    return d


class DistReceiver:
    """Server side: at most one update group; receives announced tensors (used by server.py's routes)."""

    def __init__(self, *, device: torch.device) -> None:
        self.device = device
        self.group: dist.ProcessGroup | None = None
        self.group_name: str | None = None

    async def init_group(self, req: InitWeightsUpdateGroupRequest) -> None:
        if self.group is not None:
            raise ValueError(f"group_name: this server already joined update group {self.group_name!r} "
                             f"(one update group per server)")
        self.group = await asyncio.to_thread(init_update_group, req.master_address, req.master_port,
                                             world_size=req.world_size, rank=req.rank_offset, backend=req.backend)
        self.group_name = req.group_name
        logger.info("joined weight update group %r as rank %d of %d (%s)", req.group_name, req.rank_offset,
                    req.world_size, req.backend)

    def check(self, req: UpdateWeightsFromDistributedRequest, shapes: Mapping[str, Sequence[int]]) -> list:
        if self.group is None or req.group_name != self.group_name:
            raise ValueError(f"group_name: no update group {req.group_name!r} (call /init_weights_update_group "
                             f"first; joined: {self.group_name!r})")
        if not (len(req.names) == len(req.dtypes) == len(req.shapes)):
            raise ValueError(f"names/dtypes/shapes: lengths differ ({len(req.names)}, {len(req.dtypes)}, "
                             f"{len(req.shapes)})")
        missing = sorted(set(shapes) - set(req.names))
        unexpected = sorted(set(req.names) - set(shapes))
        bad = [f"{n} (got {tuple(s)}, expected {tuple(shapes[n])})" for n, s in zip(req.names, req.shapes,
               strict=True) if n in shapes and tuple(s) != tuple(shapes[n])]
        if missing or unexpected or bad or len(set(req.names)) != len(req.names):
            raise ValueError(f"names: missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {bad[:5]}, "
                             f"duplicates {len(req.names) - len(set(req.names))}")
        return [(n, _dtype(d, f"dtypes[{k}]"), tuple(s))
                for k, (n, d, s) in enumerate(zip(req.names, req.dtypes, req.shapes, strict=True))]

    async def receive(self, plan: list) -> dict[str, torch.Tensor]:
        group = self.group

        def recv() -> dict[str, torch.Tensor]:
            out = {}
            for name, dtype, shape in plan:
                t = torch.empty(shape, dtype=dtype, device=self.device)
                _broadcast(group, t)
                out[name] = t
            return out

        return await asyncio.to_thread(recv)


async def init_weights_update_group(client, *, master_address: str, master_port: int, rank_offset: int,
                                    world_size: int, group_name: str = "weight_update_group",
                                    backend: str = "nccl") -> dict[str, Any]:
    """Client: POST /init_weights_update_group (returns when the server joined: post it while rank 0 joins)."""
    return await client._request("POST", "/init_weights_update_group", dict(
        master_address=master_address, master_port=master_port, rank_offset=rank_offset, world_size=world_size,
        group_name=group_name, backend=backend), idempotent=False)


async def update_weights_from_distributed(client, tensors: Mapping[str, torch.Tensor], *,
                                          weight_version: str | None = None, group_name: str = "weight_update_group",
                                          flush_cache: bool = True) -> dict[str, Any]:
    """Client: announce `tensors` (names, dtypes, shapes in order); run `broadcast_weights` concurrently."""
    return await client._request("POST", "/update_weights_from_distributed", dict(
        names=list(tensors), dtypes=[str(t.dtype).removeprefix("torch.") for t in tensors.values()],
        shapes=[list(t.shape) for t in tensors.values()], group_name=group_name, flush_cache=flush_cache,
        weight_version=weight_version), idempotent=False)


class WeightBroadcaster:
    """Trainer side of the NCCL path for one or more servers (`HTTPBackend`s): one update group in which the trainer
    is rank 0 and server k is rank k + 1, joined at the first push; then per update an announce to every server and
    one broadcast that all of them receive.

    A server validates an announce (names, dtypes, shapes) before it receives anything and answers a refusal at
    once: the broadcaster waits `refusal_window_s` for such an answer before it broadcasts, so a refused update raises
    instead of leaving the trainer blocked in a broadcast nobody receives. The group cannot shrink: if a member
    server dies, later pushes fail (use the disk path with a fleet that loses servers)."""

    def __init__(self, *, master_address: str = "127.0.0.1", master_port: int | None = None, backend: str = "nccl",
                 device: torch.device | str | None = None, refusal_window_s: float = 0.5) -> None:
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"weight sync backend must be 'nccl' or 'gloo': got {backend!r}")
        self.master_address, self.master_port, self.backend = master_address, master_port, backend
        self.device = device if device is not None else ("cuda" if backend == "nccl" else None)
        self.refusal_window_s = refusal_window_s
        self.group: dist.ProcessGroup | None = None
        self.members: list[str] = []

    def push(self, servers: Sequence, tensors: Mapping[str, torch.Tensor], version: int) -> list[dict[str, Any]]:
        """Send `tensors` to every server of `servers` (HTTPBackends); returns their answers."""
        if self.group is None:
            self._join(servers)
        elif [s.url for s in servers] != self.members:
            raise RuntimeError(f"the weight update group was formed with {self.members}, now asked to push to "
                               f"{[s.url for s in servers]}: a group cannot change its members")
        futures = [asyncio.run_coroutine_threadsafe(
            update_weights_from_distributed(s.client, tensors, weight_version=str(version)), s._loop) for s in servers]
        done, _ = concurrent.futures.wait(futures, timeout=self.refusal_window_s)
        for f in done:
            f.result()  # a refusal raises here (RolloutRequestError naming the tensor), before anything is sent
        if done:
            raise RuntimeError("a server answered the announce before receiving any tensor")
        broadcast_weights(tensors, self.group, device=self.device)
        return [f.result(TIMEOUT.total_seconds()) for f in futures]

    def _join(self, servers: Sequence) -> None:
        port = self.master_port or _free_port()
        world = len(servers) + 1
        futures = [asyncio.run_coroutine_threadsafe(init_weights_update_group(
            s.client, master_address=self.master_address, master_port=port, rank_offset=k + 1, world_size=world,
            backend=self.backend), s._loop) for k, s in enumerate(servers)]
        self.group = init_update_group(self.master_address, port, world_size=world, rank=0, backend=self.backend)
        for f in futures:
            f.result(TIMEOUT.total_seconds())
        self.members = [s.url for s in servers]
        logger.info("weight update group formed: trainer + %d server(s) over %s at %s:%d", len(servers),
                    self.backend, self.master_address, port)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
