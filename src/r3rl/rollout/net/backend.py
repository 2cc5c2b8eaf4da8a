"""RolloutBackend: the one rollout interface the trainer and `r3rl check` see, with its two implementations.

    backend = EngineBackend(model, max_slots=64, max_seq_len=512)          # in-process engine (a copy of the weights)
    backend = HTTPBackend("http://127.0.0.1:30000", weights_dir="/shared/weights")   # `r3rl serve` or SGLang
    samples = backend.generate(prompts, SamplingParams(max_new_tokens=64, seed=step), n_samples_per_prompt=8)
    backend.update_weights(model, version=step + 1)      # every later generate uses these weights, reports the version

Samples come back prompt-major (prompt 0's n samples, then prompt 1's ...), each with its routing trace (always
requested) validated against the model's shape, and `metadata` {"prompt_index", "sample_index", "rid"}.

Group seeds: the samples of one prompt must differ (one shared seed would collapse a GRPO group), so each gets its
own seed. With `sampling.seed` set, sample j of prompt i gets `group_seed(seed, i, j)` (splitmix64 folds; the same
base seed gives bitwise the same samples again on CPU); with `seed=None`, fresh random distinct seeds.

Log-probs (`logprobs_at_temperature`, a backend option): False returns the raw policy log-probs (temperature 1),
True those of the distribution sampled, log_softmax(logits / T) before top-k/top-p. `Sample.logprob_temperature`
records which; the trainer computes its own log-probs at that temperature. See docs/protocol.md, "Log-probs".
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import shutil
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from r3rl.rollout.engine.config import EngineConfig
from r3rl.rollout.engine.engine import RolloutEngine
from r3rl.rollout.engine.messages import EngineOutput, EngineRequest, SamplingParams
from r3rl.rollout.engine.sampling import group_seed
from r3rl.rollout.engine.weights import model_tensors
from r3rl.rollout.net.client import ModelShape, RolloutClient, weight_version_int
from r3rl.rollout.net.decode import WeightSyncError
from r3rl.rollout.net.protocol import MAX_BATCH, RoutedExpertsFormat
from r3rl.sample import Sample

__all__ = ["RolloutBackend", "EngineBackend", "HTTPBackend", "WeightSyncError", "drop_stale", "group_requests",
           "sample_from_output"]

logger = logging.getLogger(__name__)


@runtime_checkable
class RolloutBackend(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
                 n_samples_per_prompt: int = 1) -> list[Sample]:
        """`n_samples_per_prompt` samples of every prompt, prompt-major, each with its own seed and its trace.
        The engine and HTTP backends also take `routed_experts_start_len=[one per prompt]` (episodes' later turns:
        only the trace rows from there on come back)."""
        ...

    def update_weights(self, model: nn.Module, *, version: int) -> None:
        """After this returns, every later `generate` uses `model`'s weights and reports `version`."""
        ...

    @property
    def weight_version(self) -> int:
        """The version of the weights the next `generate` uses."""
        ...

    def close(self) -> None:
        """Free the engine / connections. The backend is unusable afterwards."""
        ...


def group_requests(num_prompts: int, sampling: SamplingParams, n_samples_per_prompt: int, *,
                   logprobs_at_temperature: bool, rng: random.Random) -> list[tuple[int, int, SamplingParams]]:
    """(prompt index, sample index, that sample's SamplingParams) in prompt-major order; seeds as the module says."""
    if n_samples_per_prompt < 1:
        raise ValueError(f"n_samples_per_prompt must be >= 1: got {n_samples_per_prompt}")
    if sampling.logprobs_at_temperature and not logprobs_at_temperature:
        raise ValueError("sampling.logprobs_at_temperature is a backend option: construct the backend with "
                         "logprobs_at_temperature=True instead")
    n = num_prompts * n_samples_per_prompt
    if sampling.seed is not None:
        seeds = [group_seed(sampling.seed, i, j) for i in range(num_prompts) for j in range(n_samples_per_prompt)]
    else:
        seeds = set()
        while len(seeds) < n:
            seeds.add(rng.getrandbits(63))
        seeds = list(seeds)
    return [(k // n_samples_per_prompt, k % n_samples_per_prompt,
             dataclasses.replace(sampling, seed=seeds[k], logprobs_at_temperature=logprobs_at_temperature,
                                 stop_token_ids=list(sampling.stop_token_ids)))
            for k in range(n)]


def sample_from_output(out: EngineOutput, *, num_layers: int, top_k: int, num_experts: int,
                       metadata: dict[str, Any], index: int | None = None) -> Sample:
    """The one EngineOutput -> Sample conversion, validated against the model shape; the trace is required."""
    if out.trace is None:
        raise RuntimeError(f"sample {index}: the engine returned no routing trace (routing capture is off: "
                           f"EngineConfig.capture_routing=False); a rollout backend always needs one")
    return Sample(
        prompt_ids=list(out.prompt_ids), response_ids=list(out.output_ids), rollout_logprobs=list(out.output_logprobs),
        logprob_temperature=out.logprob_temperature, trace=out.trace, finish_reason=out.finish_reason,
        weight_version_start=out.weight_version_start, weight_version=out.weight_version, metadata=metadata,
        routed_experts_start_len=out.routed_experts_start_len,
    ).validate(num_layers=num_layers, top_k=top_k, num_experts=num_experts, index=index)


