"""NCCL (or gloo) weight sync: SGLang's `/init_weights_update_group` + `/update_weights_from_distributed`.

Trainer side (rank 0 of a group of `world_size` = 1 trainer + the servers):

    pg = init_update_group("10.0.0.1", 29600, world_size=2, rank=0, backend="nccl")   # while the servers join
    await init_weights_update_group(client, master_address="10.0.0.1", master_port=29600, rank_offset=1,
                                    world_size=2, backend="nccl")     # posted concurrently with the line above
    await update_weights_from_distributed(client, model_tensors(model), weight_version="7")  # announce, then...
    broadcast_weights(model_tensors(model), pg)                                   # ...send in the announced order

The group is a standalone one (a TCPStore at master_address:master_port + ProcessGroupNCCL/Gloo), not the
default `torch.distributed` group, so it lives beside the trainer's torchrun group and the server needs no default
group. One update group per server (a second init is refused).

What a server accepts (it never trusts the caller to be its trainer):
- It only ever JOINS a group: rank 0 is the trainer, which hosts the store. `rank_offset` 0, `world_size` < 2 or a
  rank outside the world are refused, so a caller cannot make a server the root of its own group (which "received"
  uninitialised memory from itself). The server therefore never listens for the group's store; a gloo group's own
  sockets bind the server's `--host`.
- `backend` is 'nccl' (a CUDA engine only) or 'gloo', checked before any rendezvous.
- One rendezvous or receive at a time, in its own daemon thread (not the request thread pool), bounded by
  `timeout_s`: a second call meanwhile is refused with 409, a stuck one ends with 504 and cannot delay a stop.
- Names, shapes and dtypes (a floating-point weight takes a floating-point dtype; anything else its own) are
  checked against the model BEFORE anything is received, so a refused update is answered at once (the trainer
  must then not broadcast). The tensors are applied only after every announced one arrived; a receive that fails
  or times out applies nothing and drops the group (join again).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import logging
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from r3rl.rollout.engine.messages import ProtocolError

__all__ = ["InitWeightsUpdateGroupRequest", "UpdateWeightsFromDistributedRequest", "init_update_group",
           "broadcast_weights", "init_weights_update_group", "update_weights_from_distributed", "DistReceiver",
           "WeightBroadcaster"]

logger = logging.getLogger(__name__)
TIMEOUT = datetime.timedelta(seconds=600)  # the trainer side's
BACKENDS = ("nccl", "gloo")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class InitWeightsUpdateGroupRequest(BaseModel):
    """SGLang's fields (strict: JSON types only, unknown fields refused); `check` validates the values."""

    model_config = ConfigDict(extra="forbid", strict=True)

    master_address: str
    """Address of rank 0 (the trainer), which hosts the group's TCPStore."""
    master_port: int
    """Port of that store."""
    rank_offset: int
    """This server's rank in the group: >= 1 (rank 0 is the trainer)."""
    world_size: int
    """Trainer + servers: >= 2."""
    group_name: str = "weight_update_group"
    backend: str = "nccl"
    """'nccl' (a CUDA engine) or 'gloo'."""

    def check(self, *, device: torch.device) -> None:
        """Raise ProtocolError naming the field whose value a server must not accept (before any rendezvous)."""
        if not self.master_address or len(self.master_address) > 255:
            raise ProtocolError(f"master_address must be a host name or address: got {self.master_address!r:.80}",
                                "master_address")
        if not 1 <= self.master_port <= 65535:
            raise ProtocolError(f"master_port must be in [1, 65535]: got {self.master_port}", "master_port")
        if self.world_size < 2:
            raise ProtocolError(f"world_size must be >= 2 (the trainer, rank 0, and at least this server): got "
                                f"{self.world_size}", "world_size")
        if not 1 <= self.rank_offset < self.world_size:
            raise ProtocolError(f"rank_offset must be in [1, world_size - 1] = [1, {self.world_size - 1}]: rank 0 is "
                                f"the trainer, which hosts the group; a server only joins: got {self.rank_offset}",
                                "rank_offset")
        if self.backend not in BACKENDS:
            raise ProtocolError(f"backend must be one of {list(BACKENDS)}: got {self.backend!r:.80}", "backend")
        if self.backend == "nccl" and device.type != "cuda":
            raise ProtocolError(f"backend 'nccl' needs the engine on CUDA: this server's engine runs on {device} (use "
                                f"'gloo')", "backend")


