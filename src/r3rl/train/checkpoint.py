"""Checkpoints: an HF safetensors model (`from_pretrained` and `r3rl serve` load the step directory as it is) plus
the trainer state (optimizer, scheduler, RNGs, step, data cursor), written atomically.

    SAVE/
      latest                 the name of the last complete step directory (replaced atomically)
      step_000010/           config.json, model.safetensors, tokenizer files, trainer_state.pt, reference/ (if any)
        dcp/                 torchrun runs: the sharded model and optimizer (torch.distributed.checkpoint), one file
                             per rank; the HF files beside it are the gathered export
        rng_rank1.pt ...     torchrun runs: each rank's RNG states (rank 0's are in trainer_state.pt)

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

__all__ = ["save_checkpoint", "resolve_checkpoint", "load_trainer_state", "load_optimizer_state", "capture_rng",
           "restore_rng"]

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
DCP_DIR = "dcp"
LATEST = "latest"


def save_checkpoint(save_dir: str | Path, step: int, *, model, tokenizer, state: dict, optimizer=None, reference=None,
                    env=None) -> Path:
    """Write step `step` (the number of RL steps done) and point `latest` at it. Returns the step directory.

    Under torchrun (`env.distributed`) every rank calls it: the sharded model and optimizer go through
    torch.distributed.checkpoint, rank 0 writes the gathered HF export and the trainer state."""
    distributed = env is not None and env.distributed
    main = env is None or env.is_main
    save_dir = Path(save_dir)
    name = f"step_{step:06d}"
    tmp = save_dir / f".tmp-{name}" if distributed else save_dir / f".tmp-{name}-{os.getpid()}"
    if main:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    if distributed:
        env.barrier()
        _save_sharded(tmp, model, optimizer, reference, tokenizer, state, env)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if reference is not None:
            reference.save_pretrained(tmp / "reference", safe_serialization=True)
        torch.save(state | ({"optimizer": optimizer.state_dict()} if optimizer is not None else {}), tmp / STATE_FILE)
    final = save_dir / name
    if main:
        _fsync_dir(tmp)
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
    if distributed:
        env.barrier()
    return final


def _save_sharded(tmp: Path, model, optimizer, reference, tokenizer, state: dict, env) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only, one tensor at a time
    export = get_model_state_dict(model, options=full)
    ref_export = get_model_state_dict(reference, options=full) if reference is not None else None
    if env.rank:
        torch.save({"rng": state["rng"]}, tmp / f"rng_rank{env.rank}.pt")
        return
    model.save_pretrained(tmp, state_dict=export, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if ref_export is not None:
        reference.save_pretrained(tmp / "reference", state_dict=ref_export, safe_serialization=True)
    torch.save(state | {"world_size": env.world_size}, tmp / STATE_FILE)


def load_optimizer_state(step_dir: Path, model, optimizer, state: dict, *, env=None) -> None:
    """Restore the optimizer (and, for a sharded checkpoint, the exact float32 model shards) of `step_dir`."""
    distributed = env is not None and env.distributed
    if (step_dir / DCP_DIR).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        saved_world = state.get("world_size")
        if distributed and saved_world is not None and saved_world != env.world_size:
            logger.info("resharding %s: saved by %d ranks, loaded by %d", step_dir, saved_world, env.world_size)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(step_dir / DCP_DIR))
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        return
    if distributed:
        raise ValueError(f"{step_dir} was saved by a single process (a full optimizer state, no {DCP_DIR}/): resume "
                         "it with one process, or start the torchrun run from its HF weights with --model")
    optimizer.load_state_dict(state["optimizer"])


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


def load_trainer_state(step_dir: Path, *, rank: int = 0) -> dict:
    """The trainer state of `step_dir`, with this rank's RNG states."""
    state = torch.load(step_dir / STATE_FILE, map_location="cpu", weights_only=False)
    rng_file = step_dir / f"rng_rank{rank}.pt"
    if rank and rng_file.is_file():
        state["rng"] = torch.load(rng_file, map_location="cpu", weights_only=False)["rng"]
    return state


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
