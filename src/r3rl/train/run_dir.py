"""The run directory and what the trainer writes into it besides the metrics: a fresh directory per run by default,
the `latest` link, the evaluation's sample completions, and the plots drawn when the run ends.

    run_dir = new_run_dir("runs")          # runs/20261207-071502 (runs/20261207-071502-1 when taken); runs/latest -> it
    log = SampleLog(run_dir); log.write(step, rows)      # RUN_DIR/samples.jsonl, one JSON object per completion
    draw_plots(run_dir)                    # RUN_DIR/plots/*.png (`r3rl plot`); a failure is a warning, not an error
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path

__all__ = ["new_run_dir", "link_latest", "SampleLog", "draw_plots", "DEFAULT_RUNS_ROOT"]

logger = logging.getLogger(__name__)

DEFAULT_RUNS_ROOT = "runs"
"""Where a run without `--run-dir` gets its own directory."""


def new_run_dir(root: str | Path = DEFAULT_RUNS_ROOT, *, now: datetime.datetime | None = None) -> Path:
    """Create and return `root/<YYYYmmdd-HHMMSS>` (then `-1`, `-2`, ... when taken: the mkdir is the claim, so two
    runs started in the same second get two directories), and point `root/latest` at it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    for i in range(10_000):
        path = root / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        link_latest(root, path)
        return path
    raise RuntimeError(f"{root}: no free run directory name for {stamp}")


def link_latest(root: Path, target: Path) -> None:
    """`root/latest` -> `target` (a relative link, replaced atomically). A `latest` that is not a link is left alone
    with a warning; a file system without links only loses the link."""
    link = root / "latest"
    if link.exists() and not link.is_symlink():
        logger.warning("%s exists and is not a link: not pointed at %s", link, target)
        return
    tmp = root / f".latest.{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(target.name, tmp)
        os.replace(tmp, link)
    except OSError as e:
        logger.warning("could not link %s -> %s: %s", link, target, e)


class SampleLog:
    """RUN_DIR/samples.jsonl: one JSON object per logged completion ({"step", "prompt", "completion", "reward",
    "label"}), appended at every evaluation; a resumed run drops the lines of the steps it redoes."""

    def __init__(self, run_dir: str | Path, *, truncate_after: int | None = None) -> None:
        self.path = Path(run_dir) / "samples.jsonl"
        if truncate_after is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] < truncate_after]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif truncate_after is None:
            self.path.write_text("")

    def write(self, step: int, rows: list[dict]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"step": step} | row, ensure_ascii=False) + "\n")


def draw_plots(run_dir: str | Path) -> list[Path]:
    """`r3rl plot RUN_DIR` into RUN_DIR/plots/. The run's results do not depend on it: a missing matplotlib or a run
    without metrics is logged and skipped."""
    run_dir = Path(run_dir)
    try:
        from r3rl.commands.plot import plot_runs

        paths = plot_runs([run_dir], run_dir / "plots")
    except ImportError as e:
        logger.warning("no plots: matplotlib is not installed (%s)", e)
        return []
    except ValueError as e:
        logger.warning("no plots: %s", e)
        return []
    logger.info("plots: %d files in %s", len(paths), run_dir / "plots")
    return paths