class EngineBackend:
    """The in-process RolloutEngine. It holds its own copy of the weights; `update_weights` copies the trainer
    model's tensors into it in place (strict: every engine weight, with its shape)."""

    def __init__(self, model: nn.Module | str, *, max_slots: int = 64, max_seq_len: int = 1024, device=None,
                 dtype=None, logprobs_at_temperature: bool = False, config: EngineConfig | None = None) -> None:
        """`config` wins over the keyword fields when given (`EngineBackend.from_config`)."""
        config = config or EngineConfig(max_slots=max_slots, max_seq_len=max_seq_len, device=device, dtype=dtype)
        self.engine = RolloutEngine(model, config)
        self.logprobs_at_temperature = logprobs_at_temperature
        self._rng = random.Random()
        self._calls = itertools.count()

    @classmethod
    def from_config(cls, model: nn.Module | str, config: EngineConfig, *,
                    logprobs_at_temperature: bool = False) -> EngineBackend:
        return cls(model, config=config, logprobs_at_temperature=logprobs_at_temperature)

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    @property
    def model_shape(self) -> ModelShape:
        return ModelShape(num_layers=self.engine.num_layers, top_k=self.engine.top_k,
                          num_experts=self.engine.num_experts)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
                 n_samples_per_prompt: int = 1, routed_experts_start_len: Sequence[int] | None = None) -> list[Sample]:
        call = next(self._calls)
        plan = group_requests(len(prompts), sampling, n_samples_per_prompt,
                              logprobs_at_temperature=self.logprobs_at_temperature, rng=self._rng)
        starts = start_lens(routed_experts_start_len, len(prompts))
        requests = [EngineRequest(request_id=f"c{call}-p{i}-s{j}", input_ids=list(prompts[i]), sampling=sp,
                                  routed_experts_start_len=starts[i])
                    for i, j, sp in plan]
        outputs = self.engine.generate(requests)
        e = self.engine
        return [sample_from_output(out, num_layers=e.num_layers, top_k=e.top_k, num_experts=e.num_experts, index=k,
                                   metadata={"prompt_index": i, "sample_index": j, "rid": out.request_id})
                for k, ((i, j, _), out) in enumerate(zip(plan, outputs, strict=True))]

    def update_weights(self, model: nn.Module, *, version: int) -> None:
        self.engine.update_weights(model_tensors(model), version=version, strict=True)

    def release_memory(self) -> int:
        """Colocated training: free the engine's KV cache and graphs while the trainer updates (weights stay)."""
        return self.engine.release_memory()

    def resume_memory(self) -> None:
        self.engine.resume_memory()

    def close(self) -> None:
        self.engine.abort_all()
        del self.engine


