"""ReplayCheck: prove that replay happened and that the replayed experts are the ones the live router would pick.

For every replayed router call, `RoutingReplay` hands the check the live top-k (computed from the scores the
adapter already computed; the router never runs twice) and the replayed ids. The check keeps, on the device, one
histogram per (stage, layer) of rows by (overlap with the live top-k, valid slots), filled by one `scatter_add_`
per call, plus the sum of replayed ids. From it `summary()` derives rows checked (all-pad rows excluded), rows with
zero overlap, exact-set matches and the mean overlap fraction; it syncs once per step, logs the evidence lines and
returns a `CheckSummary` (JSON-ready). Above the threshold it logs up to 5 offending tokens with their neighbours, then
raises `AssertionError("R3 mismatch tokens (N) > threshold (M)")`.

Evidence (logger `r3rl`, INFO; byte-for-byte contracts grepped by regression jobs), one wrapper line per (stage,
MoE layer) that was replayed during the step and one check line per stage:
    R3 wrapper: replay_forward branch taken (rank R, n_tokens=N, topk=K, replay_idx_sum=S)
    R3 check (rank R, stage STAGE): n_tokens=N mismatch=M (P%)
In the wrapper line N counts the tokens that layer's router replayed this step (over all its calls) and S sums
the expert ids it replayed. In the check line N counts checked (token, layer) rows and M those with zero overlap.
A forward and its activation recompute replay the same rows, so when every replayed forward of the step was
recomputed the two stages' wrapper lines carry the same N and S (`r3rl check` also runs a no-grad replayed
forward, which is never recomputed, so there the forward line counts twice as much).

Tensor suffixes: T tokens, K top-k, S stages, L layers.
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["Stage", "CallCounts", "ReplayCheck", "CheckSummary", "LayerStats", "StageStats", "resolve_threshold",
           "DEFAULT_THRESHOLD"]

logger = logging.getLogger(__name__)
evidence_logger = logging.getLogger("r3rl")

DEFAULT_THRESHOLD = 1e-2
THRESHOLD_ENV_VARS = ("R3RL_TEST_R3_THRESHOLD", "MILES_TEST_R3_THRESHOLD")
_NEIGHBOURS = 3



class Stage(enum.StrEnum):
    REPLAY_FORWARD = "replay_forward"
    REPLAY_BACKWARD = "replay_backward"


class CallCounts:
    """Replayed router calls and the tokens they replayed, per (stage, MoE layer): host-side, known without a sync.

    One object per replay, one increment site and one reset: `RoutingReplay` adds every replayed call, and a
    `ReplayCheck` attached to it shares the object (`RoutingReplay(check=...)` adopts `check.calls`), reads it for
    the wrapper evidence lines and resets it with the step's `summary()`."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.reset()

    def reset(self) -> None:
        self.calls: dict[Stage, list[int]] = {s: [0] * self.num_layers for s in Stage}
        self.tokens: dict[Stage, list[int]] = {s: [0] * self.num_layers for s in Stage}

    def add(self, stage: Stage, layer: int, n_tokens: int) -> None:
        self.calls[stage][layer] += 1
        self.tokens[stage][layer] += n_tokens

    def __getitem__(self, stage: Stage) -> list[int]:
        """Calls per layer in `stage`."""
        return self.calls[stage]

    def snapshot(self) -> dict[Stage, list[int]]:
        return {s: list(c) for s, c in self.calls.items()}

    def all_reduce(self, device: torch.device) -> None:
        """Sum over ranks (collective: every rank calls it)."""
        host = torch.tensor([[self.calls[s] for s in Stage], [self.tokens[s] for s in Stage]], dtype=torch.int64,
                            device=device)
        torch.distributed.all_reduce(host)
        calls, tokens = host.tolist()
        self.calls = dict(zip(Stage, calls, strict=True))
        self.tokens = dict(zip(Stage, tokens, strict=True))


def resolve_threshold(flag_value: float | None = None) -> float:
    """`--r3-check-threshold` if given, else $R3RL_TEST_R3_THRESHOLD, else $MILES_TEST_R3_THRESHOLD, else 1e-2."""
    if flag_value is not None:
        value, source = flag_value, "--r3-check-threshold"
    else:
        value, source = DEFAULT_THRESHOLD, "default"
        for var in THRESHOLD_ENV_VARS:
            if os.environ.get(var):
                try:
                    value, source = float(os.environ[var]), var
                except ValueError:
                    raise ValueError(f"{var} must be a number: got {os.environ[var]!r}") from None
                break
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"R3 check threshold ({source}) is a fraction of tokens in [0, 1]: got {value}")
    return float(value)


@dataclass
class LayerStats:
    layer: int
    tokens: int
    zero_overlap: int
    exact_match: int
    mean_overlap: float


