"""RolloutEngine: the embedded rollout engine (continuous batching, paged KV cache, routing capture, CUDA graphs).

    engine = RolloutEngine(make_model("tiny-qwen3-moe"), max_slots=8, max_seq_len=256)   # or .from_pretrained(dir)
    [out] = engine.generate([EngineRequest(request_id="a", input_ids=[1, 2, 3], sampling=SamplingParams(seed=0))])
    out.output_ids, out.output_logprobs, out.trace         # trace: RoutingTrace [3 + len(output) - 1, layers, top_k]

Model (`r3rl.rollout.model`, forward.py): the engine copies the weights of a transformers v5 MoE model (routers found by
`r3rl.models.find_routers`, which raises on anything else) and runs its own forward, deliberately a different
numerical engine from the HF training forward, as SGLang is.

Scheduling: `step()` admits waiting requests into free slots while the KV cache has blocks for their prompts,
prefills them (batched, right-padded), then decodes every running slot once. Running requests occupy slots [0, n):
a finished slot is refilled by moving the last request into it (a block-table row, no KV copied). With the overlap
schedule (on with CUDA graphs) a step queues the next decode before it reads the last one back, while no admission is
due, so the host's bookkeeping runs while the device decodes; a stopped request is then decoded once more (its extra
token dropped) and finished requests come back one `step()` later. The
pieces: scheduling.py (admission, prefill batches, blocks, preemption), execution.py (prefill, decode plan, launch,
collect) and slots.py (the running requests: tokens, stops, release), mixed into `RolloutEngine`.

Paged KV (model/paging.py, model/kv_cache.py): tokens live in blocks of a shared pool (`kv_cache_tokens`), so memory
is bounded by the tokens in use. Requests admitted together with the same prompt (a GRPO group: n samples of one
prompt) are prefilled once: the others point at the prompt's blocks (a private copy of its last, partial block) and
sample their first token from the same logits with their own seeds; each one's trace still covers the whole prompt.
When a decode step needs a block and none is free, the newest running requests are preempted: their blocks are freed
and they restart from their prompt later, with the same seeds (so the same tokens).

Devices. CUDA: decode steps replay a CUDA graph per (batch bucket, KV-length bucket, sampling mode, padded or not);
padding rows are kept out of the experts. CPU: eager and batch-invariant (row-wise kernels, one prefill per
request), so a seed gives bitwise the same tokens whatever else is in the batch.

Outputs: tokens sampled on the device with per-request counter-based seeds, the log-prob of each (temperature 1 or
the request's, sampling.py), and the routing trace, written into a device buffer inside the forward and copied to
the host once per finished request. Weights: `update_weights` copies HF-named tensors in place and sets
`weight_version` (outputs carry the version at admission and at finish); `release_memory` / `resume_memory` free
and re-allocate the KV cache for a colocated trainer. Not thread-safe: one thread owns it (net/worker.py).

Tensor suffixes: S slots, B decode rows, N prefill requests, P positions, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections import deque
from pathlib import Path

import torch
from transformers import PreTrainedModel

from r3rl.models.loading import load_model, resolve_dtype
from r3rl.rollout.engine.config import EngineConfig
from r3rl.rollout.engine.execution import Inflight, StepRunner
from r3rl.rollout.engine.graphs import DecodeGraphs, graph_safe
from r3rl.rollout.engine.messages import EngineOutput, EngineRequest
from r3rl.rollout.engine.sampling import SamplingMode, SlotParams, vocab_keys
from r3rl.rollout.engine.scheduling import Scheduler
from r3rl.rollout.engine.slots import Running, SlotBook
from r3rl.rollout.engine.weights import check_tensor_names, materialize
from r3rl.rollout.model.attention_linear import LinearStateCache
from r3rl.rollout.model.forward import MoEForward, MoEKernel
from r3rl.rollout.model.fused_moe import config_tier_tokens
from r3rl.rollout.model.kv_cache import KVCache, NullRoutingCapture, RoutingCapture
from r3rl.rollout.model.paging import BlockTable, blocks_for

__all__ = ["RolloutEngine"]

logger = logging.getLogger(__name__)


class RolloutEngine(Scheduler, StepRunner, SlotBook):
    """Continuous-batching MoE generation with routing capture. See the module docstring."""

    def __init__(self, model_or_path: PreTrainedModel | str | os.PathLike, config: EngineConfig | None = None,
                 **overrides) -> None:
        """`config` (default EngineConfig()); `overrides` replace some of its fields: `RolloutEngine(model,
        max_slots=8)`. The engine keeps its resolved copy as `self.config`."""
        self.config = cfg = dataclasses.replace(config or EngineConfig(), **overrides)
        device, dtype = cfg.device, cfg.dtype
        if isinstance(model_or_path, str | os.PathLike):
            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            dtype = resolve_dtype(dtype or ("bfloat16" if device.type == "cuda" else "float32"))
            model = load_model(Path(model_or_path), device="cpu", dtype=dtype)
        else:
            model = model_or_path
            device = torch.device(device) if device is not None else next(model.parameters()).device
            dtype = resolve_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
        self.device, self.dtype = device, dtype
        if cfg.use_cuda_graph is None:
            cfg.use_cuda_graph = device.type == "cuda"
        if cfg.use_cuda_graph and device.type != "cuda":
            raise ValueError(f"use_cuda_graph needs a CUDA device: got device={device}")
        if cfg.batch_invariant is None:
            cfg.batch_invariant = device.type == "cpu"
        self.model = m = MoEForward(model, device=device, dtype=dtype, max_seq_len=cfg.max_seq_len,
                                     max_slots=cfg.max_slots, batch_invariant=cfg.batch_invariant,
                                     fused_moe=cfg.fused_moe)
        del model  # the engine owns copies; a model passed in stays the caller's
        if cfg.use_cuda_graph and not graph_safe(m.moe_kernel, device, dtype):
            logger.warning("CUDA graphs off: the %s experts kernel syncs with the host for %s on %s (grouped_mm is "
                           "capturable for bfloat16 on sm90+)", m.moe_kernel.value, dtype, device)
            cfg.use_cuda_graph = False

        # --- device state: caches, per-slot sampling state, outputs (allocated once) --------------------------------
        S = cfg.max_slots
        self.table, self.kv, self.routes, self.state = self._allocate_caches()
        self._tokens_S = torch.zeros(S, dtype=torch.int64, device=device)  # last token of each slot (next input)
        self._pos_S = torch.zeros(S, dtype=torch.int64, device=device)  # where that token's K/V goes
        self._params = SlotParams(torch.zeros(S, device=device), torch.ones(S, device=device),
                                  torch.full((S,), -1, dtype=torch.int64, device=device),
                                  torch.zeros(S, dtype=torch.int64, device=device), torch.ones(S, device=device))
        self._next_tokens_S = torch.zeros(S, dtype=torch.int64, device=device)
        self._next_logprobs_S = torch.zeros(S, dtype=torch.float32, device=device)
        self._arange_P = torch.arange(max(S, cfg.max_seq_len), device=device)
        self._n_active = torch.zeros((), dtype=torch.int64, device=device)  # live rows of a padded graph batch
        self._vocab_keys_V = vocab_keys(m.vocab_size, device)
        # host copies of a decode step's tokens and log-probs, two sets: with the overlap schedule one step is read
        # back while the next one's copy is queued (pinned on CUDA: the copies are asynchronous)
        pin = device.type == "cuda"
        self._host_out = [(torch.zeros(S, dtype=torch.int64, pin_memory=pin),
                           torch.zeros(S, dtype=torch.float32, pin_memory=pin)) for _ in range(2)]
        if cfg.overlap_schedule is None:
            cfg.overlap_schedule = bool(cfg.use_cuda_graph)

        # --- host state ---------------------------------------------------------------------------------------------
        self._waiting: deque[EngineRequest] = deque()
        self._preempted: deque[Running] = deque()  # admitted before the waiting requests
        self.num_preemptions = 0
        self.num_launched_ahead = 0  # decode steps launched before the previous one was read back (overlap schedule)
        self._slots: list[Running] = []  # index = slot; running requests are always slots [0, n)
        self._request_ids: set[str] = set()
        self._seed_rng = random.Random()  # seeds of requests that bring none
        self._weight_version = 0
        self._graphs = DecodeGraphs(S, device)
        self._inflight: Inflight | None = None  # a decode step launched and not yet read back (overlap schedule)
        self._next_plan: tuple[SamplingMode, int] | None = None  # the next launch's, prepared while the device works
        self._ready: list[EngineOutput] = []  # finished while draining (abort, update_weights): the next step's
        self._mode: SamplingMode | None = None  # the running slots' sampling mode; None when they changed
        logger.info(
            "rollout engine: %s, %d MoE layers, %d experts, top-%d, slots=%d, max_seq_len=%d, device=%s, dtype=%s, "
            "moe=%s, cuda_graph=%s, overlap=%s, batch_invariant=%s, kv_cache=%.1f MiB (%d tokens, blocks of %d), "
            "routing=%.1f MiB",
            m.family, m.num_moe_layers, m.num_experts, m.top_k, S, cfg.max_seq_len, device, dtype, m.moe_kernel.value,
            cfg.use_cuda_graph, cfg.overlap_schedule, cfg.batch_invariant, self.kv.nbytes / 2**20,
            self.table.capacity_tokens,
            self.table.block_size, self.routes.nbytes / 2**20,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: EngineConfig | None = None, **overrides) -> RolloutEngine:
        """Load a local HF MoE checkpoint directory (see `r3rl init-model`); arguments as for the constructor."""
        return cls(path, config, **overrides)

    # --- properties -----------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """MoE layers (the trace's layer axis)."""
        return self.model.num_moe_layers

    @property
    def top_k(self) -> int:
        return self.model.top_k

    @property
    def num_experts(self) -> int:
        return self.model.num_experts

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    @property
    def weight_version(self) -> int:
        return self._weight_version

    @property
    def num_running(self) -> int:
        return len(self._slots)

    @property
    def num_waiting(self) -> int:
        """Queued requests, preempted ones included."""
        return len(self._waiting) + len(self._preempted)

    # --- requests -------------------------------------------------------------------------------------------------
    def add_request(self, req: EngineRequest) -> None:
        """Queue a request; raises ValueError naming the field when it cannot run."""
        if self.kv is None:
            raise RuntimeError("the engine's memory is released (release_memory): call resume_memory() first")
        self._validate(req)
        self._waiting.append(req)
        self._request_ids.add(req.request_id)

    def has_work(self) -> bool:
        return bool(self._waiting or self._preempted or self._slots or self._inflight or self._ready)

    @property
    def memory_released(self) -> bool:
        return self.kv is None

    def release_memory(self) -> int:
        """Free the KV cache, routing buffer and decode graphs (SGLang's release_memory_occupation) for a colocated
        trainer's update; the weights stay. Needs an idle engine. Returns the bytes freed."""
        if self.has_work():
            raise RuntimeError(f"release_memory needs an idle engine: got {self.num_running} running and "
                               f"{self.num_waiting} waiting request(s)")
        if self.kv is None:
            return 0
        freed = self.kv.nbytes + self.routes.nbytes + (self.state.nbytes if self.state is not None else 0)
        self.table = self.kv = self.routes = self.state = None
        self._graphs = DecodeGraphs(self.config.max_slots, self.device)  # the graphs read the freed buffers
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return freed

    def resume_memory(self) -> None:
        """Allocate the KV cache and routing buffer again; decode graphs are captured again on first use."""
        if self.kv is None:
            self.table, self.kv, self.routes, self.state = self._allocate_caches()

    def warmup(self, modes: tuple[SamplingMode, ...] = (SamplingMode.GREEDY, SamplingMode.SAMPLE)) -> dict[str, int]:
        """Do now what the first steps would do on the way (`r3rl serve` calls it before its first request): capture
        the decode CUDA graph of every batch bucket (padded and exact) for `modes`, and build the fused MoE kernels
        of every prefill size tier (a capture takes tens of ms, a Triton build seconds; a server meets new batch
        and prompt sizes all the time). Needs an idle engine; graphs only with CUDA graphs where they do not also
        depend on the context length (decode attention that gathers). Returns what it did: {"graphs": captured,
        "prefills": prefill passes run}."""
        if self.has_work():
            raise RuntimeError(f"warmup needs an idle engine: got {self.num_running} running and "
                               f"{self.num_waiting} waiting request(s)")
        done = {"graphs": 0, "prefills": 0}
        if self.kv is None or self.device.type != "cuda":
            return done
        self.table.sync()  # idle slots' device rows point at the null block
        cfg, S = self.config, self.config.max_slots
        with torch.no_grad():  # idle slots: their rows write into the null block (a sink)
            if self.model.moe_kernel is MoEKernel.FUSED:
                for tokens in config_tier_tokens(self.num_experts, self.top_k, cfg.prefill_token_budget):
                    for several in (False, True):  # one prompt, and right-padded ones (a validity mask)
                        P = max(1, min(cfg.max_seq_len, tokens // 2 if several else tokens))
                        N = min(S, max(2, -(-tokens // P))) if several else 1
                        self.model.prefill(torch.zeros(N, P, dtype=torch.int64, device=self.device),
                                           torch.full((N,), P, device=self.device), self._arange_P[:N], self.kv,
                                           self.routes, self.state)
                        done["prefills"] += 1
            T = self._fixed_decode_T()
            if cfg.use_cuda_graph and T is not None:
                before = len(self._graphs)
                for mode in modes:
                    for B in self._graphs.buckets:
                        for masked in (True, False):
                            self._graph(B, T, mode, masked=masked)
                done["graphs"] = len(self._graphs) - before
        return done

    def _allocate_caches(self):
        cfg, m = self.config, self.model
        per_slot = blocks_for(cfg.max_seq_len, cfg.block_size)
        num_blocks = 1 + (cfg.max_slots * per_slot if cfg.kv_cache_tokens is None
                          else blocks_for(cfg.kv_cache_tokens, cfg.block_size))  # + the null block
        table = BlockTable(num_slots=cfg.max_slots, max_seq_len=cfg.max_seq_len, block_size=cfg.block_size,
                           num_blocks=num_blocks, device=self.device)
        kv = KVCache.allocate(num_layers=m.num_attention_layers, table=table, num_kv_heads=m.num_kv_heads,
                              head_dim=m.head_dim, dtype=self.dtype, device=self.device)
        state = None if not m.linear_layers else LinearStateCache.allocate(
            decoder_layers=m.linear_layers, max_slots=cfg.max_slots, spec=m.linear_spec, dtype=self.dtype,
            device=self.device)
        routes = (RoutingCapture(table=table, num_layers=m.num_moe_layers, top_k=m.top_k, num_experts=m.num_experts,
                                 device=self.device)
                  if cfg.capture_routing else NullRoutingCapture())
        return table, kv, routes, state

    def abort_all(self) -> list[str]:
        """Drop every waiting and running request (e.g. after a failed step); returns their ids. The buffers stay:
        a slot's cache is rewritten by the next prefill, so the engine is ready for new requests."""
        dropped = ([r.request_id for r in self._waiting] + [r.req.request_id for r in self._preempted]
                   + [r.req.request_id for r in self._slots] + [o.request_id for o in self._ready])
        self._inflight, self._next_plan, self._ready = None, None, []  # a launched step's writes are overwritten
        self._waiting.clear()
        self._preempted.clear()
        self._slots, self._mode = [], None
        self._pos_S.zero_()
        if self.table is not None:
            self.table.reset()
        self._request_ids.clear()
        return dropped

    def abort(self, request_ids: list[str]) -> list[str]:
        """Drop these requests, waiting or running, and free their slots (e.g. their client went away); returns the
        ids found. Unknown ids are ignored (the request may have finished already)."""
        wanted = set(request_ids)
        if any(r.req.request_id in wanted for r in self._slots):
            self._drain()  # (a request that finishes in the drain is done, not aborted: the next step returns it)
        found = [r.request_id for r in self._waiting if r.request_id in wanted]
        self._waiting = deque(r for r in self._waiting if r.request_id not in wanted)
        found += [r.req.request_id for r in self._preempted if r.req.request_id in wanted]
        self._preempted = deque(r for r in self._preempted if r.req.request_id not in wanted)
        running = [i for i, r in enumerate(self._slots) if r.req.request_id in wanted]
        found += [self._slots[i].req.request_id for i in running]
        if running:
            self._remove_slots(running)
        self._request_ids.difference_update(found)
        return found

    def generate(self, requests: list[EngineRequest]) -> list[EngineOutput]:
        """Run `requests` to completion on an idle engine; outputs in request order."""
        if self.has_work():
            raise RuntimeError(f"generate() needs an idle engine: got {self.num_running} running and "
                               f"{self.num_waiting} waiting requests (drive add_request/step yourself instead)")
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request_id must be unique within a batch: got duplicates in {ids}")
        for req in requests:
            self._validate(req)
        for req in requests:
            self.add_request(req)
        done: dict[str, EngineOutput] = {}
        while self.has_work():
            done.update((o.request_id, o) for o in self.step())
        return [done[i] for i in ids]

    @torch.no_grad()
    def step(self) -> list[EngineOutput]:
        """Admit and prefill waiting requests, then one decode step for every running slot. Returns finished.

        With the overlap schedule (`EngineConfig.overlap_schedule`) a step launches the next decode before it reads
        back the one in flight, while no admission is due; the host's work (reading tokens back, stop checks,
        releasing slots, reserving blocks) then runs while the device decodes. Requests come back one call later."""
        finished, self._ready = self._ready, []
        if self._inflight is not None:
            plan, self._next_plan = self._next_plan, None
            launched = self._launch(*plan) if plan is not None and not self._admission_due() else None
            outputs = self._collect_later(self._inflight)
            if not self._slots:  # every request `launched` decodes has finished: nothing to read back
                launched = None
            self._inflight = launched
            if launched is not None:
                self.num_launched_ahead += 1
                self._next_plan = self._plan(ahead=1)  # the device is busy with `launched`
                return finished + outputs()  # (waits for the finished requests' traces, queued after `launched`)
            finished += outputs()
        groups = self._admit()
        if groups:
            slot0 = len(self._slots)
            self._slots += [r for g in groups for r in g]
            self._mode = None
            self._prefill(slot0, groups)
            finished += self._release_finished()
        if self._slots:
            self._reserve_decode_blocks()
            launched = self._launch(*self._plan(ahead=0))
            if self.config.overlap_schedule:
                self._inflight, self._next_plan = launched, self._plan(ahead=1)
            else:
                finished += self._collect_later(launched)()
        return finished

    # --- weights --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, named_tensors: dict[str, torch.Tensor], *, version: int | None = None,
                       strict: bool = False) -> int:
        """Copy HF-named tensors into the engine's weights in place; returns the new weight version (`version`
        when given, else the current one + 1). `strict`: every engine weight must be in `named_tensors`.

        All names and shapes are checked before anything is copied, so a bad update changes nothing. Buffers are
        not reallocated: the KV cache and captured CUDA graphs stay valid.
        """
        views = self.model.views
        check_tensor_names(named_tensors, self.model.shapes, where="update_weights", require_all=strict)
        self._drain()  # a launched step's tokens are the old weights': read them back under the old version
        for name, t in named_tensors.items():  # FSDP2 shards gathered one tensor at a time, then freed
            views[name].copy_(materialize(t))
        self._weight_version = self._weight_version + 1 if version is None else int(version)
        return self._weight_version

