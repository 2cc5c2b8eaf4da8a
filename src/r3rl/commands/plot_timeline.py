"""The step timeline of `r3rl plot`: per run, a stacked bar per step of where the step's time went (`time/<stage>` in
metrics.jsonl: rollout, reward, reference and old-policy log-probs, update, weight sync), the first picture a user
looks for when a run is slow. Written as `timeline_<label>.png`; a run without stage times gets none.

    figures = timeline_figures(runs)          # [(file name, matplotlib Figure)], runs: r3rl.commands.plot.RunMetrics
"""

from __future__ import annotations

import logging

__all__ = ["STAGES", "timeline_figures", "stage_times"]

logger = logging.getLogger(__name__)

# (metrics key, legend label), in the order a step runs them (r3rl.train.step)
STAGES: tuple[tuple[str, str], ...] = (
    ("time/rollout", "rollout"),
    ("time/reward", "reward"),
    ("time/ref_logprobs", "reference log-probs"),
    ("time/old_logprobs", "old log-probs"),
    ("time/update", "update"),
    ("time/weight_sync", "weight sync"),
)


def stage_times(run) -> tuple[list[int], dict[str, list[float]]]:
    """(steps that have any stage time, {stage key: seconds per step, 0.0 where the step lacks it})."""
    rows = [r for r in run.rows if any(isinstance(r.get(k), (int, float)) for k, _ in STAGES)]
    steps = [r["step"] for r in rows]
    return steps, {k: [float(r.get(k) or 0.0) for r in rows] for k, _ in STAGES}


def timeline_figures(runs) -> list[tuple[str, object]]:
    from r3rl.commands.plot import _figure, _safe

    out = []
    for run in runs:
        steps, times = stage_times(run)
        if not steps:
            logger.info("%s has no stage times (time/*): no timeline", run.label)
            continue
        fig, ax = _figure(width=max(7.0, min(16.0, 0.08 * len(steps) + 6)))
        bottom = [0.0] * len(steps)
        width = 0.8 if len(steps) < 100 else 1.0
        for i, (key, label) in enumerate(STAGES):
            if not any(times[key]):
                continue  # a stage this run never ran (no reference model, say) takes no legend entry
            ax.bar(steps, times[key], bottom=bottom, width=width, label=label, color=f"C{i}", linewidth=0)
            bottom = [b + t for b, t in zip(bottom, times[key], strict=True)]
        ax.set_title(f"step timeline: {run.label}")
        ax.set_xlabel("step")
        ax.set_ylabel("seconds")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small", loc="upper right")
        out.append((f"timeline_{_safe(run.label)}.png", fig))
    return out
