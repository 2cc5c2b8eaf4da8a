"""`r3rl plot RUN_DIR [RUN_DIR ...] --out DIR`: PNG curves of one or more training runs, overlaid (R3 vs no R3).

    r3rl plot runs/r3 runs/none --out plots/

Each run directory holds `metrics.jsonl` (one JSON object per step, with an int `step`). Written, for the metrics
that at least one run has:
    reward.png                       reward_mean (a band of +- reward_std when logged)
    kl.png                           train_rollout_k3_kl                     (log y)
    logprob_diff.png                 train_rollout_logprob_abs_diff          (log y)
    routing_mismatch.png             routing_mismatch, mean over MoE layers  (log y; symlog when a run has zeros,
                                                                              which is what R3 gives)
    training.png                     ppo_kl, grad_norm, response_len_mean    (one panel each)
    routing_mismatch_heatmap_<label>.png   per run: routing_mismatch_per_layer, MoE layer x step (one colour
                                           scale shared by all the runs given)
A run's label is `config.json`'s "name" when present, else the directory name. Figures are drawn with matplotlib's
object API on the Agg canvas (no pyplot global state).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from r3rl.commands.textfile import check_text

__all__ = ["plot_runs", "load_metrics", "RunMetrics"]

logger = logging.getLogger(__name__)

_CURVES = [  # (file, metric, title, y label)
    ("kl.png", "train_rollout_k3_kl", "train-rollout KL (k3)", "k3 KL per token"),
    ("logprob_diff.png", "train_rollout_logprob_abs_diff", "train-rollout |log-prob difference|",
     "mean |log p_train - log p_rollout|"),
    ("routing_mismatch.png", "routing_mismatch", "routing mismatch (training vs rollout trace)",
     "fraction of (token, layer) with a different expert set"),
]
_TRAINING = [("ppo_kl", "PPO KL"), ("grad_norm", "grad norm"), ("response_len_mean", "response length")]


@dataclass(kw_only=True)
class RunMetrics:
    """One run's metrics, sorted by step (a repeated step keeps its last line)."""

    label: str
    """Legend label: config.json's "name", else the run directory's name."""
    path: Path
    """The metrics.jsonl file read."""
    rows: list[dict] = field(default_factory=list)
    """One dict per step, in step order."""

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of `key`, leaving out steps without a finite number for it."""
        steps, values = [], []
        for row in self.rows:
            v = row.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                steps.append(row["step"])
                values.append(float(v))
        return steps, values


def load_metrics(run_dir: Path) -> RunMetrics:
    """Read RUN_DIR/metrics.jsonl; a missing file, a line that is not a JSON object, a missing or non-int `step`, a
    non-number scalar metric or a bad per-layer list is a ValueError naming the file and the line."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no metrics file (is {run_dir} a run directory of `r3rl train`?)")
    check_text(path)  # a binary file: an error naming it, not a decoder's
    by_step: dict[int, dict] = {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            step = row.get("step")
            if isinstance(step, bool) or not isinstance(step, int):
                raise ValueError(f"{where}: 'step' must be an int, got {step!r}")
            for key in ["reward_mean", "reward_std", *(c[1] for c in _CURVES), *(t[0] for t in _TRAINING)]:
                v = row.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise ValueError(f"{where}: '{key}' must be a number, got {v!r}")
            per_layer = row.get("routing_mismatch_per_layer")
            if per_layer is not None and (not isinstance(per_layer, list) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in per_layer)):
                raise ValueError(f"{where}: 'routing_mismatch_per_layer' must be a list of numbers, got {per_layer!r}")
            if step in by_step:
                logger.warning("%s: step %d repeats an earlier line; the last one is plotted", where, step)
            by_step[step] = row
    if not by_step:
        raise ValueError(f"{path}: no steps in the metrics file")
    return RunMetrics(label=_label(run_dir), path=path, rows=[by_step[s] for s in sorted(by_step)])


