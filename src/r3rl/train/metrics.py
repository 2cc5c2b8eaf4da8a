"""Step metrics: train-rollout consistency numbers, the per-layer routing mismatch, and where they are written.

    routing_mismatch_per_layer(rollout_traces, used_traces)  fraction of (token, layer) whose expert *sets* differ
    RoutingMismatch()                                        the same counts summed over a step's forwards
    train_rollout_metrics(train_logp_T, rollout_logp_T)       |log-prob diff|, its p99, extreme-token fraction, k3 KL
    MetricsWriter(run_dir)                                   metrics.jsonl (one line per step) + TensorBoard events
                                                             (+ Weights & Biases with wandb={"project": ...})

Routing mismatch has one definition (`routing_mismatch_counts`), used by `r3rl train` and `r3rl check`, and two
readings, both against the rollout trace as received (before any `--inject-fault`), in every replay mode:
  routing_mismatch      the experts each training forward really used, read at the experts modules' inputs
                        (`r3rl.experts_tap`): 0 under R3 when replay works, > 0 when it does not or without replay;
  router_live_mismatch  what the live router would have chosen (under R3: the live top-k the replay overrode): what
                        R3 removed. Without replay both readings are the same routing.

`train_rollout_k3_kl` estimates KL(rollout || train) per token with k3 = exp(r) - 1 - r, r = log p_train - log
p_rollout, averaged over response tokens; `train_rollout_logprob_abs_diff` is mean |r| (slime's name),
`train_rollout_logprob_abs_diff_p99` its 99th percentile, `train_rollout_extreme_frac` the fraction of tokens with
|r| > ln 2 (AReaL's extreme-token fraction).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from r3rl.trace import RoutingTrace

__all__ = ["routing_mismatch_counts", "routing_mismatch_per_layer", "RoutingMismatch", "train_rollout_metrics",
           "MetricsWriter", "RunSummary", "wandb_available"]

logger = logging.getLogger(__name__)


def routing_mismatch_counts(rollout: Sequence[RoutingTrace | None],
                            used: Sequence[RoutingTrace]) -> tuple[np.ndarray, np.ndarray] | None:
    """Per MoE layer: (rows whose expert *set* differs, rows counted) between each sample's rollout trace and the
    experts a forward used for it. Rows that are pad in the rollout trace are not counted; None without any trace.
    The one definition of routing mismatch: `r3rl train` and `r3rl check` both count with it."""
    diff = rows = None
    for b, (ref, got) in enumerate(zip(rollout, used, strict=True)):
        if ref is None:
            continue
        if ref.expert_ids.shape != got.expert_ids.shape:
            raise ValueError(f"sample {b}: rollout trace {ref.expert_ids.shape} and training routing "
                             f"{got.expert_ids.shape} differ in shape")
        a = np.sort(ref.expert_ids.astype(np.int64), axis=-1)
        c = np.sort(got.expert_ids.astype(np.int64), axis=-1)
        counted = ~ref.pad_mask().any(-1)  # [rows, layers]
        d = ((a != c).any(-1) & counted).sum(0)
        n = counted.sum(0)
        diff, rows = (d, n) if diff is None else (diff + d, rows + n)
    return None if diff is None else (diff, rows)


def routing_mismatch_per_layer(rollout: Sequence[RoutingTrace | None], used: Sequence[RoutingTrace]) -> list[float]:
    """Per MoE layer, the fraction of traced (token, layer) rows whose expert set differs between the rollout's
    trace and the experts a forward used (`routing_mismatch_counts`)."""
    counts = routing_mismatch_counts(rollout, used)
    return [] if counts is None else _fractions(*counts)


class RoutingMismatch:
    """`routing_mismatch_counts` summed over several forwards of a step (the old-policy forward and each update)."""

    def __init__(self) -> None:
        self.diff: np.ndarray | None = None
        self.rows: np.ndarray | None = None

    def add(self, rollout: Sequence[RoutingTrace | None], used: Sequence[RoutingTrace]) -> None:
        counts = routing_mismatch_counts(rollout, used)
        if counts is not None:
            self.diff, self.rows = counts if self.diff is None else (self.diff + counts[0], self.rows + counts[1])

    def metrics(self, name: str) -> dict:
        """`{name: mean over layers, name_per_layer: [...]}` (0.0 and [] when nothing was traced)."""
        per_layer = [] if self.diff is None else _fractions(self.diff, self.rows)
        return {name: sum(per_layer) / len(per_layer) if per_layer else 0.0, f"{name}_per_layer": per_layer}


def _fractions(diff: np.ndarray, rows: np.ndarray) -> list[float]:
    return [float(x) / max(int(t), 1) for x, t in zip(diff, rows, strict=True)]


EXTREME_LOG_RATIO = math.log(2.0)


def train_rollout_metrics(train_logp_T: torch.Tensor, rollout_logp_T: torch.Tensor) -> dict[str, float]:
    """Over response tokens, r = log p_train - log p_rollout: mean |r|, the k3 KL, the fraction with |r| > ln 2
    (AReaL's extreme tokens: the probability ratio outside [1/2, 2]) and the 99th percentile of |r|."""
    r = train_logp_T.double().cpu() - rollout_logp_T.double().cpu()
    a = r.abs()
    return {"train_rollout_logprob_abs_diff": a.mean().item(),
            "train_rollout_k3_kl": (r.exp() - 1 - r).mean().item(),
            "train_rollout_extreme_frac": (a > EXTREME_LOG_RATIO).double().mean().item(),
            "train_rollout_logprob_abs_diff_p99": torch.quantile(a, 0.99).item() if a.numel() else 0.0}


class MetricsWriter:
    """Appends one JSON line per step to RUN_DIR/metrics.jsonl; mirrors scalars to TensorBoard when installed, and to
    Weights & Biases when `wandb` is given: `wandb.init` keywords ({"project", "name", "config"}), its files under
    RUN_DIR/wandb. WANDB_MODE=offline logs without a network (`wandb sync` uploads later). wandb not installed is a
    ValueError saying how to install it."""

    def __init__(self, run_dir: str | Path, *, truncate_after: int | None = None, wandb: dict | None = None) -> None:
        self._wandb = _wandb_init(Path(run_dir), wandb) if wandb is not None else None
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and self.path.exists():  # a resumed run rewrites the steps after its checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] < truncate_after]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif truncate_after is None:
            self.path.write_text("")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:
            logger.info("tensorboard is not installed: metrics go to %s only", self.path)

    def write(self, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics, default=_jsonable) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "step":
                    self._tb.add_scalar(k, v, metrics["step"])
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if _scalar(v) and k != "step"}, step=metrics["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def wandb_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def _wandb_init(run_dir: Path, settings: dict):
    if not wandb_available():
        raise ValueError("--use-wandb needs the wandb package, which is not installed: pip install 'r3rl[wandb]' "
                         "(or pip install wandb)")
    import wandb

    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    run = wandb.init(dir=str(run_dir), **settings)
    logger.info("Weights & Biases: project %s, run %s (mode %s)", settings.get("project"), run.name,
                "offline" if run.settings.mode == "offline" else run.settings.mode)
    return run


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class RunSummary:
    """The R3 check's verdict over a run: every step's tokens, zero-overlap rows and pass/fail per stage.

    A pass needs, at every step, checked tokens in each stage the configuration produces: `replay_forward` always,
    `replay_backward` only with activation checkpointing (`recompute`: without it nothing is recomputed)."""

    def __init__(self, *, recompute: bool = True) -> None:
        self.steps = 0
        self.required = ("replay_forward", "replay_backward") if recompute else ("replay_forward",)
        self.tokens: dict[str, int] = {}
        self.zero_overlap: dict[str, int] = {}
        self.failed_steps: list[int] = []
        self.unchecked: dict[int, list[str]] = {}
        """step -> the required stages in which it checked no token."""
        self.routing_mismatch: list[float] = []
        self.router_live_mismatch: list[float] = []

    def add(self, metrics: dict) -> None:
        self.steps += 1
        self.routing_mismatch.append(metrics["routing_mismatch"])
        if "router_live_mismatch" in metrics:
            self.router_live_mismatch.append(metrics["router_live_mismatch"])
        for key, value in metrics.items():
            if key.startswith("r3_check_replay_") and key.endswith("_tokens"):
                stage = key[len("r3_check_"):-len("_tokens")]
                self.tokens[stage] = self.tokens.get(stage, 0) + value
        if metrics.get("r3_check_passed") is False:
            self.failed_steps.append(metrics["step"])
        missing = [s for s in self.required if not metrics.get(f"r3_check_{s}_tokens", 0)]
        if missing:
            self.unchecked[metrics["step"]] = missing

    def fail(self, step: int) -> None:
        """The run stopped with an error in `step` (before its metrics existed): the step is named as failed."""
        if step not in self.failed_steps:
            self.failed_steps.append(step)

    def to_dict(self, *, check_enabled: bool, error: str | None = None) -> dict:
        if not check_enabled:
            verdict = "not_checked"
        elif error or self.failed_steps:
            verdict = "fail"
        elif self.steps and not self.unchecked:
            verdict = "pass"
        else:
            verdict = "fail"
            first = next(iter(self.unchecked.items()), None)
            error = error or ("no step ran" if first is None else
                              f"the check saw no token in stage(s) {first[1]} at step {first[0]} "
                              f"({len(self.unchecked)} of {self.steps} steps; required: {list(self.required)})")
        return {"verdict": verdict, "error": error, "steps": self.steps, "tokens_checked": self.tokens,
                "required_stages": list(self.required), "failed_steps": self.failed_steps,
                "routing_mismatch_mean": float(np.mean(self.routing_mismatch)) if self.routing_mismatch else None,
                "router_live_mismatch_mean": float(np.mean(self.router_live_mismatch)) if self.router_live_mismatch
                else None}


def _jsonable(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)
