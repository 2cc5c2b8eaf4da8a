"""RolloutEngine: the embedded rollout engine (continuous batching, paged KV cache, routing capture, CUDA graphs).

    engine = RolloutEngine(make_model("tiny-qwen3-moe"), max_slots=8, max_seq_len=256)   # or .from_pretrained(dir)
    [out] = engine.generate([EngineRequest(request_id="a", input_ids=[1, 2, 3], sampling=SamplingParams(seed=0))])
    out.output_ids, out.output_logprobs, out.trace         # trace: RoutingTrace [3 + len(output) - 1, layers, top_k]

Model (forward.py): the engine copies the weights of a transformers v5 MoE model (routers found by
`r3rl.models.find_routers`, which raises on anything else) and runs its own forward, deliberately a different
numerical engine from the HF training forward, as SGLang is.

Scheduling: `step()` admits waiting requests into free slots while the KV cache has blocks for their prompts,
prefills them (batched, right-padded), then decodes every running slot once. Running requests occupy slots [0, n):
a finished slot is refilled by moving the last request into it (a block-table row, no KV copied). With the overlap
schedule (on with CUDA graphs) a step queues the next decode before it reads the last one back, while no admission is
due, so the host's bookkeeping runs while the device decodes; a stopped request is then decoded once more (its extra
token dropped) and finished requests come back one `step()` later.

Paged KV (paging.py, kv_cache.py): tokens live in blocks of a shared pool (`kv_cache_tokens`), so memory is bounded
by the tokens in use. Requests admitted together with the same prompt (a GRPO group: n samples of one prompt) are
prefilled once: the others point at the prompt's blocks (a private copy of its last, partial block) and sample their
first token from the same logits with their own seeds; each one's trace still covers the whole prompt. When a decode
step needs a block and none is free, the newest running requests are preempted: their blocks are freed and they
restart from their prompt later, with the same seeds (so the same tokens).

Devices. CUDA: decode steps replay a CUDA graph per (batch bucket, KV-length bucket, sampling mode, padded or not);
padding rows are kept out of the experts. CPU: eager and batch-invariant (row-wise kernels, one prefill per
request), so a seed gives bitwise the same tokens whatever else is in the batch.

Outputs: tokens sampled on the device with per-request counter-based seeds, the log-prob of each (temperature 1 or
the request's, sampling.py), and the routing trace, written into a device buffer inside the forward and copied to
the host once per finished request. Weights: `update_weights` copies HF-named tensors in place and sets
`weight_version` (outputs carry the version at admission and at finish); `release_memory` / `resume_memory` free
and re-allocate the KV cache for a colocated trainer. Not thread-safe: one thread owns it (worker.py).

Tensor suffixes: S slots, B decode rows, N prefill requests, P positions, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from r3rl.models.loading import load_model, resolve_dtype
from r3rl.rollout.engine.config import EngineConfig
from r3rl.rollout.engine.graphs import DecodeGraphs, graph_safe, next_power_of_two
from r3rl.rollout.engine.messages import EngineOutput, EngineRequest, FinishReason
from r3rl.rollout.engine.sampling import SamplingMode, SlotParams, fold_seed, sample_tokens, vocab_keys
from r3rl.rollout.engine.weights import check_tensor_names, materialize
from r3rl.rollout.model.attention_linear import LinearStateCache
from r3rl.rollout.model.forward import MoEForward, MoEKernel
from r3rl.rollout.model.fused_moe import config_tier_tokens
from r3rl.rollout.model.kv_cache import KVCache, NullRoutingCapture, RoutingCapture
from r3rl.rollout.model.paging import BlockTable, blocks_for
from r3rl.trace import RoutingTrace

__all__ = ["RolloutEngine"]

logger = logging.getLogger(__name__)


class RolloutEngine:
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
        self._preempted: deque[_Running] = deque()  # admitted before the waiting requests
        self.num_preemptions = 0
        self.num_launched_ahead = 0  # decode steps launched before the previous one was read back (overlap schedule)
        self._slots: list[_Running] = []  # index = slot; running requests are always slots [0, n)
        self._request_ids: set[str] = set()
        self._seed_rng = random.Random()  # seeds of requests that bring none
        self._weight_version = 0
        self._graphs = DecodeGraphs(S, device)
        self._inflight: _Inflight | None = None  # a decode step launched and not yet read back (overlap schedule)
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

    # --- private: requests ----------------------------------------------------------------------------------------
    def _validate(self, req: EngineRequest) -> None:
        if req.request_id in self._request_ids:
            raise ValueError(f"request_id must be unique among queued and running requests: got {req.request_id!r}")
        req.validate(vocab_size=self.vocab_size, max_seq_len=self.max_seq_len)

    def _emit(self, rows: list[_Running], tokens: list[int], logprobs: list[float]) -> None:
        for r, tok, lp in zip(rows, tokens, logprobs, strict=True):
            if r.finish_reason:  # stopped a step earlier: the overlap schedule decoded it once more
                continue
            r.output_ids.append(tok)
            r.logprobs.append(lp)
            if tok in r.stop_ids:
                r.finish_reason = FinishReason.STOP
            elif len(r.output_ids) >= r.req.sampling.max_new_tokens:
                r.finish_reason = FinishReason.LENGTH

    def _release_finished(self) -> list[EngineOutput]:
        """Outputs of finished slots (traces read before any move), then refill their slots from the tail."""
        return self._release_finished_later()()

    def _release_finished_later(self) -> Callable[[], list[EngineOutput]]:
        """`_release_finished` whose outputs are built by the returned function: the finished slots are released
        now, their traces' copy to the host is queued, and the caller waits for it only when it calls the function."""
        done = [i for i, r in enumerate(self._slots) if r.finish_reason]
        if not done:
            return list
        rows = [self._slots[i] for i in done]
        wanted = [i for i in done if self._slots[i].req.return_routed_experts]
        traces_later = self.routes.read_later(wanted, [self._slots[i].next_pos for i in wanted])
        version = self._weight_version
        for r in rows:
            self._request_ids.discard(r.req.request_id)
        self._remove_slots(done)

        def outputs() -> list[EngineOutput]:
            traces = dict(zip(wanted, traces_later(), strict=True))
            return [EngineOutput(
                request_id=r.req.request_id, prompt_ids=list(r.req.input_ids), output_ids=r.output_ids,
                output_logprobs=r.logprobs, logprob_temperature=r.req.sampling.logprob_temperature,
                finish_reason=r.finish_reason, trace=_rows_from(traces.get(i), r.req.routed_experts_start_len),
                weight_version=version, weight_version_start=r.version_start,
                routed_experts_start_len=r.req.routed_experts_start_len) for i, r in zip(done, rows, strict=True)]

        return outputs

    def _remove_slots(self, done: list[int]) -> None:
        """Free slots `done` (sorted) and their blocks: refill the holes below the new end by moving the last live
        requests in (their block-table rows and per-slot state; no KV is copied)."""
        for i in done:
            self.table.release(i)
        gone = set(done)
        keep = len(self._slots) - len(done)
        holes = [i for i in done if i < keep]
        movers = [j for j in range(keep, len(self._slots)) if j not in gone]
        slots = self._slots[:keep]
        for dst, src in zip(holes, movers, strict=True):
            self.table.move(src, dst)
            slots[dst] = self._slots[src]
        if holes:
            # non_blocking: with the overlap schedule a decode step is in flight; these small copies need not wait
            dst_M = torch.tensor(holes).to(self.device, non_blocking=True)
            src_M = torch.tensor(movers).to(self.device, non_blocking=True)
            for buf in (self._tokens_S, self._pos_S, *vars(self._params).values()):
                buf[dst_M] = buf[src_M]
            if self.state is not None:  # linear-attention state lives per slot, not in blocks
                self.state.copy_rows(src_M, dst_M)
        # freed tail slots become CUDA-graph padding rows: position 0, so decode attention does not walk the stale
        # length of the request that left them
        self._pos_S[keep : len(self._slots)] = 0
        self._slots, self._mode = slots, None

    # --- private: admission and KV blocks -------------------------------------------------------------------------
    def _admit(self) -> list[list[_Running]]:
        """Take preempted, then waiting requests while there are free slots and KV blocks for their prompts; give
        them blocks. Returns them as prompt groups (requests with the same prompt share its blocks and one prefill),
        shortest prompt first; the slots are filled in that order."""
        if not (self._preempted or self._waiting):
            return []
        table, bs = self.table, self.table.block_size
        room, free = self.config.max_slots - len(self._slots), table.num_free
        if room == 0:  # every slot busy (the usual GRPO case): no per-slot headroom sum
            return []
        # one block of headroom for every request that will still grow, so that an admission does not force the
        # next decode step to preempt (with the default pool, every slot's longest sequence fits and this never binds)
        reserve = self._headroom()
        groups: dict[tuple[int, ...], list[_Running]] = {}
        while room > 0 and (self._preempted or self._waiting):
            queue = self._preempted or self._waiting
            head = queue[0]
            req = _request(head)
            key = tuple(req.input_ids)
            need = (1 if len(key) % bs else 0) if key in groups else blocks_for(len(key), bs)
            grow = self._grows(req, blocks_for(len(key), bs))
            if need + reserve + grow > free:
                break  # FIFO: later requests wait too
            queue.popleft()
            room, free, reserve = room - 1, free - need, reserve + grow
            if isinstance(head, _Running):  # preempted: restarts from its prompt with the same seed
                r = head
                r.version_start = self._weight_version
            else:
                seed = head.sampling.seed if head.sampling.seed is not None else self._seed_rng.getrandbits(64)
                r = _Running(req=head, seed32=fold_seed(seed), stop_ids=frozenset(head.sampling.stop_token_ids),
                             version_start=self._weight_version)
            groups.setdefault(key, []).append(r)
        ordered = sorted(groups.items(), key=lambda kv: len(kv[0]))  # less padding in batched prefills
        slot = len(self._slots)
        for key, group in ordered:
            owner = table.allocate(blocks_for(len(key), bs))
            table.assign(slot, owner)
            for s in range(slot + 1, slot + len(group)):  # shared full blocks, a private partial block
                table.assign(s, owner[: len(key) // bs] + table.allocate(1 if len(key) % bs else 0))
            slot += len(group)
        table.sync()
        return [g for _, g in ordered]

    def _headroom(self) -> int:
        """Blocks the running requests may still claim: one for each that will still grow (`_admit` keeps them)."""
        held = self.table.num_blocks_of
        return sum(self._grows(r.req, held(i)) for i, r in enumerate(self._slots))

    def _grows(self, req: EngineRequest, held: int) -> int:
        """1 when a request holding `held` blocks will need another before it can finish."""
        return int(blocks_for(len(req.input_ids) + req.sampling.max_new_tokens, self.table.block_size) > held)

    def _reserve_decode_blocks(self, ahead: int = 0, *, preempt: bool = True) -> bool:
        """Every running request gets the block its next decode position needs (`ahead` decode steps in flight
        whose tokens the host has not read back yet); when too few are free, the newest requests (the last slots)
        are preempted until the others fit, or, with `preempt` False, nothing is reserved and False is returned."""
        table, bs = self.table, self.table.block_size
        held = table.num_blocks_of
        need = [i for i, r in enumerate(self._slots) if (r.next_pos + ahead) // bs >= held(i)]
        if len(need) > table.num_free and not preempt:
            return False
        while len(need) > table.num_free:  # terminates: one request alone always fits (BlockTable checks)
            self._preempt(len(self._slots) - 1)
            need = [i for i in need if i < len(self._slots)]
        table.append_each(need, table.allocate(len(need)))
        table.sync()
        return True

    def _preempt(self, i: int) -> None:
        r = self._slots[i]
        logger.info("KV cache full (%d tokens): preempting request %s at %d generated tokens; it restarts from its "
                    "prompt later", self.table.capacity_tokens, r.req.request_id, len(r.output_ids))
        r.output_ids.clear()
        r.logprobs.clear()
        r.finish_reason = None
        self._preempted.appendleft(r)  # preempted from the tail: the older ones end up first
        self.num_preemptions += 1
        self._remove_slots([i])

    # --- private: prefill and decode ------------------------------------------------------------------------------
    def _prefill(self, slot0: int, groups: list[list[_Running]]) -> None:
        """Prefill each prompt group's first request (the others share its blocks), then sample every request's
        first token from its group's logits with its own seed."""
        new = [r for g in groups for r in g]
        V = self.vocab_size  # a top_k of the vocabulary or more keeps every token (and must fit an int64 buffer)
        columns = zip(*((r.req.sampling.temperature, r.req.sampling.top_p,
                         r.req.sampling.top_k if r.req.sampling.top_k <= V else -1, r.seed32,
                         r.req.sampling.logprob_temperature) for r in new), strict=True)
        for dst, values in zip(vars(self._params.narrow(slot0, len(new))).values(), columns, strict=True):
            dst.copy_(torch.tensor(values, dtype=dst.dtype))
        s0 = slot0
        for batch in self._prefill_batches(groups):
            owners = [g[0] for g in batch]
            N, P = len(owners), max(len(r.req.input_ids) for r in owners)
            tokens_NP = torch.zeros(N, P, dtype=torch.int64)
            for n, r in enumerate(owners):
                tokens_NP[n, : len(r.req.input_ids)] = torch.tensor(r.req.input_ids)
            lengths_N = torch.tensor([len(r.req.input_ids) for r in owners], device=self.device)
            owner_rows, rows, src, dst = [], [], [], []
            for n, g in enumerate(batch):
                owner_rows.append(s0)
                rows += [n] * len(g)
                if len(g) > 1 and len(g[0].req.input_ids) % self.table.block_size:
                    last = self.table.blocks(s0)[-1]
                    src += [last] * (len(g) - 1)
                    dst += [self.table.blocks(s)[-1] for s in range(s0 + 1, s0 + len(g))]
                s0 += len(g)
            logits_NV = self.model.prefill(tokens_NP.to(self.device), lengths_N,
                                           torch.tensor(owner_rows, device=self.device), self.kv, self.routes,
                                           self.state)
            if src:  # the partial last block of a shared prompt: each sample writes its own tokens into it
                self.kv.copy_blocks(src, dst)
                self.routes.copy_blocks(src, dst)
            if self.state is not None and len(rows) > N:  # each sample starts from its prompt's state
                self.state.copy_rows(torch.tensor([owner_rows[n] for n in rows], device=self.device),
                                     torch.arange(s0 - len(rows), s0, device=self.device))
            members = [r for g in batch for r in g]
            rows_M = torch.tensor(rows, device=self.device)
            logits_MV, lengths_M = (logits_NV, lengths_N) if len(rows) == N else (logits_NV[rows_M], lengths_N[rows_M])
            mode = SamplingMode.for_params([r.req.sampling for r in members])
            m0 = s0 - len(members)
            tok_M, lp_M = sample_tokens(logits_MV, self._params.narrow(m0, len(members)), lengths_M, mode,
                                        self._vocab_keys_V)
            self._tokens_S[m0:s0] = tok_M
            self._pos_S[m0:s0] = lengths_M
            self._emit(members, tok_M.tolist(), lp_M.tolist())

    def _prefill_batches(self, groups: list[list[_Running]]) -> list[list[list[_Running]]]:
        """Prompt groups batched into prefills under the padded-token budget (one prompt per prefill when batch
        invariant: a prefill's shapes must depend on its own prompt only)."""
        if self.config.batch_invariant:
            return [[g] for g in groups]
        batches: list[list[list[_Running]]] = [[]]
        longest = 0
        for g in groups:
            longest_if = max(longest, len(g[0].req.input_ids))
            if batches[-1] and longest_if * (len(batches[-1]) + 1) > self.config.prefill_token_budget:
                batches.append([])
                longest_if = len(g[0].req.input_ids)
            batches[-1].append(g)
            longest = longest_if
        return batches

    # --- private: decode steps (plan, launch, collect) -----------------------------------------------------------
    def _admission_due(self) -> bool:
        """The next waiting request would be admitted (a free slot, and blocks by `_admit`'s rule): the next step
        admits before it decodes (no launch ahead). A request that does not fit yet does not stop the overlap."""
        queue = self._preempted or self._waiting
        if not queue or len(self._slots) >= self.config.max_slots:
            return False
        req = _request(queue[0])
        held = blocks_for(len(req.input_ids), self.table.block_size)
        need, free = held + self._grows(req, held), self.table.num_free
        if need + len(self._slots) <= free:  # fits whatever the running requests still claim (one block each)
            return True
        return need + self._headroom() <= free

    def _plan(self, *, ahead: int) -> tuple[SamplingMode, int] | None:
        """(sampling mode, attention length) of the next decode of the running slots, their blocks reserved;
        `ahead`: steps in flight (1: planned while one runs, without preempting: None when blocks run short or
        nothing would continue)."""
        if not self._slots:
            return None
        if ahead and not self._reserve_decode_blocks(ahead, preempt=False):
            return None
        if self._mode is None:  # recomputed only when the running requests change
            self._mode = SamplingMode.for_params([r.req.sampling for r in self._slots])
        T = self._fixed_decode_T()
        if T is None:  # a power of two (few graphs), in whole KV blocks
            longest = max(r.next_pos for r in self._slots) + ahead
            bs, max_len = self.table.block_size, self.config.max_seq_len
            T = min(blocks_for(next_power_of_two(longest + 1, minimum=64, maximum=max_len), bs) * bs,
                    self.table.max_blocks * bs)
        return self._mode, T

    def _fixed_decode_T(self) -> int | None:
        """The attention length of every decode step when it does not depend on the rows (the whole context), else
        None: batch-invariant (a row's shapes must not depend on other rows), or decode attention that reads each
        row's own length in place (T would only multiply the CUDA graphs)."""
        if self.config.batch_invariant or self.model.decodes_in_place(self.kv):
            return self.table.max_blocks * self.table.block_size
        return None

    def _launch(self, mode: SamplingMode, T: int) -> _Inflight:
        """One decode step of the running slots, queued on the device with the copy of its outputs to the host."""
        n = len(self._slots)
        if self.config.use_cuda_graph:
            B = self._graphs.bucket(n)
            if n < B:
                self._n_active.fill_(n)
            self._graph(B, T, mode, masked=n < B).replay()
        else:
            self._decode_rows(n, T, mode, masked=False)
        self._tokens_S[:n] = self._next_tokens_S[:n]
        self._pos_S[:n] += 1
        tokens, logprobs = self._host_out[0]
        self._host_out.reverse()  # the next launch copies into the other set
        tokens[:n].copy_(self._next_tokens_S[:n], non_blocking=True)
        logprobs[:n].copy_(self._next_logprobs_S[:n], non_blocking=True)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))  # the engine's device, not the thread's current one
        return _Inflight(rows=list(self._slots), tokens=tokens[:n], logprobs=logprobs[:n], done=done)

    def _collect_later(self, step: _Inflight) -> Callable[[], list[EngineOutput]]:
        """Read a launched step back: its tokens to their requests, the finished ones released; returns the function
        that builds their outputs (`_release_finished_later`)."""
        if step.done is not None:
            step.done.synchronize()  # note: a decode step's host sync (stop checks need the tokens)
        self._emit(step.rows, step.tokens.tolist(), step.logprobs.tolist())
        return self._release_finished_later()

    def _drain(self) -> None:
        """Read back the step in flight (its finished requests go out with the next `step()`)."""
        if self._inflight is not None:
            step, self._inflight, self._next_plan = self._inflight, None, None
            self._ready += self._collect_later(step)()

    def _decode_rows(self, B: int, T: int, mode: SamplingMode, *, masked: bool) -> None:
        """Decode rows [0, B) attending over T positions; writes the sampled tokens and logprobs of those rows.

        Idempotent for a given device state (it writes K/V, routing and outputs, never advances positions), which
        makes the eager warm-up before a graph capture harmless, except for linear-attention states, which `_graph`
        restores. `masked`: rows >= the live count are padding."""
        pos_B = self._pos_S[:B]
        active_B = self._arange_P[:B] < self._n_active if masked else None
        logits_BV = self.model.decode(self._tokens_S[:B], pos_B, T, active_B, self.kv, self.routes, self.state)
        tok_B, lp_B = sample_tokens(logits_BV, self._params.narrow(0, B), pos_B + 1, mode, self._vocab_keys_V)
        self._next_tokens_S[:B] = tok_B
        self._next_logprobs_S[:B] = lp_B

    def _graph(self, B: int, T: int, mode: SamplingMode, *, masked: bool) -> torch.cuda.CUDAGraph:
        def run() -> None:
            # a decode advances linear-attention states: the eager warm-up before the capture must not (the capture
            # itself only records)
            if self.state is None or torch.cuda.is_current_stream_capturing():
                self._decode_rows(B, T, mode, masked=masked)
                return
            snapshot = self.state.snapshot(B)
            self._decode_rows(B, T, mode, masked=masked)
            self.state.restore(snapshot)

        return self._graphs.get((B, T, mode, masked), run)


def _rows_from(trace: RoutingTrace | None, start: int) -> RoutingTrace | None:
    """Trace rows [start, end): what a request with `routed_experts_start_len=start` asked for."""
    if trace is None or start == 0:
        return trace
    return RoutingTrace(np.ascontiguousarray(trace.expert_ids[start:]), trace.num_experts)


def _request(queued: EngineRequest | _Running) -> EngineRequest:
    """The request of a queue entry (waiting: the request; preempted: its running state)."""
    return queued.req if isinstance(queued, _Running) else queued


@dataclass
class _Inflight:
    """A decode step launched and not yet read back."""

    rows: list[_Running]  # the running requests at launch, in slot order
    tokens: torch.Tensor  # [rows] host copies, written by the step's queued copies
    logprobs: torch.Tensor
    done: torch.cuda.Event | None  # recorded after the copies (None on CPU, where they are synchronous)


@dataclass(eq=False)
class _Running:
    req: EngineRequest
    seed32: int
    stop_ids: frozenset[int]
    version_start: int  # weight version at admission (prefill)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def next_pos(self) -> int:
        """Position of the last token (the next decode input); also the number of positions cached so far."""
        return len(self.req.input_ids) + len(self.output_ids) - 1
