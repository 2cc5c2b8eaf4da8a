"""Batch: rollout samples laid out for training forwards, in micro-batches, with their routing in the same order.

    mbs = make_micro_batches(samples, advantages=adv, layout=Layout.PACKED, max_tokens=4096, pad_id=256)
    for mb in mbs:
        with replay.replay(mb.replay):                       # R3: the rollout trace, row for row
            logits_TV = mb.response_logits(model(**mb.model_inputs()).logits)
            logp_T = token_logprobs(logits_TV, mb.target_ids, temperature)

Only this module knows layouts; replay and the losses never do. Each micro-batch carries the model inputs (token
ids, position ids, attention mask or packing), the response tokens as flat `[T]` tensors in sample order (where
their logits sit in the forward, the target ids, the sample each belongs to, rollout log-probs, advantages) and the
`ReplayBatch` whose rows follow the forward's flattened token order.

Layouts:
  - PADDED: `[B, S]` right-padded to the longest sample of the micro-batch, with an attention mask;
  - PACKED: `[1, sum(len)]`, samples back to back, position ids restarting at 0 per sample and no attention mask,
    so transformers builds a block-diagonal causal mask (`use_cache=False` is required for that); for a family whose
    forward builds its masks without the position ids (GPT-OSS), `layer_masks` builds them (block-diagonal) and
    passes the mapping. `plan_layout(model, layout)` says which layout a model trains in: a family that cannot be
    packed correctly (Qwen3-Next's linear attention) is trained padded, and the plan says so once in the log.
Logits at position t predict token t+1: response token j of a sample is predicted at position
`len(prompt) + j - 1`.

Tensor suffixes: B samples, S positions, T response tokens, V vocabulary, L layers, K top-k.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from r3rl.models.adapters import find_routers
from r3rl.models.packing import LayerMasks, Packing, model_packing
from r3rl.sample import Sample
from r3rl.trace import (
    ReplayBatch,
    RoutingTrace,
    TraceError,
    common_shape,
    compact_dtype,
    has_partial_rows,
    pad_value_for,
)

__all__ = ["Layout", "LayoutPlan", "MicroBatch", "make_micro_batches", "plan_layout", "token_logprobs",
           "response_logprobs",
           "layout_padded", "layout_packed"]

logger = logging.getLogger(__name__)


class Layout(enum.StrEnum):
    PADDED = "padded"
    PACKED = "packed"
    AUTO = "auto"  # packed where the attention skips other samples' tokens, else padded (plan_layout)


VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")
"""transformers attention implementations that keep packed samples apart without a dense [T, T] mask (varlen
kernels, flex's block mask). Any other (sdpa, eager) reads a packed row of T tokens through a dense mask: attention
over the whole row, (sum of lengths)^2, where padding costs batch * longest^2."""


@dataclass(kw_only=True)
class MicroBatch:
    layout: Layout
    sample_indices: list[int]
    """Position of each sample in the step's sample list."""
    lengths: list[int]
    """Tokens (prompt + response) per sample."""
    input_ids_BS: torch.Tensor
    position_ids_BS: torch.Tensor
    attention_mask_BS: torch.Tensor | None
    """PADDED: 1 on real tokens. PACKED: None (packing is read from the position ids)."""
    target_pos_T: torch.Tensor
    """Flat index into `[B * S]` of the logits that predict each response token."""
    target_ids_T: torch.Tensor
    seq_idx_T: torch.Tensor
    """Micro-batch-local sample index (0..B-1) of each response token."""
    target_counts: list[int]
    """Response tokens per sample (the rows of `seq_idx_T` are grouped by sample, in this order): splits per-token
    tensors into per-sample ones without a device sync."""
    rollout_logp_T: torch.Tensor
    advantages_T: torch.Tensor
    replay: ReplayBatch | None
    """Routing to replay, rows in the forward's flattened token order; None when the samples have no trace."""
    layer_masks: Callable[[torch.Tensor], dict] | None = None
    """PACKED, for a family whose forward builds its masks without the position ids: position ids -> the
    {layer type: block-diagonal mask} mapping passed as `attention_mask` (built on the forward's device)."""
    is_padding: bool = False
    """A repeat that only keeps ranks in step (every FSDP forward is a collective): its outputs are discarded and
    its loss weighs nothing."""

    @property
    def num_seqs(self) -> int:
        return len(self.sample_indices)

    @property
    def num_response_tokens(self) -> int:
        return int(self.target_ids_T.numel())

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def computed_tokens(self) -> int:
        """Token positions the forward computes: padded B * longest, packed the sum of lengths."""
        return int(self.input_ids_BS.numel())

    def to(self, device: torch.device | str) -> MicroBatch:
        move = {name: getattr(self, name).to(device, non_blocking=True) for name in
                ("input_ids_BS", "position_ids_BS", "target_pos_T", "target_ids_T", "seq_idx_T", "rollout_logp_T",
                 "advantages_T")}
        mask = None if self.attention_mask_BS is None else self.attention_mask_BS.to(device, non_blocking=True)
        return replace(self, attention_mask_BS=mask, **move)

    def with_replay(self, traces: Sequence[RoutingTrace]) -> MicroBatch:
        """The same micro-batch replaying `traces` (one per sample, e.g. R2's recordings) in this layout."""
        return replace(self, replay=_layout(self.layout, traces, self.lengths, self.input_ids_BS.shape[1]))

    def model_inputs(self) -> dict:
        kwargs = {"input_ids": self.input_ids_BS, "position_ids": self.position_ids_BS, "use_cache": False}
        if self.attention_mask_BS is not None:
            kwargs["attention_mask"] = self.attention_mask_BS
        elif self.layer_masks is not None and self.layout is Layout.PACKED:
            kwargs["attention_mask"] = self.layer_masks(self.position_ids_BS)
        return kwargs

    def response_logits(self, logits_BSV: torch.Tensor) -> torch.Tensor:
        """The logits that predict the response tokens, `[T, V]`, in sample order (the training forwards go through
        `response_logprobs`, which takes the same rows)."""
        return logits_BSV.reshape(-1, logits_BSV.shape[-1]).index_select(0, self.target_pos_T)

    def split_routing(self, expert_ids_NLK: torch.Tensor, num_experts: int) -> list[RoutingTrace]:
        """Routing recorded over this micro-batch's forward (`[B * S, L, K]`) back into per-sample traces of
        `len - 1` rows (R2: the update may repack samples differently, each still replays its own routing)."""
        ids = expert_ids_NLK.detach().cpu()
        traces = []
        offset = 0
        width = self.input_ids_BS.shape[1]
        for b, n in enumerate(self.lengths):
            start = offset if self.layout is Layout.PACKED else b * width
            traces.append(RoutingTrace.from_ids(ids[start : start + n - 1], num_experts, sample=self.sample_indices[b]))
            offset += n
        return traces


def make_micro_batches(
    samples: Sequence[Sample],
    *,
    advantages: Sequence[float],
    layout: Layout = Layout.PADDED,
    micro_batch_size: int | None = None,
    max_tokens: int | None = None,
    pad_id: int = 0,
    sample_indices: Sequence[int] | None = None,
    traces: Sequence[RoutingTrace | None] | None = None,
    layer_masks: Callable[[torch.Tensor], dict] | None = None,
    by_length: bool = False,
    budget_name: str = "max_tokens",
) -> list[MicroBatch]:
    """Split samples into micro-batches of at most `micro_batch_size` samples and/or `max_tokens` tokens (padded:
    B * longest; packed: sum of lengths), in order, or with `by_length` longest first, so that each padded
    micro-batch holds samples of like length and pads to less (each keeps its `sample_indices`; the gradient is the
    same sum). `traces` overrides `Sample.trace` (R2 recordings); `layer_masks` is `LayoutPlan.layer_masks` (packed
    micro-batches of a LAYER_MASKS family); `budget_name` names the budget in the error for a sample above it."""
    if len(advantages) != len(samples):
        raise ValueError(f"one advantage per sample: got {len(advantages)} advantages for {len(samples)} samples")
    if micro_batch_size is None and max_tokens is None:
        raise ValueError("micro-batches need micro_batch_size or max_tokens")
    if Layout(layout) is Layout.AUTO:
        raise ValueError("make_micro_batches needs a concrete layout (packed or padded): resolve auto with "
                         "plan_layout(model, Layout.AUTO) first")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1: got {micro_batch_size}")
    indices = list(range(len(samples))) if sample_indices is None else list(sample_indices)
    traces = [s.trace for s in samples] if traces is None else list(traces)
    for i, s in enumerate(samples):
        if not s.response_ids or (s.loss_mask is not None and not any(s.loss_mask)):
            raise ValueError(f"sample {indices[i]} has an empty response (or an all-zero loss_mask): "
                             "nothing to train on")
        s.validate(index=indices[i])
    groups: list[list[int]] = []
    order = sorted(range(len(samples)), key=lambda i: -samples[i].num_tokens) if by_length else range(len(samples))
    for i in order:
        s = samples[i]
        group = groups[-1] if groups else None
        if group is not None and _fits(group + [i], samples, layout, micro_batch_size, max_tokens):
            group.append(i)
        else:
            if max_tokens is not None and not _fits([i], samples, layout, None, max_tokens):
                raise ValueError(f"sample {indices[i]} has {s.num_tokens} tokens: more than the micro-batch token "
                                 f"budget {budget_name}={max_tokens}")
            groups.append([i])
    return [replace(_build(layout, [samples[i] for i in g], [float(advantages[i]) for i in g], [indices[i] for i in g],
                           [traces[i] for i in g], pad_id), layer_masks=layer_masks) for g in groups]


@dataclass(frozen=True)
class LayoutPlan:
    """The layout a model trains in, and what its packed forwards need."""

    layout: Layout
    layer_masks: Callable[[torch.Tensor], dict] | None = None
    """Pass to `make_micro_batches` (a LAYER_MASKS family, packed)."""
    packing: Packing = Packing.POSITION_IDS
    """The family's packing (its adapters' property)."""


def plan_layout(model, layout: Layout, *, dtype: torch.dtype = torch.float32, log: bool = True) -> LayoutPlan:
    """The layout `model` trains in when `layout` is asked for. AUTO is packed under a varlen attention
    (VARLEN_ATTENTION), else padded: on the embedded default (sdpa, CPU) the update took 38.6 s padded against 77.5 s
    packed over 200 steps, and the whole run 2:07 against 3:04. Packed stays packed where the family keeps packed
    samples apart (position ids, or the layer masks built here); a family that cannot (`Packing.NONE`) is trained
    padded, and this says so once (`log`), never packing it silently wrong. `dtype`: the forward's compute dtype."""
    sites = find_routers(model)
    packing = model_packing(sites)
    if layout is Layout.AUTO:
        attn = str(getattr(model.config, "_attn_implementation", None) or "sdpa")
        if not any(v in attn for v in VARLEN_ATTENTION):
            if log:
                logger.info("layout: padded (auto: %s attention would read a packed row through a dense mask over "
                            "all its tokens; --layout packed to pack anyway)", attn)
            return LayoutPlan(layout=Layout.PADDED, packing=packing)
        layout = Layout.PACKED
    if layout is not Layout.PACKED:
        return LayoutPlan(layout=layout, packing=packing)
    family = sites[0].adapter.family
    if packing is Packing.NONE:
        if log:
            logger.warning("layout: %s (%s) cannot be packed correctly with transformers (its linear-attention state "
                           "crosses sample boundaries): training with the padded layout instead of packed",
                           type(model).__name__, family)
        return LayoutPlan(layout=Layout.PADDED, packing=packing)
    if packing is Packing.LAYER_MASKS:
        if log:
            logger.info("layout: packed, with block-diagonal layer masks built by r3rl for %s (%s): its forward does "
                        "not read sample boundaries from the position ids", type(model).__name__, family)
        return LayoutPlan(layout=layout, layer_masks=LayerMasks(model.config, dtype=dtype), packing=packing)
    return LayoutPlan(layout=layout, packing=packing)


def token_logprobs(logits_TV: torch.Tensor, target_ids_T: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) under softmax(logits / temperature), in float32: the distribution the rollout sampled from."""
    logits = logits_TV.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, target_ids_T[:, None]).squeeze(-1)


def response_logprobs(logits_BSV: torch.Tensor, target_pos_T: torch.Tensor, target_ids_T: torch.Tensor,
                      temperature: float = 1.0, entropy: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The response tokens' log-probs (`token_logprobs` of the rows `target_pos_T` of the flattened logits) and, with
    `entropy` "grad" or "detached", the entropy of softmax(logits) at each of them, else None. One function for the
    training forwards' head, so that `--compile` fuses the row gather, the float32 log-softmax, the target gather and
    the entropy into a few reductions over the vocabulary (no [T, V] float32 copies)."""
    from r3rl.train.losses import entropy_from_logits

    logits_TV = logits_BSV.reshape(-1, logits_BSV.shape[-1]).index_select(0, target_pos_T)
    logp_T = token_logprobs(logits_TV, target_ids_T, temperature)
    if entropy is None:
        return logp_T, None
    if entropy not in ("grad", "detached"):
        raise ValueError(f"entropy must be None, 'grad' or 'detached': got {entropy!r}")
    return logp_T, entropy_from_logits(logits_TV if entropy == "grad" else logits_TV.detach())


# --- trace layouts: the ReplayBatch of one forward ---------------------------------------------------------------
def layout_padded(
    traces: Sequence[RoutingTrace],
    seq_len: int,
    *,
    lengths: Sequence[int] | None = None,
    left_pad: Sequence[int] | None = None,
) -> ReplayBatch:
    """Lay out traces for a padded `[B, seq_len]` forward, flattened to `[B * seq_len, L, K]`.

    Sample b's row i lands at position `left_pad[b] + i`. Positions without a row (padding, and the last token of
    each sample) are pad rows; replay lets the live router choose there. With `lengths` (tokens per sample), each
    trace is validated against its sample: `rows == lengths[b] - 1`.
    """
    num_layers, top_k, num_experts = common_shape(traces)
    for name, seq in (("lengths", lengths), ("left_pad", left_pad)):
        if seq is not None and len(seq) != len(traces):
            raise TraceError(f"padded layout needs one {name} entry per trace: got {len(seq)}, expected {len(traces)}")
    pad = pad_value_for(num_experts)
    out = np.full((len(traces), seq_len, num_layers, top_k), pad, dtype=compact_dtype(num_experts))
    for b, trace in enumerate(traces):
        if lengths is not None:
            trace.validate(num_tokens=lengths[b], sample=b)
        start = 0 if left_pad is None else left_pad[b]
        if start < 0:
            raise TraceError(f"left_pad must be >= 0 (sample {b}): got {start}")
        if start + trace.num_rows + 1 > seq_len:
            raise TraceError(
                f"sample does not fit the padded forward (sample {b}): left_pad={start} + tokens={trace.num_rows + 1}"
                f" > seq_len={seq_len}"
            )
        out[b, start : start + trace.num_rows] = trace.expert_ids
    # Every sample's last token has no row, so a padded layout always has pad rows.
    return ReplayBatch(expert_ids=torch.from_numpy(out.reshape(-1, num_layers, top_k)), pad_value=pad, has_pad=True,
                       num_experts=num_experts, validated=True,
                       partial_pad=any(has_partial_rows(t.pad_mask()) for t in traces))


def layout_packed(traces: Sequence[RoutingTrace], lengths: Sequence[int]) -> ReplayBatch:
    """Lay out traces for a packed forward: sample b occupies `lengths[b]` consecutive tokens (`rows + 1`)."""
    num_layers, top_k, num_experts = common_shape(traces)
    pad = pad_value_for(num_experts)
    if len(lengths) != len(traces):
        raise TraceError(f"packed layout needs one length per trace: got {len(lengths)} lengths, {len(traces)} traces")
    dtype = compact_dtype(num_experts)
    chunks = []
    for b, (trace, n) in enumerate(zip(traces, lengths, strict=True)):
        trace.validate(num_tokens=n, sample=b)
        chunks.append(trace.expert_ids)
        chunks.append(np.full((1, num_layers, top_k), pad, dtype=dtype))  # the last token has no row
    return ReplayBatch(expert_ids=torch.from_numpy(np.concatenate(chunks)), pad_value=pad, has_pad=True,
                       num_experts=num_experts, validated=True,
                       partial_pad=any(has_partial_rows(t.pad_mask()) for t in traces))



# --- private ------------------------------------------------------------------------------------------------------
def _fits(group: list[int], samples, layout: Layout, micro_batch_size: int | None, max_tokens: int | None) -> bool:
    if micro_batch_size is not None and len(group) > micro_batch_size:
        return False
    if max_tokens is None:
        return True
    lengths = [samples[i].num_tokens for i in group]
    used = sum(lengths) if layout is Layout.PACKED else len(lengths) * max(lengths)
    return used <= max_tokens


def _build(layout: Layout, samples: list[Sample], advantages: list[float], indices: list[int],
           traces: list[RoutingTrace | None], pad_id: int) -> MicroBatch:
    lengths = [s.num_tokens for s in samples]
    if layout is Layout.PACKED:
        ids = torch.tensor([t for s in samples for t in s.tokens]).view(1, -1)
        pos = torch.cat([torch.arange(n) for n in lengths]).view(1, -1)
        mask = None
        starts = torch.tensor([0, *lengths[:-1]]).cumsum(0).tolist()
    else:
        S = max(lengths)
        ids = torch.full((len(samples), S), pad_id, dtype=torch.long)
        mask = torch.zeros(len(samples), S, dtype=torch.long)
        for b, s in enumerate(samples):
            ids[b, : lengths[b]] = torch.tensor(s.tokens)
            mask[b, : lengths[b]] = 1
        pos = torch.arange(S).expand(len(samples), S).clone()
        starts = [b * S for b in range(len(samples))]
    target_pos, target_ids, seq_idx, rollout_logp, adv = [], [], [], [], []
    for b, s in enumerate(samples):
        P, R = len(s.prompt_ids), len(s.response_ids)
        keep = torch.arange(R) if s.loss_mask is None else torch.tensor(s.loss_mask).nonzero().flatten()  # model tokens
        target_pos.append(keep + starts[b] + P - 1)
        target_ids.append(torch.tensor(s.response_ids)[keep])
        seq_idx.append(torch.full((len(keep),), b))
        rollout_logp.append(torch.tensor(s.rollout_logprobs, dtype=torch.float32)[keep])
        adv.append(torch.full((len(keep),), advantages[b], dtype=torch.float32))
    have = [t is not None for t in traces]
    if any(have) and not all(have):
        missing = [indices[b] for b, h in enumerate(have) if not h]
        raise ValueError(f"some samples have no routing trace (samples {missing[:5]}): replay needs one per sample")
    replay = _layout(layout, traces, lengths, ids.shape[1]) if all(have) else None
    return MicroBatch(
        layout=layout, sample_indices=indices, lengths=lengths, input_ids_BS=ids, position_ids_BS=pos,
        attention_mask_BS=mask, target_pos_T=torch.cat(target_pos), target_ids_T=torch.cat(target_ids),
        seq_idx_T=torch.cat(seq_idx), target_counts=[len(t) for t in target_ids],
        rollout_logp_T=torch.cat(rollout_logp), advantages_T=torch.cat(adv), replay=replay,
    )


def _layout(layout: Layout, traces: Sequence[RoutingTrace], lengths: list[int], width: int) -> ReplayBatch:
    if layout is Layout.PACKED:
        return layout_packed(traces, lengths)
    return layout_padded(traces, seq_len=width, lengths=lengths)
