"""`r3rl plot RUN_DIR [RUN_DIR ...] --out DIR`: PNG curves of one or more training runs, overlaid (R3 vs no R3).

    r3rl plot runs/r3 runs/none --out plots/

Each run directory holds `metrics.jsonl` (one JSON object per step, with an int `step`). `r3rl train` draws its own
run's plots into RUN_DIR/plots/ when it ends. What is drawn is one table, `PANELS`: one row per metric (its file, title,
y scale, smoothing, whether an all-zero panel is left out), panels of one file side by side. A metric that no run has
is not drawn; a file without panels is not written. Adding a metric is one row. Today's files:
    reward.png               reward_mean (band: +- reward_std)
    eval.png                 eval_solved_frac (held-out greedy exact match, 0..1), eval_reward
    kl.png                   train_rollout_k3_kl                        (log y)
    logprob_diff.png         train_rollout_logprob_abs_diff, its p99    (log y), train_rollout_extreme_frac (the
                             fraction of tokens with |log p_train - log p_rollout| > ln 2)
    routing_mismatch.png     routing_mismatch, router_live_mismatch     (fractions: y from 0)
    training.png             ppo_kl, grad_norm, response_len_mean (each only when not all zero)
    routing_mismatch_heatmap_<label>.png   per run (`HEATMAPS`): routing_mismatch_per_layer, MoE layer x step, one
                             colour scale shared by the runs given; an all-zero run says so, on a fixed 0..1 scale
    timeline_<label>.png     per run: a stacked bar per step of the stage times, time/* (plot_timeline.py)
Readability: each run has its own colour, line style and marker (offset along the curve), so a run equal to another
stays visible on top of it; a noisy curve (>= `SMOOTH_MIN_POINTS` points) is drawn faded with its EMA (TensorBoard's
debiased smoothing, weight `EMA_WEIGHT`) as the solid line; a run whose values are all zero says "(all 0)" in the
legend. A run's label is `config.json`'s "name" when present, else the directory name. Figures are drawn with
matplotlib's object API on the Agg canvas (no pyplot global state).
"""

from __future__ import annotations

import enum
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from r3rl.commands.textfile import check_text

__all__ = ["plot_runs", "build_figures", "load_metrics", "RunMetrics", "Panel", "Heatmap", "Scale", "PANELS",
           "HEATMAPS", "ema"]

logger = logging.getLogger(__name__)


class Scale(enum.StrEnum):
    """A panel's y axis."""

    LINEAR = "linear"
    LOG = "log"  # symlog when some values are 0 (R3's mismatch), linear when one is negative
    FRACTION = "fraction"  # a value in [0, 1]: y from 0 to a little above the largest (0..1 when all are 0)
    UNIT = "unit"  # fixed 0..1 (a success rate)


@dataclass(frozen=True, kw_only=True)
class Panel:
    """One metric's curve panel."""

    metric: str
    """The metrics.jsonl key (a number per step)."""
    file: str
    """The PNG it is drawn in; panels sharing a file sit side by side, in table order."""
    title: str
    ylabel: str
    scale: Scale = Scale.LINEAR
    smooth: bool = True
    """Draw an EMA beside the faded raw curve (when there are enough points)."""
    hide_if_zero: bool = False
    """Leave the panel out when every run's values are all 0 (it would say nothing)."""
    band: str | None = None
    """A metric drawn as a +- band around the curve (e.g. reward_std)."""


@dataclass(frozen=True, kw_only=True)
class Heatmap:
    """One per-layer metric (a list per step) drawn as a layer x step heatmap, one file per run."""

    metric: str
    prefix: str
    """File name: PREFIX_<run label>.png."""
    title: str
    colorbar: str