class UpdateWeightsFromDistributedRequest(BaseModel):
    """SGLang's fields: one entry per tensor, in broadcast order."""

    model_config = ConfigDict(extra="forbid", strict=True)

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    """Accepted for SGLang compatibility; r3rl has no prefix cache to flush."""
    weight_version: str | None = None
    """New version: a decimal string of ASCII digits within int64; None = the current version + 1."""


def init_update_group(master_address: str, master_port: int, *, world_size: int, rank: int,
                      backend: str = "nccl", timeout: datetime.timedelta = TIMEOUT,
                      bind_host: str | None = None) -> dist.ProcessGroup:
    """A standalone process group (rank 0 hosts the TCPStore, on every interface: torch's store cannot be bound to
    one). Blocks until all `world_size` ranks joined, at most `timeout` (also each collective's). `bind_host`: the
    address a gloo group's own sockets bind (default: the machine's host name)."""
    if backend not in BACKENDS:  # before any rendezvous: an unknown backend would leave the peers waiting
        raise ValueError(f"backend must be 'nccl' or 'gloo': got {backend!r}")
    store = dist.TCPStore(master_address, master_port, world_size, rank == 0, timeout=timeout,
                          wait_for_workers=False)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host) if bind_host
                         else dist.ProcessGroupGloo.create_default_device()]
        return dist.ProcessGroupGloo(store, rank, world_size, opts)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, opts)


def _broadcast(pg: dist.ProcessGroup, t: torch.Tensor, timeout: datetime.timedelta | None = None) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    work = pg.broadcast([t], opts)
    if timeout is None:
        work.wait()
    elif not work.wait(timeout):
        raise TimeoutError(f"broadcast did not complete within {timeout.total_seconds():g}s")


def broadcast_weights(tensors: Mapping[str, torch.Tensor], group: dist.ProcessGroup, *,
                      device: torch.device | str | None = None) -> None:
    """Trainer rank 0: send every tensor in `tensors`' order (the order announced to the servers). `device`: where
    the group's backend needs them ("cuda" for NCCL)."""
    from r3rl.rollout.engine.weights import materialize

    for t in tensors.values():
        t = materialize(t).detach().contiguous()
        _broadcast(group, t.to(device) if device is not None else t)


def _dtype(name: str, where: str) -> torch.dtype:
    d = getattr(torch, name.removeprefix("torch."), None) if name.removeprefix("torch.").isidentifier() else None
    if not isinstance(d, torch.dtype):
        raise ProtocolError(f"{where} must name a torch dtype such as 'bfloat16': got {name!r:.80}", where)
    return d


