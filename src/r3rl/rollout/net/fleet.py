"""FleetBackend: one RolloutBackend over several `r3rl serve` / SGLang servers (disaggregated rollout).

    backend = make_backend(["http://h1:30000", "http://h2:30000"], weights_dir="/shared/w",
                           logprobs_at_temperature=False)        # HTTPBackend for one URL, FleetBackend for several

Load spreading: each GRPO group (the n samples of one prompt, one batch request) goes to the live server with the
fewest samples in flight. A group stays on one server, so that server's engine prefills its prompt once and the
samples share the prompt's KV blocks.

Exactly once: every sample is tracked by its index in the plan (and its rid). A group whose server fails (a
transport error or a 5xx: it may or may not have run there) is taken back and re-sent to another live server with
the SAME SamplingParams, seeds included; the failed server is taken out of rotation with a warning. A result is
stored only once per index, so every sample returns exactly once, none lost or duplicated, and a re-sent sample is
the one the dead server would have produced (bitwise on CPU with the batch-invariant engine). If no live server is
left, `generate` raises.

Weights: `update_weights` saves one checkpoint (disk path) and has each live server load it and report the version;
a server that fails the sync is dropped from rotation with a warning (never silently). All servers failing raises.
Under torchrun rank 0 alone syncs (`parallel.RankZeroWeightSync`); `share_live` then gives every rank rank 0's live
set, so a server rank 0 dropped (it holds stale weights) is dropped on every rank.
"""

from __future__ import annotations

import itertools
import logging
import random
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from torch import nn

from r3rl.rollout.engine.messages import SamplingParams
from r3rl.rollout.engine.weights import model_tensors
from r3rl.rollout.net.backend import HTTPBackend, RolloutBackend, WeightSyncError, plan_with_rids
from r3rl.rollout.net.client import ModelShape, RolloutRequestError
from r3rl.rollout.net.protocol import MAX_BATCH
from r3rl.sample import Sample

__all__ = ["FleetBackend", "FleetError", "make_backend"]

logger = logging.getLogger(__name__)


class FleetError(RuntimeError):
    """No live rollout server is left."""


