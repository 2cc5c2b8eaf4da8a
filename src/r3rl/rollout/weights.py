"""Weights for the rollout engine: the trainer model's tensors (in-process sync) or an HF checkpoint on disk
(`/update_weights_from_disk`), checked strictly before anything is copied.

    tensors = model_tensors(trainer_model)                  # HF names; FSDP2 DTensor shards stay sharded
    engine.update_weights(tensors, version=3, strict=True)   # gathers one tensor at a time (full_tensor)
    tensors = load_checkpoint_tensors("/ckpt/v3", dtype=torch.bfloat16, expected_shapes=engine.model.shapes)
    engine.update_weights(tensors, version=3, strict=True)

A checkpoint goes through transformers' `from_pretrained` (which maps saved names, such as per-expert weights, onto
the model's fused layout) with its loading report read back: any missing, unexpected or shape-mismatched tensor is a
`WeightLoadError` that names them. transformers itself would re-initialise a missing tensor at random and only print
a report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["WeightLoadError", "load_checkpoint_tensors", "model_tensors", "check_tensor_names", "materialize"]

logger = logging.getLogger(__name__)

# name parts that wrappers add: activation checkpointing, torch.compile (and DDP's leading "module.")
_WRAPPER_PARTS = frozenset({"_checkpoint_wrapped_module", "_orig_mod"})


class WeightLoadError(ValueError):
    """A checkpoint or tensor set does not match the served model; the message names the tensors."""


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under its HF names, detached. FSDP2's DTensor shards are NOT gathered here (their
    `.shape` is the full one, so names and shapes can be checked first): consumers gather one tensor at a time with
    `materialize`, so a sync never holds a second full copy of the model. Every rank must then consume the tensors
    in the same order (each gather is a collective)."""
    out = {}
    for name, t in model.state_dict().items():
        parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
        out[".".join(parts[1:] if parts[0] == "module" else parts)] = t.detach()
    return out


def materialize(t: torch.Tensor) -> torch.Tensor:
    """A full local tensor: a DTensor (FSDP2 shard) is all-gathered (a collective), a plain tensor is returned."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_tensor_names(tensors: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, tuple[int, ...]],
                       *, where: str, require_all: bool = True) -> None:
    """Raise WeightLoadError naming every missing (when `require_all`), unexpected and shape-mismatched tensor."""
    missing = sorted(set(expected_shapes) - set(tensors)) if require_all else []
    unexpected = sorted(set(tensors) - set(expected_shapes))
    mismatched = sorted(f"{n} (got {tuple(t.shape)}, expected {expected_shapes[n]})" for n, t in tensors.items()
                        if n in expected_shapes and tuple(t.shape) != tuple(expected_shapes[n]))
    _raise_if(where, missing=missing, unexpected=unexpected, mismatched=mismatched)


def load_checkpoint_tensors(path: str | Path, *, dtype: torch.dtype,
                            expected_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Load an HF checkpoint directory on the CPU and return its tensors under the model's names, strictly."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise WeightLoadError(f"model_path must be an HF checkpoint directory with a config.json: got {str(path)!r}")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:  # a truncated or junk safetensors file, a bad config: name the checkpoint
        files = sorted(p.name for p in path.glob("*.safetensors"))
        raise WeightLoadError(f"cannot load the checkpoint {str(path)!r} (files {files}): {type(e).__name__}: "
                              f"{e}") from None
    mismatched = [f"{name} (got {tuple(got)}, expected {tuple(want)})"
                  for name, got, want in info.get("mismatched_keys", [])]
    _raise_if(f"checkpoint {str(path)!r}", missing=sorted(info.get("missing_keys", [])),
              unexpected=sorted(info.get("unexpected_keys", [])), mismatched=mismatched)
    tensors = model_tensors(model)
    check_tensor_names(tensors, expected_shapes, where=f"checkpoint {str(path)!r} against the served model")
    return tensors


def _raise_if(where: str, *, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
    parts = [f"{kind} {names[:8]}{' ...' if len(names) > 8 else ''} ({len(names)})"
             for kind, names in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched))
             if names]
    if parts:
        raise WeightLoadError(f"{where}: every tensor must be a weight of the model, with its shape (and, for a full "
                              f"update, every weight must be there): got {'; '.join(parts)}")