class DistReceiver:
    """Server side: at most one update group, one rendezvous or receive at a time (used by server.py's routes).

    The blocking work runs in a daemon thread of its own: it never takes a thread of the request pool, and a stop
    need not wait for it (`abort` answers the waiting request at once)."""

    def __init__(self, *, device: torch.device, timeout_s: float, bind_host: str | None = None) -> None:
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.bind_host = bind_host if bind_host not in (None, "", "0.0.0.0", "::") else None
        self.group: dist.ProcessGroup | None = None
        self.group_name: str | None = None
        self._busy: str | None = None  # what the worker thread is doing (set and cleared on the event loop)
        self._waiting: set[asyncio.Future] = set()

    async def init_group(self, req: InitWeightsUpdateGroupRequest) -> None:
        """Join the trainer's group. Raises ProtocolError (400: bad field, 409: joined or busy, 504: the rendezvous
        failed or timed out)."""
        req.check(device=self.device)
        if self.group is not None:
            raise ProtocolError(f"this server already joined update group {self.group_name!r} (one update group "
                                f"per server)", "group_name", status=409)
        where = f"{req.master_address}:{req.master_port}"
        try:
            self.group = await self._run(f"rendezvous with {where}", init_update_group, req.master_address,
                                         req.master_port, world_size=req.world_size, rank=req.rank_offset,
                                         backend=req.backend, timeout=self.timeout, bind_host=self.bind_host)
        except ProtocolError:
            raise
        except Exception as e:
            raise ProtocolError(f"rendezvous with the trainer at {where} failed within "
                                f"{self.timeout.total_seconds():g}s (dist_timeout_s): {_one_line(e)}",
                                "master_address", status=504) from None
        self.group_name = req.group_name
        logger.info("joined weight update group %r as rank %d of %d (%s, trainer at %s)", req.group_name,
                    req.rank_offset, req.world_size, req.backend, where)

    def check(self, req: UpdateWeightsFromDistributedRequest, shapes: Mapping[str, Sequence[int]],
              dtypes: Mapping[str, torch.dtype]) -> list:
        """The receive plan [(name, dtype, shape)], or ProtocolError naming what does not match the model."""
        if self.group is None or req.group_name != self.group_name:
            raise ProtocolError(f"no update group {req.group_name!r} (call /init_weights_update_group first; "
                                f"joined: {self.group_name!r})", "group_name")
        if not (len(req.names) == len(req.dtypes) == len(req.shapes)):
            raise ProtocolError(f"names, dtypes and shapes must have one entry per tensor: got lengths "
                                f"{len(req.names)}, {len(req.dtypes)}, {len(req.shapes)}", "names")
        missing = sorted(set(shapes) - set(req.names))
        unexpected = sorted(set(req.names) - set(shapes))
        bad = [f"{n} (got {tuple(s)}, expected {tuple(shapes[n])})" for n, s in zip(req.names, req.shapes,
               strict=True) if n in shapes and tuple(s) != tuple(shapes[n])]
        if missing or unexpected or bad or len(set(req.names)) != len(req.names):
            raise ProtocolError(f"every weight of the model, once, with its shape: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}, shape mismatch {bad[:5]}, duplicates "
                                f"{len(req.names) - len(set(req.names))}", "names")
        plan = []
        for k, (n, d, s) in enumerate(zip(req.names, req.dtypes, req.shapes, strict=True)):
            dtype, want = _dtype(d, f"dtypes[{k}]"), dtypes[n]
            if dtype != want and not (want.is_floating_point and dtype in _FLOATS):
                allowed = [str(f).removeprefix("torch.") for f in _FLOATS] if want.is_floating_point else [str(want)]
                raise ProtocolError(f"dtypes[{k}] of {n} must be one of {allowed}: got {d!r:.40}", f"dtypes[{k}]")
            plan.append((n, dtype, tuple(s)))
        return plan

    async def receive(self, plan: list) -> dict[str, torch.Tensor]:
        """Every tensor of `plan`, broadcast by rank 0; raises ProtocolError (504) and drops the group if any did
        not arrive within the timeout (nothing received is returned, so nothing is applied)."""
        group, got = self.group, [0]

        def recv() -> dict[str, torch.Tensor]:
            out = {}
            for name, dtype, shape in plan:
                t = torch.empty(shape, dtype=dtype, device=self.device)
                _broadcast(group, t, self.timeout)
                out[name] = t
                got[0] += 1
            return out

        try:
            return await self._run(f"receive of {len(plan)} tensors", recv)
        except ProtocolError:
            raise
        except Exception as e:
            self.group, name = None, self.group_name
            self.group_name = None
            raise ProtocolError(f"received {got[0]} of {len(plan)} announced tensors, then: {_one_line(e)}; "
                                f"nothing was applied and update group {name!r} was dropped (join again)",
                                "names", status=504) from None

    def abort(self, reason: str) -> None:
        """Answer every waiting request now (a stopping server): its thread may go on, but nobody waits for it."""
        for fut in list(self._waiting):
            if not fut.done():
                fut.set_exception(ProtocolError(f"server is stopping: {reason}", "body", status=503))

    async def _run(self, what: str, fn, *args, **kwargs):
        if self._busy is not None:
            raise ProtocolError(f"{what} refused: a {self._busy} is in progress (one at a time)", "group_name",
                                status=409)
        self._busy = what
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def done(result=None, error: BaseException | None = None) -> None:
            self._busy = None
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(result)

        def body() -> None:
            try:
                result, error = fn(*args, **kwargs), None
            except BaseException as e:  # handed to the waiting request
                result, error = None, e
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped meanwhile
                loop.call_soon_threadsafe(done, result, error)

        threading.Thread(target=body, name="r3rl-weight-sync", daemon=True).start()
        self._waiting.add(fut)
        try:
            return await fut
        finally:
            self._waiting.discard(fut)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


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
