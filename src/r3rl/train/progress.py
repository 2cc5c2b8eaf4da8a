"""The trainer's console: one log line per step (`_brief`) and the live progress display (rich), off when stderr is
not a terminal."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("r3rl.train.trainer")


def _brief(m: dict) -> str:
    keys = ("reward_mean", "eval_reward", "eval_solved_frac", "turns_mean", "response_len_mean", "routing_mismatch",
            "router_live_mismatch", "train_rollout_k3_kl", "train_rollout_logprob_abs_diff",
            "train_rollout_extreme_frac", "r3_check_mismatch", "grad_norm", "time/step")
    return " ".join(f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys if k in m)


class _Progress:
    """A rich progress bar with reward, response length, step time and the R3 status (off when not a terminal)."""

    def __init__(self, total: int, start: int, *, enabled: bool) -> None:
        self.total, self.start = total, start
        self.enabled = enabled and sys.stderr.isatty()
        self._progress = self._task = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]r3rl train"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), TextColumn("{task.description}"))
            self._progress.start()
            self._task = self._progress.add_task("", total=self.total, completed=self.start)
        return self

    def update(self, m: dict) -> None:
        if self._progress is None:
            return
        r3 = ("R3 ok" if m.get("r3_check_passed") else "R3 FAIL") if "r3_check_passed" in m else "R3 off"
        self._progress.update(self._task, advance=1, description=(
            f"reward {m['reward_mean']:.3f}  len {m['response_len_mean']:.1f}  mismatch {m['routing_mismatch']:.3f}  "
            f"{m['time/step']:.2f}s/step  {r3}"))

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
