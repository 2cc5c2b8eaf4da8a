"""Shared pieces of the `r3rl` command line (cli.py, cli_train.py): the replay flags, lazily read choices, and the
checks every subcommand makes of its paths and device. argparse is known only by these three modules."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_replay_flags", "PRESET_CHOICES", "REWARD_CHOICES", "REWARD_TIMEOUT_S", "ENV_TIMEOUT_S",
           "DEVICE_HELP", "replay_config_from_args"]


def add_replay_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("routing replay (miles names)")
    g.add_argument("--use-rollout-routing-replay", action="store_true",
                   help="R3: replay the rollout's experts in training forwards and their recompute (master switch)")
    g.add_argument("--use-routing-replay", action="store_true",
                   help="R2: record routing in the old-policy forward, replay it in the update")
    g.add_argument("--enable-r3-correctness-check", action="store_true",
                   help="check every replayed router call (live top-k vs replayed), log evidence, fail above threshold")
    g.add_argument("--ci-test", action="store_true",
                   help="CI mode: enables the correctness check plus strict invariants")
    g.add_argument("--r3-check-threshold", type=float, default=None,
                   help="allowed zero-overlap fraction of (token, layer) rows (default: $R3RL_TEST_R3_THRESHOLD, "
                        "$MILES_TEST_R3_THRESHOLD, else 1e-2)")


class _LazyChoices:
    """argparse choices read from their module only when a value is checked or a subcommand's help is shown: building
    the parser (`r3rl --help`, `r3rl plot`) imports no torch or transformers."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def _names(self) -> list[str]:
        import importlib

        return sorted(getattr(importlib.import_module(self.module), self.name))

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


PRESET_CHOICES = _LazyChoices("r3rl.models.presets", "PRESETS")


REWARD_CHOICES = _LazyChoices("r3rl.tasks.rewards", "BUILTIN_REWARDS")


REWARD_TIMEOUT_S = 60.0  # = r3rl.tasks.reward_pool.DEFAULT_REWARD_TIMEOUT_S (test_cli_imports checks they agree)
ENV_TIMEOUT_S = 60.0  # = r3rl.env_pool.DEFAULT_ENV_TIMEOUT_S (tests/test_env_pool.py checks they agree)


DEVICE_HELP = "cpu, cuda, cuda:N, or auto: cuda when available, else cpu"


def _check_output_path(flag: str, path: str | None) -> None:
    """An output file's folder must be creatable: checked before the work starts, not after it."""
    if path is None:
        return
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a directory")
            break
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a directory: give a file path")


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: r3rl runs on cpu or cuda")


def replay_config_from_args(args: argparse.Namespace):
    from r3rl.config import ReplayConfig

    return ReplayConfig(
        use_rollout_routing_replay=args.use_rollout_routing_replay, use_routing_replay=args.use_routing_replay,
        enable_r3_correctness_check=args.enable_r3_correctness_check, ci_test=args.ci_test,
        r3_check_threshold=args.r3_check_threshold,
    )


def _resolve_device(device: str) -> str:
    """`auto` (the default) is cuda when available, else cpu; torch is imported here, not when the parser is built."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