def plot_runs(run_dirs: Sequence[Path], out_dir: Path) -> list[Path]:
    """Write the PNGs listed in the module docstring for `run_dirs` (overlaid) into `out_dir`; return their paths."""
    if not run_dirs:
        raise ValueError("plot: give at least one run directory")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file: give a directory for the plots")
    runs = [load_metrics(Path(d)) for d in run_dirs]
    _dedupe_labels(runs)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out_dir}: cannot create the directory ({e.strerror or e})") from None
    written: list[Path] = []

    if any(r.series("reward_mean")[0] for r in runs):
        fig, ax = _figure()
        for r in runs:
            steps, mean = r.series("reward_mean")
            (line,) = ax.plot(steps, mean, label=r.label)
            std = dict(zip(*r.series("reward_std"), strict=True))
            band = [(s, m, std[s]) for s, m in zip(steps, mean, strict=True) if s in std]
            if band:
                ax.fill_between([b[0] for b in band], [b[1] - b[2] for b in band], [b[1] + b[2] for b in band],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        _finish(ax, "reward", "reward (mean, band: +- std over samples)")
        written.append(_save(fig, out_dir / "reward.png"))

    for name, key, title, ylabel in _CURVES:
        series = [(r.label, *r.series(key)) for r in runs]
        if not any(s[1] for s in series):
            logger.info("no run has '%s': %s not written", key, name)
            continue
        fig, ax = _figure()
        for label, steps, values in series:
            ax.plot(steps, values, label=label, marker="." if len(steps) < 50 else None)
        _log_y(ax, [v for s in series for v in s[2]])
        _finish(ax, title, ylabel)
        written.append(_save(fig, out_dir / name))

    present = [(key, title) for key, title in _TRAINING if any(r.series(key)[0] for r in runs)]
    if present:
        fig, axes = _figure(ncols=len(present), width=4.2 * len(present))
        for ax, (key, title) in zip(axes if len(present) > 1 else [axes], present, strict=True):
            for r in runs:
                ax.plot(*r.series(key), label=r.label)
            _finish(ax, title, key)
        written.append(_save(fig, out_dir / "training.png"))

    # One colour scale for every run's heatmap, so R3 and no-replay read side by side.
    vmax = max([x for r in runs for row in r.rows for x in row.get("routing_mismatch_per_layer") or []
                if math.isfinite(x)], default=0.0)
    for i, r in enumerate(runs):
        name = _safe(r.label)
        if any(_safe(x.label) == name for x in runs[:i]):  # distinct labels, one file name ("a b" and "a_b")
            name = f"{name}_{i}"
        path = _heatmap(r, out_dir / f"routing_mismatch_heatmap_{name}.png", vmax=max(vmax, 1e-6))
        if path is not None:
            written.append(path)
    return written


# --- private -------------------------------------------------------------------------------------------------------
def _heatmap(run: RunMetrics, path: Path, *, vmax: float) -> Path | None:
    rows = [(row["step"], row["routing_mismatch_per_layer"]) for row in run.rows
            if row.get("routing_mismatch_per_layer")]
    if not rows:
        logger.info("%s: no routing_mismatch_per_layer: no heatmap", run.path)
        return None
    n_layers = len(rows[0][1])
    for step, layers in rows:
        if len(layers) != n_layers:
            raise ValueError(f"{run.path}: step {step} has {len(layers)} values in routing_mismatch_per_layer, "
                             f"step {rows[0][0]} has {n_layers} (one per MoE layer)")
    import numpy as np

    steps = np.array([s for s, _ in rows], dtype=float)
    grid_LS = np.array([layers for _, layers in rows], dtype=float).T
    # Cell edges halfway between logged steps, so gaps (e.g. a resumed run) show at their true width.
    mid = (steps[:-1] + steps[1:]) / 2
    edges = np.concatenate([[steps[0] - 0.5], mid, [steps[-1] + 0.5]]) if len(steps) > 1 else steps[[0, 0]] + [-.5, .5]
    fig, ax = _figure(width=max(6.0, min(14.0, 0.08 * len(steps) + 4)), height=max(2.5, min(8.0, 0.35 * n_layers + 2)))
    mesh = ax.pcolormesh(edges, np.arange(n_layers + 1) - 0.5, grid_LS, cmap="viridis", vmin=0.0, vmax=vmax,
                         shading="flat")
    fig.colorbar(mesh, ax=ax, label="fraction of tokens with a different expert set")
    ax.set_xlabel("step")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(n_layers) if n_layers <= 16 else range(0, n_layers, max(1, n_layers // 8)))
    ax.set_title(f"routing mismatch per layer: {run.label}")
    return _save(fig, path)


def _figure(*, ncols: int = 1, width: float = 7.0, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _finish(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _log_y(ax, values: list[float]) -> None:
    """Log y when every value is positive; symlog when some are zero (R3's routing mismatch), so they stay visible;
    linear when a value is negative or nothing is positive."""
    positive = [v for v in values if v > 0]
    if not positive or any(v < 0 for v in values):
        return
    if len(positive) == len(values):
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(min(positive))))


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, format="png")
    logger.debug("wrote %s", path)
    return path


def _label(run_dir: Path) -> str:
    config = run_dir / "config.json"
    if config.is_file():
        try:
            name = json.loads(config.read_text()).get("name")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{config}: not a JSON object ({e})") from None
        if isinstance(name, str) and name:
            return name
    return run_dir.resolve().name


def _dedupe_labels(runs: list[RunMetrics]) -> None:
    """Runs sharing a label get their parent folder's name prefixed, then an index, so that legends and heatmap
    files stay apart."""
    from collections import Counter

    counts = Counter(r.label for r in runs)
    for r in runs:
        if counts[r.label] > 1 and r.path.parent.parent.name:
            r.label = f"{r.path.parent.parent.name}/{r.label}"
    counts = Counter(r.label for r in runs)
    for i, r in enumerate(runs):
        if counts[r.label] > 1:
            r.label = f"{r.label}#{i}"


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"
