"""RoutingReplay: record or replay the experts chosen by every MoE router of one model instance.

    replay = RoutingReplay(model, check=ReplayCheck(...))   # patches the routers of *this* model
    with replay.record() as rec:                             # R2: old-policy forward
        old_logits = model(input_ids).logits
    with replay.replay(rec.batch()):                         # R2 update / R3: replay(layout_padded(traces, S))
        loss = loss_fn(model(input_ids).logits); loss.backward()
    replay.close()                                           # or use `with RoutingReplay(model) as replay:`

Modes are context managers: `off()` (the unpatched router, bit for bit), `record()`, `replay(batch)`.

Replay is keyed by layer, not by call order: the router of MoE layer l reads `batch.expert_ids[:, l, :]`, the rows
of the active micro-batch. An activation-checkpoint recompute during backward therefore reads the same slice; there
is no cursor that could drift. A call made while autograd runs a backward graph (the recompute) is stage
`replay_backward`, any other is `replay_forward`: the replay detects it, the caller never sets a stage.

Only the selection is replayed. The gate weights are the live router's probabilities at the replayed ids,
normalized the family's way (`r3rl.models.adapters`), so the router keeps receiving gradients. Pad slots in the
trace are filled with the live router's best experts not already in the row, never with duplicates.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from r3rl.check import CallCounts, ReplayCheck, Stage
from r3rl.models.adapters import BUILTIN_ADAPTERS, AdapterRegistry, RouterSite, find_routers, routed_forward
from r3rl.trace import ReplayBatch, RoutingTrace

__all__ = ["ReplayMode", "RoutingReplay", "RoutingReplayError", "Recording", "current_stage", "fill_pad_slots"]

logger = logging.getLogger(__name__)


class ReplayMode(enum.Enum):
    OFF = "off"
    RECORD = "record"
    REPLAY = "replay"


class RoutingReplayError(RuntimeError):
    """A replay input does not fit the forward it is replayed into."""


def current_stage() -> Stage:
    """`replay_backward` while autograd executes a backward graph (checkpoint recompute), else `replay_forward`."""
    return Stage.REPLAY_BACKWARD if torch._C._current_graph_task_id() != -1 else Stage.REPLAY_FORWARD


def fill_pad_slots(ids_TK: torch.Tensor, valid_TK: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
    """Replace pad slots by the highest-scoring experts not already in the row (no duplicates, miles #1002)."""
    T, K = ids_TK.shape
    E = probs_TE.shape[1]
    # Mark the row's valid experts in an [T, E + 1] table; pads land in the extra column and are dropped.
    taken_TE = torch.zeros(T, E + 1, dtype=torch.bool, device=ids_TK.device)
    taken_TE.scatter_(1, torch.where(valid_TK, ids_TK, E), True)
    candidates_TK = torch.topk(probs_TE.masked_fill(taken_TE[:, :E], float("-inf")), K, dim=-1).indices
    pad_rank_TK = (torch.cumsum((~valid_TK).long(), dim=-1) - 1).clamp_min(0)  # j-th pad slot takes candidate j
    return torch.where(valid_TK, ids_TK, candidates_TK.gather(1, pad_rank_TK))


class Recording:
    """Routing captured in `record` mode: per layer, the ids of each forward call in call order."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_experts = num_experts
        self.ids_per_layer: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def batch(self) -> ReplayBatch:
        """All recorded calls concatenated in call order: `[sum T, L, K]`, ready for `replay()` (R2)."""
        counts = {len(calls) for calls in self.ids_per_layer}
        if len(counts) != 1 or 0 in counts:
            raise RoutingReplayError(
                f"recording is incomplete: calls per layer={[len(c) for c in self.ids_per_layer]} (expected the same "
                "non-zero count for every MoE layer)"
            )
        ids_TLK = torch.stack([torch.cat(calls) for calls in self.ids_per_layer], dim=1)
        return ReplayBatch.from_tensor(ids_TLK, self.num_experts)

    def decode_traces(self, batch_size: int) -> list[RoutingTrace]:
        """Per-sample traces of a KV-cache rollout: a `[B, P]` prefill then `[B, 1]` decode calls, no padding."""
        per_layer = [torch.cat([c.view(batch_size, -1, c.shape[-1]) for c in calls], dim=1)
                     for calls in self.ids_per_layer]
        ids_BTLK = torch.stack(per_layer, dim=2).cpu()
        return [RoutingTrace.from_ids(ids_BTLK[b], self.num_experts, sample=b) for b in range(batch_size)]

    def traces(self, lengths: list[int], seq_len: int) -> list[RoutingTrace]:
        """Split a recorded right-padded `[B, seq_len]` forward into per-sample traces of `lengths[b] - 1` rows."""
        ids_BSLK = self.batch().expert_ids.view(len(lengths), seq_len, len(self.ids_per_layer), -1).cpu()
        return [RoutingTrace.from_ids(ids_BSLK[b, : n - 1], self.num_experts, sample=b) for b, n in enumerate(lengths)]


class RoutingReplay:
    """Off / record / replay for the routers of one model. Patches live in this object and are undone by close()."""

    def __init__(self, model: nn.Module, *, check: ReplayCheck | None = None, strict: bool = False,
                 adapters: AdapterRegistry = BUILTIN_ADAPTERS) -> None:
        self.model = model
        self.sites: list[RouterSite] = find_routers(model, adapters)
        self.strict = strict  # --ci-test: every layer replayed the same number of times, recompute never exceeds it
        self.num_layers = len(self.sites)
        self.top_k = self.sites[0].top_k
        self.num_experts = self.sites[0].num_experts
        self.decoder_layers = [site.decoder_layer for site in self.sites]  # for SGLang traces with dense layers
        self._mode = ReplayMode.OFF
        self._batch: ReplayBatch | None = None
        self._recording: Recording | None = None
        self._patched = False
        self.check = check  # validated; shares its call counts
        # Checkpointed forwards outside our context_fn: per layer, the grad-enabled replayed calls whose recompute may
        # still come (`_Pending`, one per call, owned by the forward's autograd graph), so that a recompute under the
        # wrong batch or mode is an error instead of silent live routing. Never reset by hand: an entry leaves when
        # its recompute runs or when its graph is freed (backward done, or the loss dropped).
        self._pending: list[weakref.WeakSet[_Pending]] = [weakref.WeakSet() for _ in range(self.num_layers)]
        self._context_id = 0  # bumped by every replay() entry
        self._in_checkpoint_fn = 0  # > 0 while a forward runs inside checkpoint_context_fn's forward context
        self._restoring = False  # True while a recompute runs under the replay state of its own forward
        self._model_checkpoints = True
        self._patch()

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._patched:
            for site in self.sites:
                del site.router.forward  # drop the instance attribute; the class forward is back
            self._patched = False

    def __enter__(self) -> RoutingReplay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def check(self) -> ReplayCheck | None:
        return self._check

    @check.setter
    def check(self, check: ReplayCheck | None) -> None:
        """Attach (or detach) a check. Replayed calls per (stage, layer) are then the check's own counts, which its
        step summary resets: each call is counted once, in `_replayed_forward`, with one reset."""
        if check is not None and (check.num_layers, check.top_k) != (self.num_layers, self.top_k):
            raise RoutingReplayError(
                f"ReplayCheck does not fit {type(self.model).__name__}: got (layers, top_k)="
                f"{(check.num_layers, check.top_k)}, expected={(self.num_layers, self.top_k)}"
            )
        self._check = check
        self.calls: CallCounts = check.calls if check is not None else CallCounts(self.num_layers)

    @property
    def mode(self) -> ReplayMode:
        return self._mode

    # --- modes --------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        with self._in_mode(ReplayMode.OFF):
            yield

    @contextlib.contextmanager
    def record(self) -> Iterator[Recording]:
        rec = Recording(self.num_layers, self.num_experts)
        with self._in_mode(ReplayMode.RECORD):
            self._recording = rec
            try:
                yield rec
            finally:
                self._recording = None

    @contextlib.contextmanager
    def replay(self, batch: ReplayBatch, *, live: Recording | None = None) -> Iterator[None]:
        """Replay `batch` (`[N, L, K]` in the forward's token order) in every forward and recompute inside.

        `live`: also record, per first-pass call, the live router's top-k that the replay overrode (from the scores
        the adapter computed anyway: no second router run), e.g. to measure what R3 removed (`router_live_mismatch`).
        What the experts really used is read elsewhere, at their inputs (`r3rl.experts_tap`), never from here."""
        if batch.num_layers != self.num_layers or batch.top_k != self.top_k or batch.num_experts != self.num_experts:
            raise RoutingReplayError(
                f"replay batch does not fit {type(self.model).__name__}: got (layers, top_k, experts)="
                f"{(batch.num_layers, batch.top_k, batch.num_experts)}, expected="
                f"{(self.num_layers, self.top_k, self.num_experts)}"
            )
        device = self.sites[0].router.weight.device
        before = self.calls.snapshot()
        self._no_pending_from_earlier_context()
        with self._in_mode(ReplayMode.REPLAY):
            self._context_id += 1
            self._model_checkpoints = self._checkpointing_enabled()
            self._batch = batch.to(device)
            self._recording = live
            if self.check is not None:
                self.check.to(device)  # counters on the model's device before any call: all-reducible on every rank
            try:
                yield
            finally:
                self._batch = None
                self._recording = None
        if self.strict:
            self._check_consumption(before)

    def checkpoint_context_fn(self):
        """`context_fn` for `torch.utils.checkpoint` (non-reentrant): the recompute during backward runs under the
        replay state of its own forward (its batch, or off/record), whatever context is active when backward runs.

        Pass it with `set_activation_checkpointing(model, True, context_fn=replay.checkpoint_context_fn)`. Then
        micro-batches may backpropagate after their `replay()` context closed, together, or twice (`retain_graph`).
        """
        # Class-based context managers: a second backward through the same graph re-enters the recompute one.
        return _CheckpointedForward(self), _RecomputeAs(self, self._mode, self._batch)  # captured at forward time

    # --- private ------------------------------------------------------------------------------------------------
    def _recompute_may_follow(self) -> bool:
        """A grad-enabled forward outside our context_fn, in a model that checkpoints: its recompute is unguarded."""
        return (torch.is_grad_enabled() and not self._in_checkpoint_fn and self.model.training
                and self._model_checkpoints)

    def _checkpointing_enabled(self) -> bool:
        """Whether the model checkpoints activations (read once per replay() entry, not per router call): HF's own
        switch, or torch's `checkpoint_wrapper` around any submodule (the FSDP2 style, which HF's flag misses)."""
        if any(type(m).__name__ == "CheckpointWrapper" for m in self.model.modules()):
            return True
        for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers >= 5.2x, then 5.17
            if hasattr(type(self.model), name):
                return bool(getattr(self.model, name))
        return True  # unknown model: assume it may, so recomputes stay guarded

    @contextlib.contextmanager
    def _in_mode(self, mode: ReplayMode) -> Iterator[None]:
        if not self._patched:
            raise RoutingReplayError("RoutingReplay is closed: create a new one for this model")
        if self._mode is not ReplayMode.OFF and mode is not ReplayMode.OFF:
            raise RoutingReplayError(f"cannot enter {mode.value} inside {self._mode.value}: modes do not nest")
        prev, self._mode = self._mode, mode
        try:
            yield
        finally:
            self._mode = prev

    def _patch(self) -> None:
        for site in self.sites:
            if "forward" in vars(site.router):
                raise RoutingReplayError(
                    f"router {site.name} is already patched: another RoutingReplay is attached to this model, or the "
                    "model was deep-copied while one was (copy models before attaching, or close() first)"
                )
            site.router.forward = functools.partial(self._router_forward, site)
        self._patched = True

    def _router_forward(self, site: RouterSite, hidden: torch.Tensor, *args, **kwargs):
        """The patched router forward. `args`/`kwargs`: what the family passes besides the hidden states (MiniMax-M2
        passes its MoE block's correction bias), handed to the original forward; under replay the adapter reads
        the same tensors from the site."""
        mode = self._mode
        if mode is ReplayMode.OFF:
            self._no_pending_recompute(site, "after the replay() context closed")
            return type(site.router).forward(site.router, hidden, *args, **kwargs)
        if mode is ReplayMode.RECORD:
            self._no_pending_recompute(site, "inside record()")
            out = type(site.router).forward(site.router, hidden, *args, **kwargs)
            if current_stage() is Stage.REPLAY_FORWARD:  # a recompute in backward must not record twice
                self._recording.ids_per_layer[site.layer].append(out[2].detach())
            return out
        return self._replayed_forward(site, hidden)

    def _replayed_forward(self, site: RouterSite, hidden: torch.Tensor):
        batch = self._batch
        layer = site.layer
        n_tokens = hidden.numel() // hidden.shape[-1]
        if n_tokens != batch.num_tokens:
            raise RoutingReplayError(
                f"replay token count mismatch at MoE layer {layer} ({site.name}): expected={batch.num_tokens} trace "
                f"rows in the active micro-batch, actual={n_tokens} tokens in this forward"
            )
        stage = current_stage()
        self.calls.add(stage, layer, n_tokens)
        track = False
        if stage is Stage.REPLAY_BACKWARD and not self._restoring:
            mine = next((p for p in self._pending[layer] if p.context_id == self._context_id), None)
            if mine is None:
                raise RoutingReplayError(
                    f"activation-checkpoint recompute at MoE layer {layer} ({site.name}) has no matching forward under "
                    "this replay batch: it recomputes a forward that ran under another replay() context (e.g. a "
                    "previous micro-batch), so it would replay the wrong routing. Call backward() inside the replay() "
                    "context of each micro-batch, or checkpoint with context_fn=replay.checkpoint_context_fn. "
                    "(Reentrant checkpointing, use_reentrant=True, is not supported: its first pass runs without "
                    "grad; transformers' default is non-reentrant.)"
                )
            mine.consume()
        elif stage is Stage.REPLAY_FORWARD and self._recompute_may_follow():
            track = True
        replay_TK = batch.expert_ids[:, layer, :]
        check, live = self.check, self._recording

        def select(probs_TE: torch.Tensor) -> torch.Tensor:
            probs_TE = probs_TE.detach()  # selection is not differentiable: keep it out of the autograd graph
            K = replay_TK.shape[1]
            # The live top-k reuses the scores the adapter computed (no second router): the check compares with
            # it, and rows that are all pad take it as is.
            shortcut = batch.has_pad and not batch.partial_pad
            want_live = check is not None or shortcut or (live is not None and stage is Stage.REPLAY_FORWARD)
            live_TK = torch.topk(probs_TE, K, dim=-1).indices if want_live else None
            valid_TK = replay_TK != batch.pad_value if batch.has_pad else None
            if valid_TK is None:
                ids_TK = replay_TK
            elif batch.partial_pad:
                ids_TK = fill_pad_slots(replay_TK, valid_TK, probs_TE)
            else:  # every pad row is all pad: the fill is the live top-k, no dedupe needed
                ids_TK = torch.where(valid_TK, replay_TK, live_TK)
            if check is not None:
                check.observe(stage, layer, live_TK, ids_TK, valid_TK)
            if live is not None and stage is Stage.REPLAY_FORWARD:
                live.ids_per_layer[layer].append(live_TK)
            return ids_TK

        out = routed_forward(site, hidden, select)
        if track:
            self._track_pending(layer, out[1])
        return out

    def _track_pending(self, layer: int, weights_TK: torch.Tensor) -> None:
        """Register a recompute that may come; the entry lives in the forward's graph and leaves with it."""
        if weights_TK.grad_fn is None:  # nothing here is differentiable: no backward, so no recompute
            return
        pending = _Pending(self._pending[layer], self._context_id)
        weights_TK.grad_fn.metadata.setdefault("r3rl_pending", []).append(pending)

    def _no_pending_from_earlier_context(self) -> None:
        for layer, entries in enumerate(self._pending):
            if entries:
                raise RoutingReplayError(
                    f"a forward under an earlier replay() context has not run its backward yet ({len(entries)} router "
                    f"call(s) pending at MoE layer {layer}): its activation-checkpoint recompute would run under the "
                    "new batch and replay the wrong routing. Run each micro-batch's backward inside its own "
                    "`with replay.replay(batch):` (or drop the loss you will not backpropagate), or checkpoint "
                    "with "
                    "context_fn=replay.checkpoint_context_fn, which replays every recompute with its own batch."
                )

    def _no_pending_recompute(self, site: RouterSite, where: str) -> None:
        if self._restoring:
            return
        if self._pending[site.layer] and current_stage() is Stage.REPLAY_BACKWARD:
            raise RoutingReplayError(
                f"activation-checkpoint recompute at MoE layer {site.layer} ({site.name}) ran {where}, so it would "
                "route live instead of replaying the forward's experts: call backward() inside "
                "`with replay.replay(batch):`, or checkpoint with context_fn=replay.checkpoint_context_fn"
            )

    def _check_consumption(self, before: dict[Stage, list[int]]) -> None:
        fwd = [a - b for a, b in zip(self.calls[Stage.REPLAY_FORWARD], before[Stage.REPLAY_FORWARD], strict=True)]
        bwd = [a - b for a, b in zip(self.calls[Stage.REPLAY_BACKWARD], before[Stage.REPLAY_BACKWARD], strict=True)]
        if len(set(fwd)) != 1 or fwd[0] == 0:
            raise RoutingReplayError(
                f"ci-test: replay was not consumed once per layer per forward: forward calls per layer={fwd}"
            )
        if any(b > f for b, f in zip(bwd, fwd, strict=True)):
            raise RoutingReplayError(
                f"ci-test: more recompute calls than forward calls: backward={bwd}, forward={fwd}"
            )


class _Pending:
    """One replayed router call whose checkpoint recompute may still come. Only the forward's autograd graph holds
    it (`grad_fn.metadata`; the replay's set is weak), so it leaves the set when its recompute consumes it or when
    the graph is freed."""

    def __init__(self, entries: weakref.WeakSet[_Pending], context_id: int) -> None:
        self.entries, self.context_id = entries, context_id
        entries.add(self)

    def consume(self) -> None:
        self.entries.discard(self)


class _CheckpointedForward:
    """Marks forwards whose recompute `_RecomputeAs` will guard (no pending-recompute bookkeeping needed)."""

    def __init__(self, replay: RoutingReplay) -> None:
        self.replay = replay

    def __enter__(self) -> None:
        self.replay._in_checkpoint_fn += 1

    def __exit__(self, *exc) -> None:
        self.replay._in_checkpoint_fn -= 1


class _RecomputeAs:
    """Runs a recompute under the replay mode and batch its forward saw; re-entrant (retain_graph backwards)."""

    def __init__(self, replay: RoutingReplay, mode: ReplayMode, batch: ReplayBatch | None) -> None:
        self.replay, self.mode, self.batch = replay, mode, batch
        self.saved: list[tuple] = []

    def __enter__(self) -> None:
        r = self.replay
        self.saved.append((r._mode, r._batch, r._restoring))
        r._mode, r._batch, r._restoring = self.mode, self.batch, True

    def __exit__(self, *exc) -> None:
        r = self.replay
        r._mode, r._batch, r._restoring = self.saved.pop()