@dataclass
class StageStats:
    """One stage of one step: (token, layer) rows checked, those with zero overlap, replayed router calls."""

    tokens: int
    zero_overlap: int
    calls: int


@dataclass
class CheckSummary:
    """One step of the check. `stages` maps a stage name to its StageStats; `layers` aggregates stages."""

    rank: int
    threshold: float
    tokens_checked: int
    zero_overlap: int
    passed: bool
    stages: dict[str, StageStats] = field(default_factory=dict)
    layers: list[LayerStats] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class ReplayCheck:
    """Per-rank check state. Counters live on `device` and are all-reducible (`counters`)."""

    def __init__(
        self,
        num_layers: int,
        top_k: int,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        rank: int | None = None,
        device: torch.device | str = "cpu",
        max_examples: int = 5,
    ) -> None:
        self.num_layers = num_layers
        self.top_k = top_k
        self.threshold = threshold
        self.rank = _default_rank() if rank is None else rank
        self.max_examples = max_examples
        # Histogram per (stage, layer) of rows by (overlap o, valid slots n), flattened as o + n * (K + 1), plus the
        # summed replayed ids in the last column: every count the summary needs, from one scatter_add per call.
        self._width = (top_k + 1) ** 2
        self.counters = torch.zeros(len(Stage), num_layers, self._width + 1, dtype=torch.int64, device=device)
        self._ones = torch.ones(1, dtype=torch.int64, device=device)
        self.calls = CallCounts(num_layers)  # incremented by the RoutingReplay this check is attached to
        # (stage, layer) -> [first call, latest call]: row codes, live ids (int16), replayed ids; failure report only.
        self._examples: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.last_summary: CheckSummary | None = None

    # --- hot path (device only, no sync) -------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> ReplayCheck:
        """Keep the counters on `device` (the model's): every rank's counters are then all-reducible, also a rank's
        that observed nothing. RoutingReplay calls it when a replay() context opens."""
        device = torch.device(device)
        if self.counters.device != device:
            self.counters, self._ones = self.counters.to(device), self._ones.to(device)
        return self

    def observe(
        self,
        stage: Stage,
        layer: int,
        live_TK: torch.Tensor,
        replay_TK: torch.Tensor,
        valid_TK: torch.Tensor | None = None,
    ) -> None:
        """Compare one router call's live top-k with the replayed ids. `valid_TK` masks trace pad slots."""
        s, K = _stage_index(stage), replay_TK.shape[1]
        if self.top_k != K:  # a host-side shape check: the histogram is sized by top_k
            raise ValueError(f"ReplayCheck(top_k={self.top_k}) got a router call with top_k={K} at layer {layer}")
        if self.counters.device != live_TK.device:
            self.counters, self._ones = self.counters.to(live_TK.device), self._ones.to(live_TK.device)
        hit_TK = (replay_TK.unsqueeze(-1) == live_TK.unsqueeze(-2)).any(-1)  # replayed slot is in the live top-k
        if valid_TK is None:
            code_T = hit_TK.sum(-1) + K * (K + 1)  # every row has n = K valid slots
        else:
            code_T = (hit_TK & valid_TK).sum(-1) + valid_TK.sum(-1) * (K + 1)
        row = self.counters[s, layer]
        row[: self._width].scatter_add_(0, code_T, self._ones.expand_as(code_T))
        row[self._width :] += replay_TK.sum()
        if self.max_examples:
            # For the failure report: the first and the latest call of each (stage, layer), so memory stays bounded
            # (T * (8 + 2K) bytes each plus a view of the replayed ids) however many micro-batches a step has.
            entry = (code_T, live_TK.to(torch.int16), replay_TK)
            kept = self._examples.setdefault((s, layer), [])
            if len(kept) < 2:
                kept.append(entry)
            else:
                kept[1] = entry

    # --- once per step ---------------------------------------------------------------------------------------------
    def summary(self, *, raise_on_fail: bool = True, over_ranks: bool = False) -> CheckSummary:
        """Sync once, log the evidence lines, reset, and raise AssertionError above the threshold.

        `over_ranks` (multi-process runs; a collective, every rank calls it): the evidence lines carry this rank's
        own counts, then the counters are summed over ranks and the verdict is taken on the sums, so every rank
        reaches the same verdict and raises together."""
        counts = self.counters.cpu()  # note: the one host sync of the step
        stages, layers = self._stats(counts, log=True)
        if over_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
            self.all_reduce()
            stages, layers = self._stats(self.counters.cpu(), log=False)
        # The verdict is per stage: a recompute that diverged must not hide behind a clean forward.
        failing = {st: v for st, v in stages.items() if v.zero_overlap > self.threshold * v.tokens}
        summary = CheckSummary(
            rank=self.rank, threshold=self.threshold,
            tokens_checked=sum(v.tokens for v in stages.values()),
            zero_overlap=sum(v.zero_overlap for v in stages.values()),
            passed=not failing, stages=stages, layers=layers,
        )
        examples = self._examples
        self._reset()
        self.last_summary = summary
        if failing:
            self._warn_examples(examples)
            if raise_on_fail:
                worst = max(failing.values(), key=lambda v: v.zero_overlap / max(v.tokens, 1))
                raise AssertionError(
                    f"R3 mismatch tokens ({worst.zero_overlap}) > threshold ({self.threshold * worst.tokens:.2f})"
                )
        return summary

    def _stats(self, counts: torch.Tensor, *, log: bool) -> tuple[dict[str, StageStats], list[LayerStats]]:
        """Per-stage and per-layer statistics of host `counts`; `log`: emit the evidence lines."""
        K = self.top_k
        hist = counts[..., : self._width].view(len(Stage), self.num_layers, K + 1, K + 1).double()  # [S, L, n, o]
        o = torch.arange(K + 1, dtype=torch.float64)
        n = torch.arange(K + 1, dtype=torch.float64)
        checked = hist[:, :, 1:, :]  # rows with at least one valid slot
        tokens_SL = checked.sum((-1, -2))
        zero_SL = checked[..., 0].sum(-1)
        exact_SL = torch.stack([hist[:, :, i, i] for i in range(1, K + 1)], -1).sum(-1)
        overlap_SL = (checked * (o / n[1:, None].clamp_min(1))).sum((-1, -2))
        idx_sum_SL = counts[..., self._width]

        stages: dict[str, StageStats] = {}
        for stage in Stage:
            s, calls_L = _stage_index(stage), self.calls[stage]
            if not any(calls_L) and not tokens_SL[s].any():
                continue
            tokens, zero = int(tokens_SL[s].sum()), int(zero_SL[s].sum())
            if log:
                for layer in range(self.num_layers):
                    if calls_L[layer]:
                        evidence_logger.info(
                            "R3 wrapper: %s branch taken (rank %d, n_tokens=%d, topk=%d, replay_idx_sum=%d)",
                            stage.value, self.rank, self.calls.tokens[stage][layer], K, int(idx_sum_SL[s, layer]),
                        )
                evidence_logger.info(
                    "R3 check (rank %d, stage %s): n_tokens=%d mismatch=%d (%.2f%%)",
                    self.rank, stage.value, tokens, zero, 100.0 * zero / max(tokens, 1),
                )
            stages[stage.value] = StageStats(tokens=tokens, zero_overlap=zero, calls=sum(calls_L))

        layers = [
            LayerStats(
                layer=i, tokens=int(tokens_SL[:, i].sum()), zero_overlap=int(zero_SL[:, i].sum()),
                exact_match=int(exact_SL[:, i].sum()),
                mean_overlap=float(overlap_SL[:, i].sum() / tokens_SL[:, i].sum()) if tokens_SL[:, i].sum() else 0.0,
            )
            for i in range(self.num_layers)
        ]
        return stages, layers

    def all_reduce(self) -> None:
        """Sum the counters over ranks (every rank calls it before `summary()` for a global verdict)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        torch.distributed.all_reduce(self.counters)
        self.calls.all_reduce(self.counters.device)

    # --- private -----------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self.counters.zero_()
        self.calls.reset()
        self._examples = {}

    def _warn_examples(self, examples: dict) -> None:
        """Up to `max_examples` zero-overlap rows with their neighbours (failure path: syncs freely)."""
        shown, K = 0, self.top_k
        calls = [(s, layer, *entry) for (s, layer), kept in sorted(examples.items()) for entry in kept]
        for s, layer, code_T, live_TK, replay_TK in calls:
            code = code_T.cpu()
            zero_T = (code // (K + 1) > 0) & (code % (K + 1) == 0)
            live, replay = live_TK.cpu(), replay_TK.cpu()
            for t in torch.nonzero(zero_T).flatten().tolist():
                lo, hi = max(0, t - _NEIGHBOURS), min(len(code), t + _NEIGHBOURS + 1)
                rows = "; ".join(
                    f"{'>' if i == t else ' '}tok {i}: orig={sorted(live[i].tolist())} "
                    f"replay={sorted(replay[i].tolist())}"
                    for i in range(lo, hi)
                )
                logger.warning(
                    "R3 mismatch (rank %d, stage %s, layer %d, token %d): %s", self.rank, list(Stage)[s].value, layer,
                    t, rows,
                )
                shown += 1
                if shown >= self.max_examples:
                    return


def _default_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _stage_index(stage: Stage) -> int:
    return 0 if stage is Stage.REPLAY_FORWARD else 1
