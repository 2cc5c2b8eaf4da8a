"""Checkpoints: an HF safetensors model (`from_pretrained` and `r3rl serve` load the step directory as it is) plus
the trainer state (optimizer, scheduler, RNGs, step, data cursor), written atomically.

    SAVE/
      latest                 the name of the last complete step directory (replaced atomically)
      step_000010/           config.json, model.safetensors, tokenizer files, trainer_state.pt, reference/ (if any)

A save writes into a hidden temporary directory and renames it into place only when complete, then repoints
`latest`: a killed save never corrupts the last good checkpoint (a stale temporary directory is ignored and removed
by the next save).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

__all__ = ["save_checkpoint", "resolve_checkpoint", "load_trainer_state", "capture_rng", "restore_rng"]

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
LATEST = "latest"


def save_checkpoint(save_dir: str | Path, step: int, *, model, tokenizer, state: dict, reference=None) -> Path:
    """Write step `step` (the number of RL steps done) and point `latest` at it. Returns the step directory."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    for stale in save_dir.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:06d}"
    tmp = save_dir / f".tmp-{name}-{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if reference is not None:
        reference.save_pretrained(tmp / "reference", safe_serialization=True)
    torch.save(state, tmp / STATE_FILE)
    _fsync_dir(tmp)
    final = save_dir / name
    if final.exists():  # re-saving a step (e.g. a resumed run): move the old copy away only once the new is whole
        old = save_dir / f".tmp-old-{name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    pointer = save_dir / f".tmp-{LATEST}-{os.getpid()}"
    pointer.write_text(name + "\n")
    os.replace(pointer, save_dir / LATEST)
    _fsync_dir(save_dir)
    logger.info("saved checkpoint %s", final)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """`--load PATH`: a save directory (its `latest` step) or one step directory."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if (path / LATEST).is_file():
        step_dir = path / (path / LATEST).read_text().strip()
        if not (step_dir / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path / LATEST} points at {step_dir}, which has no {STATE_FILE}")
        return step_dir
    raise FileNotFoundError(f"--load {path}: neither a checkpoint step directory (no {STATE_FILE}) nor a save "
                            f"directory (no '{LATEST}' file)")


def load_trainer_state(step_dir: Path) -> dict:
    return torch.load(step_dir / STATE_FILE, map_location="cpu", weights_only=False)


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    for p in [*path.iterdir(), path] if path.is_dir() else [path]:
        if p.is_file() or p == path:
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)