PANELS: tuple[Panel, ...] = (
    Panel(metric="reward_mean", file="reward.png", title="reward (sampled rollouts)",
          ylabel="reward (mean, band: +- std over samples)", band="reward_std"),
    Panel(metric="eval_solved_frac", file="eval.png", title="held-out greedy exact match",
          ylabel="fraction of held-out prompts solved", scale=Scale.UNIT, smooth=False),
    Panel(metric="eval_reward", file="eval.png", title="held-out greedy reward", ylabel="mean reward", smooth=False),
    Panel(metric="train_rollout_k3_kl", file="kl.png", title="train-rollout KL (k3)", ylabel="k3 KL per token",
          scale=Scale.LOG),
    Panel(metric="train_rollout_logprob_abs_diff", file="logprob_diff.png", title="train-rollout |log-prob difference|",
          ylabel="mean |log p_train - log p_rollout|", scale=Scale.LOG),
    Panel(metric="train_rollout_logprob_abs_diff_p99", file="logprob_diff.png",
          title="train-rollout |log-prob difference|, p99", ylabel="p99 of |log p_train - log p_rollout|",
          scale=Scale.LOG),
    Panel(metric="train_rollout_extreme_frac", file="logprob_diff.png",
          title="extreme tokens (|log-prob diff| > ln 2)", ylabel="fraction of response tokens",
          scale=Scale.FRACTION),
    Panel(metric="routing_mismatch", file="routing_mismatch.png", title="routing mismatch (training vs rollout trace)",
          ylabel="fraction of (token, layer) with a different expert set", scale=Scale.FRACTION),
    Panel(metric="router_live_mismatch", file="routing_mismatch.png", title="live router vs rollout trace",
          ylabel="fraction of (token, layer) with a different expert set", scale=Scale.FRACTION),
    Panel(metric="ppo_kl", file="training.png", title="PPO KL", ylabel="ppo_kl", hide_if_zero=True),
    Panel(metric="grad_norm", file="training.png", title="grad norm", ylabel="grad_norm", hide_if_zero=True),
    Panel(metric="response_len_mean", file="training.png", title="response length", ylabel="tokens",
          hide_if_zero=True),
)
HEATMAPS: tuple[Heatmap, ...] = (
    Heatmap(metric="routing_mismatch_per_layer", prefix="routing_mismatch_heatmap",
            title="routing mismatch per layer", colorbar="fraction of tokens with a different expert set"),
)
EMA_WEIGHT = 0.8
SMOOTH_MIN_POINTS = 10
_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 2)), "P")]
_MARKS = 10  # markers per curve


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
            for key in dict.fromkeys(k for p in PANELS for k in (p.metric, p.band) if k):
                v = row.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise ValueError(f"{where}: '{key}' must be a number, got {v!r}")
            for hm in HEATMAPS:
                per_layer = row.get(hm.metric)
                if per_layer is not None and (not isinstance(per_layer, list) or not all(
                        isinstance(x, (int, float)) and not isinstance(x, bool) for x in per_layer)):
                    raise ValueError(f"{where}: '{hm.metric}' must be a list of numbers, got {per_layer!r}")
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
    figures = build_figures(runs)  # every input checked before anything is written
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out_dir}: cannot create the directory ({e.strerror or e})") from None
    return [_save(fig, out_dir / name) for name, fig in figures]


def build_figures(runs: list[RunMetrics]) -> list[tuple[str, object]]:
    """(file name, matplotlib Figure) for every file the table gives for `runs` (labels made distinct first)."""
    _dedupe_labels(runs)
    figures = []
    files = list(dict.fromkeys(p.file for p in PANELS))
    for name in files:
        panels = [p for p in PANELS if p.file == name and _shown(p, runs)]
        if not panels:
            logger.info("no run has %s: %s not written", ", ".join(p.metric for p in PANELS if p.file == name), name)
            continue
        fig, axes = _figure(ncols=len(panels), width=max(7.0, 4.6 * len(panels)))
        for ax, panel in zip(axes if len(panels) > 1 else [axes], panels, strict=True):
            _draw_panel(ax, panel, runs)
        figures.append((name, fig))
    for hm in HEATMAPS:
        figures += _heatmaps(hm, runs)
    from r3rl.commands.plot_timeline import timeline_figures

    return figures + timeline_figures(runs)