class FleetBackend:
    """Several HTTPBackends behind one RolloutBackend; see the module docstring for load and failure semantics."""

    def __init__(self, urls: Sequence[str], *, weights_dir: str | Path | None = None,
                 logprobs_at_temperature: bool = False, timeout_s: float = 600.0, max_retries: int = 1,
                 max_workers: int = 32, broadcaster=None, model_shape: ModelShape | None = None,
                 engine: str = "auto") -> None:
        """`model_shape`: the local policy's (`ModelShape.of_model`), for SGLang and vLLM servers (see
        `RolloutClient`). `engine`: what the servers are (auto: each is asked; `vllm_client.ENGINES`)."""
        if len(urls) < 1:
            raise ValueError("FleetBackend needs at least one server URL")
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self.logprobs_at_temperature = logprobs_at_temperature
        self.broadcaster = broadcaster  # a dist_sync.WeightBroadcaster: NCCL/gloo broadcast to every server
        self.servers = [HTTPBackend(u, weights_dir=weights_dir, timeout_s=timeout_s, max_retries=max_retries,
                                    logprobs_at_temperature=logprobs_at_temperature, model_shape=model_shape,
                                    engine=engine)
                        for u in urls]
        self.live = [True] * len(self.servers)
        self.in_flight = [0] * len(self.servers)  # samples in flight per server
        self.served = [0] * len(self.servers)  # samples completed per server (load-spread evidence)
        self._lock = threading.Lock()
        self._rng = random.Random()
        self._calls = itertools.count()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="r3rl-fleet")
        self._version = max(s.weight_version for s in self.servers)

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def live_urls(self) -> list[str]:
        return [s.url for s, ok in zip(self.servers, self.live, strict=True) if ok]

    def _pick(self, exclude: set[int], n: int) -> int:
        with self._lock:
            choices = [k for k in range(len(self.servers)) if self.live[k] and k not in exclude]
            if not choices:
                choices = [k for k in range(len(self.servers)) if self.live[k]]
            if not choices:
                raise FleetError("no live rollout server left: " + ", ".join(s.url for s in self.servers))
            k = min(choices, key=lambda c: self.in_flight[c])
            self.in_flight[k] += n
            return k

    def _drop(self, k: int, why: str) -> None:
        with self._lock:
            if self.live[k]:
                self.live[k] = False
                logger.warning("rollout server %s taken out of rotation: %s", self.servers[k].url, why)

    def _group(self, prompt: Sequence[int], sps: list[SamplingParams], rids: list[str]) -> list[Sample]:
        """The samples of one prompt, as one batch request to one server (re-sent whole, same seeds, on failure)."""
        tried: set[int] = set()
        while True:
            k = self._pick(tried, len(sps))
            srv = self.servers[k]
            try:
                samples = srv._run(srv.client.generate([prompt] * len(sps), sps, rids=rids))
            except Exception as e:  # noqa: BLE001 - any failure of that server: re-send elsewhere, same seeds
                if isinstance(e, RolloutRequestError):
                    raise  # the caller's bug (4xx): the same on every server
                self._drop(k, f"requests {rids[0]}..{rids[-1]} failed ({type(e).__name__}: {e}); re-sending them "
                              "with the same seed")
                tried.add(k)
                continue
            finally:
                with self._lock:
                    self.in_flight[k] -= len(sps)
            with self._lock:
                self.served[k] += len(sps)
            for sample in samples:
                sample.metadata["server"] = srv.url
            return samples

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
                 n_samples_per_prompt: int = 1) -> list[Sample]:
        plan, rids = plan_with_rids(self, len(prompts), sampling, n_samples_per_prompt, prefix="f")
        # plan indices of each group (a prompt's samples are adjacent in the plan), split at the server's batch limit
        groups: list[list[int]] = []
        for k, (i, _, _) in enumerate(plan):
            if groups and plan[groups[-1][0]][0] == i and len(groups[-1]) < MAX_BATCH:
                groups[-1].append(k)
            else:
                groups.append([k])
        futures = [self._pool.submit(self._group, prompts[plan[g[0]][0]], [plan[k][2] for k in g],
                                     [rids[k] for k in g]) for g in groups]
        results: dict[int, Sample] = {}
        for g, f in zip(groups, futures, strict=True):
            for k, s in zip(g, f.result(), strict=True):
                if k in results:
                    raise AssertionError(f"sample {k} returned twice")
                results[k] = s
        samples = [results[k] for k in range(len(plan))]
        for (i, j, _), s in zip(plan, samples, strict=True):
            s.metadata.update(prompt_index=i, sample_index=j)
        return samples

    def update_weights(self, model: nn.Module, *, version: int) -> None:
        if self.broadcaster is not None:  # one broadcast reaches every server of the group
            self.broadcaster.push(self.servers, model_tensors(model), version)
            for srv in self.servers:
                srv._confirm(version, "distributed")
            self._version = version
            return
        if self.weights_dir is None:
            raise WeightSyncError("FleetBackend.update_weights needs weights_dir (shared by every server)")
        target = self.weights_dir / f"v{version}"
        tmp = self.weights_dir / f".v{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)  # saved once; every server loads it
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        ok = 0
        for k, srv in enumerate(self.servers):
            if not self.live[k]:
                continue
            try:
                srv._run(srv.client.update_weights_from_disk(str(target.resolve()), weight_version=str(version)))
                reported = srv._run(srv.client.get_model_info()).get("weight_version")
                if reported is not None and str(reported) != str(version):
                    raise WeightSyncError(f"reports weight_version={reported!r}, expected {version}")
                if hasattr(srv.client, "check_served_weights"):  # vLLM: prove what it loaded
                    srv._run(srv.client.check_served_weights(model))
                srv._version = version
                ok += 1
            except Exception as e:  # noqa: BLE001
                self._drop(k, f"weight sync to version {version} failed ({type(e).__name__}: {e})")
        if ok == 0:
            raise WeightSyncError(f"weight sync to version {version} failed on every server")
        self._version = version
        logger.info("rollout weights synced by disk: %s -> %d servers, weight_version=%d", target, ok, version)

    def adopt_version(self, version: int) -> None:
        """Another process (torchrun rank 0) synced the servers to `version` (the trainer checks every sample's)."""
        for srv in self.servers:
            srv._version = version
        self._version = version

    def share_live(self, *, src: int = 0) -> None:
        """torchrun, after rank `src` synced the weights: every rank keeps only the servers `src` keeps (a collective:
        every rank calls it). A server dropped here missed the sync; one this rank dropped itself stays dropped."""
        import torch.distributed as dist

        shared = [list(self.live)]
        dist.broadcast_object_list(shared, src=src)
        for k, ok in enumerate(shared[0]):
            if not ok:
                self._drop(k, f"rank {src} took it out of rotation (its weight sync failed there)")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for srv in self.servers:
            try:
                srv.close()
            except Exception:  # noqa: BLE001 - a dead server's connections
                logger.debug("closing %s failed", srv.url, exc_info=True)


def make_backend(urls: Sequence[str], *, weights_dir: str | Path | None, logprobs_at_temperature: bool = False,
                 weight_sync: str = "disk", sync_address: str = "127.0.0.1",
                 model_shape: ModelShape | None = None, engine: str = "auto") -> RolloutBackend:
    """HTTPBackend for one URL, FleetBackend for several: the one call the trainer makes for `--rollout-url`.
    `weight_sync`: "disk" (`/update_weights_from_disk`), or "nccl" / "gloo" (`/init_weights_update_group` +
    `/update_weights_from_distributed`, the servers joining a group at `sync_address`). `model_shape`: the local
    policy's (`ModelShape.of_model(model)`): a SGLang or vLLM server reports none, `r3rl serve` is checked against it.
    `engine`: auto (ask each server), r3rl, sglang or vllm."""
    urls = list(urls)
    if not urls:
        raise ValueError("make_backend needs at least one --rollout-url")
    if weight_sync not in ("disk", "nccl", "gloo"):
        raise ValueError(f"weight_sync must be disk, nccl or gloo: got {weight_sync!r}")
    broadcaster = None
    if weight_sync != "disk" and engine == "vllm":
        raise ValueError(f"weight_sync={weight_sync!r} is not supported for vLLM servers here: use disk (vLLM's "
                         "reload_weights); its NCCL path (/init_weight_transfer_engine) is not wired")
    if weight_sync != "disk":
        from r3rl.rollout.net.dist_sync import WeightBroadcaster

        broadcaster = WeightBroadcaster(master_address=sync_address, backend=weight_sync)
    if len(urls) == 1:
        return HTTPBackend(urls[0], weights_dir=weights_dir, logprobs_at_temperature=logprobs_at_temperature,
                           broadcaster=broadcaster, model_shape=model_shape, engine=engine)
    return FleetBackend(urls, weights_dir=weights_dir, logprobs_at_temperature=logprobs_at_temperature,
                        broadcaster=broadcaster, model_shape=model_shape, engine=engine)