class HTTPBackend:
    """A `RolloutClient` against `r3rl serve` or a real SGLang server, behind a synchronous interface (its own event
    loop in a background thread). Weights go through the disk: `update_weights` saves the model as an HF checkpoint
    under `weights_dir` (a directory the server can read) and calls `/update_weights_from_disk`."""

    def __init__(self, url: str, *, weights_dir: str | Path | None = None, timeout_s: float = 600.0,
                 logprobs_at_temperature: bool = False, model_shape: ModelShape | None = None,
                 routed_experts_format: RoutedExpertsFormat = RoutedExpertsFormat.BASE64_INT32,
                 max_retries: int = 3, broadcaster=None, engine: str = "auto") -> None:
        """`model_shape`: give it for a SGLang or vLLM server (r3rl serve reports it). `engine`: auto (ask the
        server), r3rl, sglang or vllm (`vllm_client.VLLMClient`). `logprobs_at_temperature`: against
        SGLang, it must state what the server returns (True unless it runs with SGLANG_RETURN_ORIGINAL_LOGPROB=1).
        `broadcaster` (a `dist_sync.WeightBroadcaster`): sync weights by NCCL/gloo broadcast instead of the disk."""
        self.url = url
        self.broadcaster = broadcaster
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self.logprobs_at_temperature = logprobs_at_temperature
        self._rng = random.Random()
        self._calls = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="r3rl-http-backend", daemon=True)
        self._thread.start()

        async def make() -> RolloutClient:
            from r3rl.rollout.net.vllm_client import make_client

            return await make_client(url, engine=engine, timeout=timeout_s, max_retries=max_retries,
                                     model_shape=model_shape, routed_experts_format=routed_experts_format,
                                     logprobs_at_temperature=logprobs_at_temperature)

        self.client = self._run(make())
        self._version = weight_version_int(self._run(self.client.get_model_info()).get("weight_version"))
        self._saved: list[Path] = []
        self._unverified: int | None = None  # a version the server did not report back yet: check the next samples

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def model_shape(self) -> ModelShape:
        """The served model's MoE shape (r3rl serve reports it; for SGLang, the one given to the constructor)."""
        return self._run(self.client.model_shape())

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
                 n_samples_per_prompt: int = 1, routed_experts_start_len: Sequence[int] | None = None) -> list[Sample]:
        plan, rids = plan_with_rids(self, len(prompts), sampling, n_samples_per_prompt, prefix="c")
        starts = start_lens(routed_experts_start_len, len(prompts))
        samples = []
        for start in range(0, len(plan), MAX_BATCH):  # the server takes at most MAX_BATCH prompts per request
            part = plan[start : start + MAX_BATCH]
            samples += self._run(self.client.generate(
                [prompts[i] for i, _, _ in part], [sp for _, _, sp in part], rids=rids[start : start + MAX_BATCH],
                routed_experts_start_len=None if routed_experts_start_len is None else [starts[i] for i, _, _ in part]))
        for (i, j, _), s in zip(plan, samples, strict=True):
            s.metadata.update(prompt_index=i, sample_index=j)
        if self._unverified is not None:
            stale = [k for k, s in enumerate(samples) if s.weight_version_start != self._unverified]
            if stale:
                raise WeightSyncError(f"sample {stale[0]} was generated with weight_version="
                                      f"{samples[stale[0]].metadata.get('weight_version_raw')!r} after the update to "
                                      f"{self._unverified}: the server did not apply it")
            self._unverified = None
        return samples

    def update_weights(self, model: nn.Module, *, version: int) -> None:
        if self.broadcaster is not None:
            self.broadcaster.push([self], model_tensors(model), version)
            self._confirm(version, "distributed")
            return
        if self.weights_dir is None:
            raise WeightSyncError("HTTPBackend.update_weights needs weights_dir: a directory this process writes and "
                                  "the server reads (HTTPBackend(url, weights_dir=...))")
        target = self.weights_dir / f"v{version}"
        tmp = self.weights_dir / f".v{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)  # the server never sees a half-written checkpoint
        answer = self._run(self.client.update_weights_from_disk(str(target.resolve()), weight_version=str(version)))
        self._confirm(version, f"disk ({answer})")
        check_served = getattr(self.client, "check_served_weights", None)  # vLLM: prove what it loaded
        if check_served is not None:
            self._run(check_served(model))
        for old in self._saved:  # the server has loaded the new one: older checkpoints are no longer needed
            shutil.rmtree(old, ignore_errors=True)
        self._saved = [target]
        logger.info("rollout weights synced by disk: %s -> %s, weight_version=%d", target, self.url, version)

    def _confirm(self, version: int, how: str) -> None:
        """The server reports `version` now (an older SGLang reports none: the next samples are checked instead)."""
        reported = self._run(self.client.get_model_info()).get("weight_version")
        if reported is not None and str(reported) != str(version):
            raise WeightSyncError(f"the server reports weight_version={reported!r} after the update by {how}, "
                                  f"expected {version}")
        self._unverified = version if reported is None else None
        self._version = version

    def adopt_version(self, version: int) -> None:
        """Another process (torchrun rank 0) synced the server to `version`: generate with it, and check that the
        next samples were generated with it."""
        self._version, self._unverified = version, version

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self.client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self, coro: Coroutine):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()


def start_lens(routed_experts_start_len: Sequence[int] | None, num_prompts: int) -> list[int]:
    """One `routed_experts_start_len` per prompt (0: the whole trace)."""
    if routed_experts_start_len is None:
        return [0] * num_prompts
    starts = list(routed_experts_start_len)
    if len(starts) != num_prompts:
        raise ValueError(f"routed_experts_start_len needs one entry per prompt: got {len(starts)}, expected "
                         f"{num_prompts}")
    return starts


def plan_with_rids(backend, num_prompts: int, sampling: SamplingParams, n_samples_per_prompt: int, *,
                   prefix: str) -> tuple[list[tuple[int, int, SamplingParams]], list[str]]:
    """`group_requests` for one `generate` call of an HTTP backend, with a request id per sample that is unique
    across calls and processes (call counter + random suffix: a re-sent request keeps its rid)."""
    call = next(backend._calls)
    plan = group_requests(num_prompts, sampling, n_samples_per_prompt,
                          logprobs_at_temperature=backend.logprobs_at_temperature, rng=backend._rng)
    return plan, [f"{prefix}{call}-p{i}-s{j}-{backend._rng.getrandbits(32):08x}" for i, j, _ in plan]


def drop_stale(samples: Sequence[Sample], current_version: int,
               max_staleness: int | None) -> tuple[list[Sample], int]:
    """(kept samples, number of stale samples). A sample is stale when `current_version -
    sample.weight_version_start > max_staleness` (it started on weights that old); `max_staleness=None` keeps all
    samples and still counts those behind `current_version` at all (staleness > 0) for the `stale_samples` metric."""
    if max_staleness is not None and max_staleness < 0:
        raise ValueError(f"max_staleness must be >= 0 or None: got {max_staleness}")
    limit = 0 if max_staleness is None else max_staleness
    stale = [current_version - s.weight_version_start > limit for s in samples]
    kept = list(samples) if max_staleness is None else [s for s, st in zip(samples, stale, strict=True) if not st]
    return kept, sum(stale)
