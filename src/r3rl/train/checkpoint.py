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

Loading never runs code from the checkpoint: `trainer_state.pt` and `rng_rank*.pt` hold only tensors and plain
data (dicts, lists, tuples, str, int, float, bool, None; the numpy RNG state as a list of ints) and are read with
`torch.load(weights_only=True)`. A file that holds anything else (a pickle that would construct objects or call
functions), or that is truncated or not a torch file, is a ValueError that names the file; nothing in it runs.
A sharded checkpoint's `dcp/.metadata` (a plain pickle in torch.distributed.checkpoint) is read by an unpickler that
admits only DCP's metadata classes, torch sizes, dtypes and paths, and its non-tensor items (torch.load with
weights_only=False in DCP's default planner) must load with weights_only=True first.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
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
        check_dcp_metadata(step_dir / DCP_DIR / ".metadata")  # a one-line error before dcp's own wrapping
        dcp.load(sd, checkpoint_id=str(step_dir / DCP_DIR), storage_reader=_safe_dcp_reader(step_dir / DCP_DIR),
                 planner=_safe_dcp_planner())
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
    """The trainer state of `step_dir`, with this rank's RNG states (tensors and plain data only, see above)."""
    state = _load_plain(step_dir / STATE_FILE)
    for key in ("step", "scheduler", "rng", "prompts"):
        if key not in state:
            raise ValueError(f"{step_dir / STATE_FILE}: not an r3rl trainer state (no '{key}'; keys: {sorted(state)})")
    rng_file = step_dir / f"rng_rank{rank}.pt"
    if rank and rng_file.is_file():
        state["rng"] = _load_plain(rng_file)["rng"]
    return state


def capture_rng() -> dict:
    """The RNG states as tensors and plain data (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_plain(path: Path) -> dict:
    """`torch.load(path, weights_only=True)`, every failure a one-line ValueError naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what weights_only refuses: a global, a reduce, an unknown opcode
        raise ValueError(f"{path}: refused to load: it is not tensors and plain data, as a trainer state is (damaged, "
                         "tampered with, or not written by this r3rl); nothing in it was run") from None
    except Exception as e:  # truncated, not a torch file, unreadable: whatever the reader tripped on
        text = str(e).strip().splitlines()
        raise ValueError(f"{path}: cannot be read as a trainer state, the checkpoint is damaged or incomplete "
                         f"({type(e).__name__}{': ' + text[0][:160] if text else ''})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not an r3rl trainer state (a {type(state).__name__}, expected a dict)")
    return state


def check_dcp_metadata(path: Path):
    """The metadata of a torch.distributed.checkpoint directory, unpickled with only its own classes admitted."""
    try:
        return _DcpMetadataUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load: {e}; a sharded checkpoint's metadata holds only DCP's metadata "
                         "classes (damaged, tampered with, or not written by torch.distributed.checkpoint); nothing "
                         "in it was run") from None
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as sharded checkpoint metadata, the checkpoint is damaged or "
                         f"incomplete ({type(e).__name__}: {str(e)[:160]})") from None


class _DcpMetadataUnpickler(pickle.Unpickler):
    _OTHERS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.metadata as meta

        if module == meta.__name__:
            ok = isinstance(getattr(meta, name, None), type) and getattr(meta, name).__module__ == module
        elif module == "torch" and name != "Size":
            ok = isinstance(getattr(torch, name, None), torch.dtype)
        else:
            ok = (module, name) in self._OTHERS
        if not ok:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which sharded checkpoint metadata never does")
        return super().find_class(module, name)


def _safe_dcp_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _Reader(FileSystemReader):  # FileSystemReader.read_metadata with the admitting unpickler
        def read_metadata(self, *args, **kwargs):
            metadata = check_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _Reader(str(path))


def _safe_dcp_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class _Planner(DefaultLoadPlanner):  # non-tensor items: loadable with weights_only=True, else refused
        def load_bytes(self, read_item, value) -> None:
            data = value.read()
            try:
                torch.load(io.BytesIO(data), weights_only=True)
            except Exception as e:
                raise ValueError(f"sharded checkpoint item {read_item.dest_index.fqn}: refused to load "
                                 f"({type(e).__name__}); nothing in it was run") from None
            super().load_bytes(read_item, io.BytesIO(data))

    return _Planner()


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