def ema(values: Sequence[float], weight: float = EMA_WEIGHT) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so that it starts at the first value."""
    out, last = [], 0.0
    for i, v in enumerate(values, 1):
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**i))
    return out


# --- private -------------------------------------------------------------------------------------------------------
def _shown(panel: Panel, runs: list[RunMetrics]) -> bool:
    values = [v for r in runs for v in r.series(panel.metric)[1]]
    if not values:
        return False
    if panel.hide_if_zero and not any(values):
        logger.info("%s is 0 at every step of every run: its panel is left out", panel.metric)
        return False
    return True


def _draw_panel(ax, panel: Panel, runs: list[RunMetrics]) -> None:
    smoothed = False
    all_values = []
    for i, r in enumerate(runs):
        steps, values = r.series(panel.metric)
        if not steps:
            continue
        all_values += values
        style, marker = _STYLES[i % len(_STYLES)]
        label = r.label + (" (all 0)" if not any(values) else "")
        # later runs: thinner, dashed, smaller open markers at shifted steps, drawn on top: equal curves stay visible
        every = max(1, len(steps) // _MARKS)
        common = dict(color=f"C{i % 10}", linestyle=style, linewidth=max(1.0, 2.4 - 0.5 * i), marker=marker,
                      markersize=max(3.0, 7.5 - 1.5 * i), markevery=((i * every) // len(runs) % every, every),
                      markerfacecolor="none" if i else None, zorder=2 + i,
                      clip_on=panel.scale not in (Scale.FRACTION, Scale.UNIT))  # a 0 line on the axis shows whole
        if panel.smooth and len(steps) >= SMOOTH_MIN_POINTS:
            ax.plot(steps, values, color=common["color"], linestyle=style, linewidth=1.0, alpha=0.3,
                    label="_nolegend_", zorder=1)
            ax.plot(steps, ema(values), label=label, alpha=0.95, **common)
            smoothed = True
        else:
            ax.plot(steps, values, label=label, alpha=0.9, **common)
        if panel.band:
            std = dict(zip(*r.series(panel.band), strict=True))
            band = [(s, m, std[s]) for s, m in zip(steps, values, strict=True) if s in std]
            if band:
                ax.fill_between([b[0] for b in band], [b[1] - b[2] for b in band], [b[1] + b[2] for b in band],
                                color=common["color"], alpha=0.12, linewidth=0)
    title = panel.title + (" (all zero)" if not any(all_values) else "")
    _scale(ax, panel, all_values)
    _finish(ax, title, panel.ylabel, legend_title=f"line: EMA {EMA_WEIGHT}, faded: raw" if smoothed else None)


def _scale(ax, panel: Panel, values: list[float]) -> None:
    if panel.scale is Scale.LOG:
        _log_y(ax, values)
    elif panel.scale is Scale.UNIT:
        ax.set_ylim(0.0, 1.02)
    elif panel.scale is Scale.FRACTION and all(v >= 0 for v in values):
        top = max(values, default=0.0)
        ax.set_ylim(0.0, min(1.0, 1.15 * top) if top > 0 else 1.0)


def _heatmaps(hm: Heatmap, runs: list[RunMetrics]) -> list[tuple[str, object]]:
    # One colour scale for every run's heatmap, so R3 and no-replay read side by side; all zero: a fixed 0..1 scale.
    vmax = max([x for r in runs for row in r.rows for x in row.get(hm.metric) or [] if math.isfinite(x)],
               default=0.0)
    out = []
    for i, r in enumerate(runs):
        name = _safe(r.label)
        if any(_safe(x.label) == name for x in runs[:i]):  # distinct labels, one file name ("a b" and "a_b")
            name = f"{name}_{i}"
        fig = _heatmap(hm, r, vmax=vmax if vmax > 0 else 1.0)
        if fig is not None:
            out.append((f"{hm.prefix}_{name}.png", fig))
    return out


def _heatmap(hm: Heatmap, run: RunMetrics, *, vmax: float):
    rows = [(row["step"], row[hm.metric]) for row in run.rows if row.get(hm.metric)]
    if not rows:
        logger.info("%s: no %s: no heatmap", run.path, hm.metric)
        return None
    n_layers = len(rows[0][1])
    for step, layers in rows:
        if len(layers) != n_layers:
            raise ValueError(f"{run.path}: step {step} has {len(layers)} values in {hm.metric}, "
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
    fig.colorbar(mesh, ax=ax, label=hm.colorbar)
    ax.set_xlabel("step")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(n_layers) if n_layers <= 16 else range(0, n_layers, max(1, n_layers // 8)))
    zero = not np.nan_to_num(grid_LS).any()
    ax.set_title(f"{hm.title}: {run.label}" + (" (all zero)" if zero else ""))
    return fig


def _figure(*, ncols: int = 1, width: float = 7.0, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _finish(ax, title: str, ylabel: str, *, legend_title: str | None = None) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", title=legend_title, title_fontsize="x-small")


def _log_y(ax, values: list[float]) -> None:
    """Log y when every value is positive; symlog when some are zero (R3's routing mismatch), so they stay visible;
    linear when a value is negative or nothing is positive."""
    positive = [v for v in values if v > 0]
    if not positive or any(v < 0 for v in values):
        return
    if len(positive) == len(values):
        if min(positive) == max(positive):  # a constant: a decade around it, not a singular range
            ax.set_ylim(positive[0] / 3, positive[0] * 3)
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
