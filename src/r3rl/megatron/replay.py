"""MegatronReplay: drive Megatron-core's native RouterReplay from r3rl traces, with r3rl's check on mcore's routers.

mcore (>= 0.16) gives every `TopKRouter` a `RouterReplay` when `TransformerConfig.moe_enable_routing_replay` is on;
`topk_routing_with_score_function` then asks `router_replay.get_replay_topk(scores, topk, ...)` for the top-k.
Its native driver is global and positional: `RouterReplay.set_replay_data(list)` matches the list to routers by
instantiation order, and the caller flips a global action (RECORD / REPLAY_FORWARD / REPLAY_BACKWARD) before
backward. This object instead, for the routers of the model chunks it is given:

- keys every router by its decoder layer number (`router.layer_number`, pipeline offset included) mapped to a trace
  layer (`layer_map`): MoE layers only by default; dense layers have no router and no trace layer; MTP layers
  (layer number > num_layers) route live unless `mtp=MtpRouting.REPLAY`. A trace without a router's layer is an
  error naming the layer;
- detects the stage itself (a call while autograd runs a backward graph is the recompute, `replay_backward`), and
  sets the native action on that router's instance for that call;
- fills trace pad slots (padding, partial rows) from the live scores, then hands the ids to the native object:
  `target_topk_idx` for the forward, appended to `replay_backward_list` (FIFO, popped by the native recompute
  branch) only for micro-batches that will run backward;
- runs `r3rl.check.ReplayCheck` on every replayed call: live top-k (the native default top-k on the same scores,
  under no_grad) against the ids the native branch returned; evidence lines and verdict from `check.summary()`;
- verifies consumption at the end of `replay()`: a layer that was recomputed must have popped every queued forward;
- records (R2): `record()` keeps each router's ids per forward; `recorded_batch(call)` lays them out for replay.
A pipeline stage of dense layers only is declared with `dense_stage=True` (a no-op whose check still reports).

Per step:
    r3 = MegatronReplay(model_chunks, num_layers=cfg.num_layers, moe_layer_freq=cfg.moe_layer_freq, check=check)
    with r3.replay():                       # around forward_backward_func
        ...                                 # in forward_step_func, per micro-batch, before model(...):
        r3.set_micro_batch(rank_router_batch(traces, layout))
    check.summary()                         # evidence lines; AssertionError above the threshold

Patches are instance attributes on the native RouterReplay objects, removed when the context exits.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from r3rl.check import ReplayCheck, Stage
from r3rl.megatron.layout import moe_layer_numbers
from r3rl.replay import ReplayMode, current_stage, fill_pad_slots
from r3rl.trace import ReplayBatch, pad_value_for

try:
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("r3rl.megatron.replay needs megatron-core: pip install 'r3rl[megatron]'") from exc

__all__ = ["MtpRouting", "MegatronReplayError", "RouterSite", "MegatronReplay", "layer_map"]

logger = logging.getLogger(__name__)

_ACTION = {Stage.REPLAY_FORWARD: RouterReplayAction.REPLAY_FORWARD,
           Stage.REPLAY_BACKWARD: RouterReplayAction.REPLAY_BACKWARD}


class MtpRouting(enum.Enum):
    LIVE = "live"  # MTP layers route freely (rollout engines do not trace them)
    REPLAY = "replay"  # MTP layer j (1-based) reads trace layer num_moe_layers + j - 1


class MegatronReplayError(RuntimeError):
    """The model, the trace and the replay do not fit together (names the layer)."""


@dataclass
class RouterSite:
    """One replayed mcore router: its decoder layer number, the trace layer it reads, its native RouterReplay."""

    router: nn.Module
    layer_number: int
    trace_layer: int
    native: RouterReplay
    valid_fifo: collections.deque = field(default_factory=collections.deque)  # pad masks queued with native ids
    recorded: list[torch.Tensor] = field(default_factory=list)
    backward_calls: int = 0


def layer_map(num_layers: int, moe_layer_freq: int | Sequence[int] = 1, *, mtp_num_layers: int = 0,
              mtp: MtpRouting = MtpRouting.LIVE) -> dict[int, int]:
    """{decoder layer number: trace layer}: the k-th MoE decoder layer reads trace layer k; with MtpRouting.REPLAY,
    MTP layer j (mcore numbers its layer num_layers + j) reads trace layer num_moe_layers + j - 1."""
    numbers = moe_layer_numbers(num_layers, moe_layer_freq)
    out = {n: i for i, n in enumerate(numbers)}
    if mtp is MtpRouting.REPLAY:
        out.update({num_layers + j: len(numbers) + j - 1 for j in range(1, mtp_num_layers + 1)})
    return out


class MegatronReplay:
    """Record / replay for the mcore routers in `model` (one module or a list of model chunks)."""

    def __init__(self, model: nn.Module | Sequence[nn.Module], *, num_layers: int,
                 moe_layer_freq: int | Sequence[int] = 1, trace_layers: int | None = None,
                 mtp: MtpRouting = MtpRouting.LIVE, check: ReplayCheck | None = None,
                 layers: dict[int, int] | None = None, dense_stage: bool = False) -> None:
        """`num_layers` / `moe_layer_freq`: the model's TransformerConfig (the whole model, not one stage).
        `trace_layers`: layers in the traces this replay will get (default: every mapped layer), validated here so
        that a trace lacking a stage's layer fails before the first forward. `layers` overrides the map.
        `dense_stage`: this rank's chunks hold no MoE layer (a pipeline stage of dense layers only); replay is then a
        no-op and the check observes nothing, but still takes part in `summary(over_ranks=True)`."""
        chunks = [model] if isinstance(model, nn.Module) else list(model)
        self.num_layers = num_layers
        routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
        if bool(routers) == dense_stage:
            raise MegatronReplayError(f"dense_stage={dense_stage} but the model chunks hold {len(routers)} megatron "
                                      "TopKRouter(s)" + ("" if routers else ": pass dense_stage=True on a pipeline "
                                                         "stage without MoE layers"))
        mtp_numbers = sorted(r.layer_number for r in routers if r.layer_number and r.layer_number > num_layers)
        mapping = layers if layers is not None else layer_map(
            num_layers, moe_layer_freq, mtp_num_layers=len(mtp_numbers), mtp=mtp)
        self.trace_layers = trace_layers if trace_layers is not None else max(mapping.values(), default=-1) + 1
        self.sites: list[RouterSite] = []
        self.live_layers: list[int] = []  # routers left live (MTP under MtpRouting.LIVE)
        for router in routers:
            self._add_site(router, mapping, mtp)
        self.top_k = routers[0].topk if routers else (check.top_k if check is not None else None)
        self.check = check
        if check is not None and (check.num_layers, check.top_k) != (self.trace_layers, self.top_k):
            raise MegatronReplayError(f"ReplayCheck does not fit the replay: got (layers, top_k)="
                                      f"{(check.num_layers, check.top_k)}, expected={(self.trace_layers, self.top_k)}")
        self._mode = ReplayMode.OFF
        self._batch: ReplayBatch | None = None
        self._will_backward = False

    # --- per step / per micro-batch -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def replay(self) -> Iterator[MegatronReplay]:
        """Replay mode for the routers; call `set_micro_batch` before each micro-batch's forward. On exit: the
        native state is cleared, and every recomputed layer must have consumed each queued forward once."""
        with self._patched(ReplayMode.REPLAY):
            yield self
        self._check_consumption()

    @contextlib.contextmanager
    def record(self) -> Iterator[dict[int, list[torch.Tensor]]]:
        """Record mode (R2, or reading mcore's routing): yields {trace layer: [ids_TK per forward call]}."""
        with self._patched(ReplayMode.RECORD):
            yield {s.trace_layer: s.recorded for s in self.sites}

    def recorded_batch(self, call: int = 0, *, num_experts: int) -> ReplayBatch:
        """R2: what `record()` saw in its `call`-th forward, as a batch for `set_micro_batch`. Trace layers without a
        router on this rank (other pipeline stages, live MTP layers) are pad."""
        if not self.sites or any(len(s.recorded) <= call for s in self.sites):
            raise MegatronReplayError(f"no recorded forward #{call} on every router: recorded "
                                      f"{ {s.layer_number: len(s.recorded) for s in self.sites} }")
        first = self.sites[0].recorded[call]
        pad = pad_value_for(num_experts)
        ids = torch.full((first.shape[0], self.trace_layers, first.shape[1]), pad, dtype=torch.long,
                         device=first.device)
        for site in self.sites:
            ids[:, site.trace_layer] = site.recorded[call]
        missing = len({s.trace_layer for s in self.sites}) < self.trace_layers
        return ReplayBatch.from_tensor(ids, num_experts, pad_value=pad if missing else None)

    def set_micro_batch(self, batch: ReplayBatch, *, will_backward: bool | None = None) -> None:
        """The ids `[T, L, K]` (this rank's router order, `rank_router_batch`) of the next micro-batch's forward.
        `will_backward` (default: grad mode now): its ids are queued for the recompute during backward."""
        if self._mode is not ReplayMode.REPLAY:
            raise MegatronReplayError("set_micro_batch outside replay(): open `with replay.replay():` first")
        if not self.sites:  # a dense-only stage, or every router left live
            return
        if batch.num_layers < self.trace_layers:
            raise MegatronReplayError(
                f"trace has {batch.num_layers} layers, the replay needs {self.trace_layers} (decoder layers "
                f"{sorted(s.layer_number for s in self.sites if s.trace_layer >= batch.num_layers)} read trace layers "
                f">= {batch.num_layers})")
        if batch.top_k != self.top_k:
            raise MegatronReplayError(f"trace top_k={batch.top_k}, the routers' moe_router_topk={self.top_k}")
        device = self.sites[0].router.weight.device
        self._batch = batch.to(device)
        self._will_backward = torch.is_grad_enabled() if will_backward is None else will_backward

    # --- private ------------------------------------------------------------------------------------------------
    def _add_site(self, router: nn.Module, mapping: dict[int, int], mtp: MtpRouting) -> None:
        n = router.layer_number
        if n is None:
            raise MegatronReplayError("an mcore router has no layer_number (set by its TransformerLayer): cannot key "
                                      "replay by layer")
        if router.router_replay is None:
            raise MegatronReplayError(f"router of decoder layer {n} has no RouterReplay: build the model with "
                                      "TransformerConfig(moe_enable_routing_replay=True)")
        cfg = router.config
        if cfg.moe_router_fusion or router.routing_type == "sinkhorn":
            # topk_routing_with_score_function returns the fused kernel's top-k before it reaches router_replay, and
            # sinkhorn routing never calls it: replay would be skipped without a word
            raise MegatronReplayError(f"router of decoder layer {n} bypasses RouterReplay (moe_router_fusion="
                                      f"{cfg.moe_router_fusion}, load balancing {router.routing_type!r}): use the "
                                      "unfused top-k router")
        if cfg.moe_expert_capacity_factor is not None:
            logger.warning("router of decoder layer %d drops tokens after the replayed top-k "
                           "(moe_expert_capacity_factor=%s): the experts used may differ from the trace", n,
                           cfg.moe_expert_capacity_factor)
        if n > self.num_layers and mtp is MtpRouting.LIVE:
            self.live_layers.append(n)
            logger.info("MTP router at layer number %d routes live (mtp=%s)", n, mtp.value)
            return
        if n not in mapping:
            raise MegatronReplayError(f"router of decoder layer {n} is not a MoE layer of the trace map "
                                      f"{sorted(mapping)} (moe_layer_freq or the MTP policy disagree with the model)")
        if mapping[n] >= self.trace_layers:
            kind = "MTP" if n > self.num_layers else "MoE"
            raise MegatronReplayError(f"trace has {self.trace_layers} layers but the {kind} router of decoder layer "
                                      f"{n} reads trace layer {mapping[n]}")
        self.sites.append(RouterSite(router=router, layer_number=n, trace_layer=mapping[n],
                                     native=router.router_replay))

    @contextlib.contextmanager
    def _patched(self, mode: ReplayMode) -> Iterator[None]:
        if self._mode is not ReplayMode.OFF:
            raise MegatronReplayError(f"{mode.value} inside {self._mode.value}: one mode at a time")
        for site in self.sites:
            site.native.clear_indices()
            site.valid_fifo.clear()
            if mode is ReplayMode.RECORD:  # a recording lives until the next record(), for `recorded_batch`
                site.recorded.clear()
            site.backward_calls = 0
            site.native.get_replay_topk = self._wrapper(site)  # instance attribute: the class method is back on exit
        self._mode = mode
        try:
            yield
        finally:
            self._mode, self._batch = ReplayMode.OFF, None
            for site in self.sites:
                del site.native.get_replay_topk
                site.native.clear_router_replay_action()

    def _wrapper(self, site: RouterSite):
        native_topk = type(site.native).get_replay_topk.__get__(site.native)

        def get_replay_topk(scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
            return self._routed(site, native_topk, scores, topk, num_groups, group_topk, default_compute_topk)

        return get_replay_topk

    def _routed(self, site: RouterSite, native_topk, scores, topk, num_groups, group_topk, default_compute_topk):
        stage = current_stage()
        if self._mode is ReplayMode.RECORD:
            site.native.set_router_replay_action(RouterReplayAction.RECORD)
            probs, ids_TK = native_topk(scores, topk, num_groups, group_topk, default_compute_topk)
            if stage is Stage.REPLAY_FORWARD:  # a recompute in backward must not record twice
                site.recorded.append(ids_TK.detach())
            return probs, ids_TK
        live_TK = None
        needs_fill = stage is Stage.REPLAY_FORWARD and self._batch is not None and self._batch.has_pad
        if self.check is not None or needs_fill:  # without a check and pads, replay skips the top-k entirely
            with torch.no_grad():
                live_TK = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)[1]
        if stage is Stage.REPLAY_FORWARD:
            valid_TK = self._queue_forward(site, scores, live_TK)
        else:
            if not site.valid_fifo:
                raise MegatronReplayError(
                    f"recompute at decoder layer {site.layer_number} (trace layer {site.trace_layer}) has no queued "
                    "replayed forward: its forward ran outside replay() or without will_backward")
            valid_TK = site.valid_fifo.popleft()
            site.backward_calls += 1
        site.native.set_router_replay_action(_ACTION[stage])
        probs, ids_TK = native_topk(scores, topk, num_groups, group_topk, default_compute_topk)
        if self.check is not None:
            self.check.observe(stage, site.trace_layer, live_TK, ids_TK, valid_TK)
            self.check.calls.add(stage, site.trace_layer, ids_TK.shape[0])
        return probs, ids_TK

    def _queue_forward(self, site: RouterSite, scores: torch.Tensor, live_TK: torch.Tensor) -> torch.Tensor | None:
        """This micro-batch's ids for the site's layer, pad slots filled, set as the native forward target."""
        batch = self._batch
        if batch is None:
            raise MegatronReplayError(f"router of decoder layer {site.layer_number} ran under replay() before "
                                      "set_micro_batch()")
        if batch.num_tokens != scores.shape[0]:
            raise MegatronReplayError(
                f"replay ids have {batch.num_tokens} tokens, the router of decoder layer {site.layer_number} sees "
                f"{scores.shape[0]} (layout: padding, CP zigzag or SP scatter disagree with the model's input)")
        ids_TK = batch.expert_ids[:, site.trace_layer, :]
        valid_TK = None
        if batch.has_pad:
            valid_TK = ids_TK != batch.pad_value
            if batch.partial_pad:
                ids_TK = fill_pad_slots(ids_TK, valid_TK, scores.detach())
            else:  # every pad row is all pad: the live top-k is the fill
                ids_TK = torch.where(valid_TK, ids_TK, live_TK)
        if self._will_backward:
            site.native.set_target_indices(ids_TK)  # native: forward target + appended to replay_backward_list
            site.valid_fifo.append(valid_TK)
        else:
            site.native.target_topk_idx = ids_TK  # no backward will pop it: keep the FIFO aligned
        return valid_TK

    def _check_consumption(self) -> None:
        errors = []
        for site in self.sites:
            left = len(site.native.replay_backward_list)
            if site.backward_calls and left:
                errors.append(f"decoder layer {site.layer_number}: {left} queued forward(s) never recomputed after "
                              f"{site.backward_calls} recompute(s)")
            site.native.clear_indices()
            site.valid_fifo.clear()
        if errors:
            raise MegatronReplayError("replay not consumed exactly once (recompute FIFO drift): " + "; ".join(errors))
