"""ReplayCheck: prove that replay happened and that the replayed experts are the ones the live router would pick.

For every replayed router call, `RoutingReplay` hands the check the live top-k (computed from the scores the
adapter already computed; the router never runs twice) and the replayed ids. The check keeps per-stage, per-layer
counters on the device: rows checked (all-pad rows excluded), rows with zero overlap, exact-set matches, summed
overlap fraction and the sum of replayed ids. `summary()` syncs once per step, logs the evidence lines and returns
a `CheckSummary` (JSON-ready). Above the threshold it logs up to 5 offending tokens with their neighbours, then
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

__all__ = ["Stage", "ReplayCheck", "CheckSummary", "LayerStats", "resolve_threshold", "DEFAULT_THRESHOLD"]

logger = logging.getLogger(__name__)
evidence_logger = logging.getLogger("r3rl")

DEFAULT_THRESHOLD = 1e-2
THRESHOLD_ENV_VARS = ("R3RL_TEST_R3_THRESHOLD", "MILES_TEST_R3_THRESHOLD")
_NEIGHBOURS = 3

# Counter columns, one row per (stage, layer): checked rows, zero-overlap rows, exact-set rows, summed overlap
# fraction, summed replayed ids, router calls, replayed tokens.
_TOKENS, _ZERO, _EXACT, _OVERLAP, _IDX_SUM, _CALLS, _REPLAYED = range(7)
_NUM_COLUMNS = 7


class Stage(enum.StrEnum):
    REPLAY_FORWARD = "replay_forward"
    REPLAY_BACKWARD = "replay_backward"


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
class CheckSummary:
    """One step of the check. `stages` maps stage -> {tokens, zero_overlap, calls}; `layers` aggregates stages."""

    rank: int
    threshold: float
    tokens_checked: int
    zero_overlap: int
    passed: bool
    stages: dict[str, dict[str, int]] = field(default_factory=dict)
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
        # [stage, layer, column]; everything a summary needs, so one all_reduce makes it global.
        self.counters = torch.zeros(len(Stage), num_layers, _NUM_COLUMNS, dtype=torch.float64, device=device)
        self._offsets = torch.arange(-_NEIGHBOURS, _NEIGHBOURS + 1, device=device)
        # Per call: up to `max_examples` zero-overlap rows and their neighbours, gathered on the device.
        self._examples: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.last_summary: CheckSummary | None = None

    # --- hot path (device only, no sync) -------------------------------------------------------------------------
    def observe(
        self,
        stage: Stage,
        layer: int,
        live_TK: torch.Tensor,
        replay_TK: torch.Tensor,
        valid_TK: torch.Tensor | None = None,
    ) -> None:
        """Compare one router call's live top-k with the replayed ids. `valid_TK` masks trace pad slots."""
        s = _stage_index(stage)
        if self.counters.device != live_TK.device:
            self.counters = self.counters.to(live_TK.device)
            self._offsets = self._offsets.to(live_TK.device)
        hit_TK = (replay_TK.unsqueeze(-1) == live_TK.unsqueeze(-2)).any(-1)  # replayed slot is in the live top-k
        if valid_TK is None:
            overlap_T = hit_TK.sum(-1)
            n_valid_T = torch.full_like(overlap_T, replay_TK.shape[1])
            rows_T = torch.ones_like(overlap_T, dtype=torch.bool)
        else:
            overlap_T = (hit_TK & valid_TK).sum(-1)
            n_valid_T = valid_TK.sum(-1)
            rows_T = n_valid_T > 0
        zero_T = (overlap_T == 0) & rows_T
        exact_T = (overlap_T == n_valid_T) & rows_T
        frac_T = overlap_T.double() / n_valid_T.clamp_min(1).double()
        stats = torch.stack([
            rows_T.sum().double(), zero_T.sum().double(), exact_T.sum().double(), (frac_T * rows_T).sum(),
            replay_TK.sum().double(),
        ])
        self.counters[s, layer, :_CALLS] += stats
        self.counters[s, layer, _CALLS] += 1
        self.counters[s, layer, _REPLAYED] += replay_TK.shape[0]
        if self.max_examples and replay_TK.shape[0]:
            bad_E = torch.nonzero_static(zero_T, size=self.max_examples, fill_value=-1).squeeze(-1)
            pos_EN = (bad_E.clamp_min(0).unsqueeze(-1) + self._offsets).clamp(0, replay_TK.shape[0] - 1)
            self._examples.append((s, layer, bad_E, pos_EN, live_TK[pos_EN], replay_TK[pos_EN]))

    # --- once per step ---------------------------------------------------------------------------------------------
    def summary(self, *, raise_on_fail: bool = True) -> CheckSummary:
        """Sync once, log the evidence lines, reset, and raise AssertionError above the threshold."""
        counts = self.counters.cpu()  # note: the one host sync of the step
        stages: dict[str, dict[str, int]] = {}
        for stage in Stage:
            s = _stage_index(stage)
            if not counts[s, :, _CALLS].any():
                continue
            for layer in range(self.num_layers):
                if counts[s, layer, _CALLS]:
                    evidence_logger.info(
                        "R3 wrapper: %s branch taken (rank %d, n_tokens=%d, topk=%d, replay_idx_sum=%d)",
                        stage.value, self.rank, int(counts[s, layer, _REPLAYED]), self.top_k,
                        int(counts[s, layer, _IDX_SUM]),
                    )
            tokens = int(counts[s, :, _TOKENS].sum())
            zero = int(counts[s, :, _ZERO].sum())
            evidence_logger.info(
                "R3 check (rank %d, stage %s): n_tokens=%d mismatch=%d (%.2f%%)",
                self.rank, stage.value, tokens, zero, 100.0 * zero / max(tokens, 1),
            )
            stages[stage.value] = {"tokens": tokens, "zero_overlap": zero, "calls": int(counts[s, :, _CALLS].sum())}

        per_layer = counts.sum(0)
        layers = [
            LayerStats(
                layer=i, tokens=int(per_layer[i, _TOKENS]), zero_overlap=int(per_layer[i, _ZERO]),
                exact_match=int(per_layer[i, _EXACT]),
                mean_overlap=float(per_layer[i, _OVERLAP] / per_layer[i, _TOKENS]) if per_layer[i, _TOKENS] else 0.0,
            )
            for i in range(self.num_layers)
        ]
        # The verdict is per stage: a recompute that diverged must not hide behind a clean forward.
        failing = {st: v for st, v in stages.items() if v["zero_overlap"] > self.threshold * v["tokens"]}
        summary = CheckSummary(
            rank=self.rank, threshold=self.threshold,
            tokens_checked=sum(v["tokens"] for v in stages.values()),
            zero_overlap=sum(v["zero_overlap"] for v in stages.values()),
            passed=not failing, stages=stages, layers=layers,
        )
        examples = self._examples
        self._reset()
        self.last_summary = summary
        if failing:
            self._warn_examples(examples)
            if raise_on_fail:
                worst = max(failing.values(), key=lambda v: v["zero_overlap"] / max(v["tokens"], 1))
                raise AssertionError(
                    f"R3 mismatch tokens ({worst['zero_overlap']}) > threshold ({self.threshold * worst['tokens']:.2f})"
                )
        return summary

    def all_reduce(self) -> None:
        """Sum the counters over ranks (every rank calls it before `summary()` for a global verdict)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.counters)

    # --- private -----------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self.counters.zero_()
        self._examples = []

    def _warn_examples(self, examples: list) -> None:
        shown = 0
        for s, layer, bad_E, pos_EN, live_ENK, replay_ENK in examples:
            for e, t in enumerate(bad_E.tolist()):
                if t < 0 or shown >= self.max_examples:
                    break
                rows = "; ".join(
                    f"{'>' if p == t else ' '}tok {p}: orig={sorted(live_ENK[e, n].tolist())} "
                    f"replay={sorted(replay_ENK[e, n].tolist())}"
                    for n, p in enumerate(pos_EN[e].tolist())
                    if n == 0 or p != pos_EN[e, n - 1]  # clamped neighbours at the edges repeat
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
