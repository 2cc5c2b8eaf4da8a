"""Weights for the rollout engine: the trainer model's tensors (in-process sync) or an HF checkpoint on disk
(`/update_weights_from_disk`), checked strictly before anything is copied.

    tensors = model_tensors(trainer_model)                  # HF names; FSDP2 DTensor shards stay sharded
    engine.update_weights(tensors, version=3, strict=True)   # gathers one tensor at a time (full_tensor)
    tensors = load_checkpoint_tensors("/ckpt/v3", dtype=torch.bfloat16, expected_shapes=engine.model.shapes)
    engine.update_weights(tensors, version=3, strict=True)

Before anything is allocated, `check_checkpoint_files` compares the checkpoint's config.json with the served model's
(every size: hidden, vocab, layers, heads, experts, ...) and reads the safetensors headers only (names, shapes,
sizes), so a config that claims a bigger model, or a file with more or larger tensors than the model has, is refused
in milliseconds instead of being built first. Then the checkpoint goes through transformers' `from_pretrained`
(which maps saved names, such as per-expert weights, onto the model's fused layout) with its loading report read
back: any missing, unexpected or shape-mismatched tensor is a `WeightLoadError` that names them. transformers itself
would re-initialise a missing tensor at random and only print a report.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["WeightLoadError", "check_checkpoint_files", "hf_config_dict", "load_checkpoint_tensors", "model_tensors",
           "check_tensor_names", "materialize"]

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


def read_config(path: str | Path) -> dict:
    """A checkpoint directory's config.json as a dict (at most _MAX_CONFIG_BYTES), or WeightLoadError."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise WeightLoadError(f"model_path must be an HF checkpoint directory with a config.json: got {str(path)!r}")
    if f.stat().st_size > _MAX_CONFIG_BYTES:
        raise WeightLoadError(f"{str(f)!r} must be at most {_MAX_CONFIG_BYTES} bytes: got {f.stat().st_size}")
    try:
        config = json.loads(f.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise WeightLoadError(f"{str(f)!r} must be valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise WeightLoadError(f"{str(f)!r} must hold a JSON object: got {type(config).__name__}")
    return config


def hf_config_dict(path: str | Path) -> dict:
    """The checkpoint's config as transformers resolves it (defaults filled in; no weights, no remote code)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True).to_dict()
    except Exception as e:
        raise WeightLoadError(f"cannot read the config of checkpoint {str(path)!r}: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}") from None


_PER_EXPERT = re.compile(r"\.experts\.\d+\.")  # HF's per-expert names of fused experts


def check_checkpoint_files(path: str | Path, *, served_config: Mapping,
                           expected_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse, before anything is allocated, a checkpoint that cannot be the served model: its config (as
    transformers resolves it, `hf_config_dict`) must agree with `served_config` (the same, of the served model) on
    the model type and every size (keys such as hidden_size, vocab_size, num_hidden_layers, num_experts, also inside
    sub-configs), and its safetensors headers (read, not the tensors)
    must name only weights of the model, each with its shape, and hold no more elements in all than the model has."""
    path = Path(path)
    read_config(path)  # bounded and JSON before transformers parses it
    got, want = _size_fields(hf_config_dict(path)), _size_fields(served_config)
    diff = [f"{k} (got {got.get(k, 'absent')!r}, expected {v!r})" for k, v in sorted(want.items()) if got.get(k) != v]
    if diff:
        raise WeightLoadError(f"checkpoint {str(path)!r}: config.json must describe the served model: "
                              f"{'; '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"checkpoint {str(path)!r} must hold its weights as *.safetensors files: found none")
    from safetensors import safe_open

    budget = sum(math.prod(s) for s in expected_shapes.values())
    total, mismatched, unexpected = 0, [], []
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:  # the header only: the file is mapped, not read
                for name in st.keys():  # noqa: SIM118 - safe_open is not a dict
                    shape = tuple(st.get_slice(name).get_shape())
                    total += math.prod(shape)
                    if name not in expected_shapes:  # per-expert names are converted to fused ones on load
                        if not _PER_EXPERT.search(name):
                            unexpected.append(name)
                    elif shape != tuple(expected_shapes[name]):
                        mismatched.append(f"{name} (got {shape}, expected {tuple(expected_shapes[name])})")
        except Exception as e:  # a truncated or junk file
            raise WeightLoadError(f"cannot read the safetensors header of {str(f)!r}: {type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:300]}") from None
    _raise_if(f"checkpoint {str(path)!r} (safetensors headers)", missing=[], unexpected=[], mismatched=mismatched)
    if total > budget:
        raise WeightLoadError(f"checkpoint {str(path)!r}: its safetensors files must hold at most the served model's "
                              f"{budget} elements: got {total} (files {[f.name for f in files]}"
                              + (f"; unexpected names {unexpected[:8]}" if unexpected else "") + ")")


def load_checkpoint_tensors(path: str | Path, *, dtype: torch.dtype,
                            expected_shapes: Mapping[str, tuple[int, ...]],
                            served_config: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Load an HF checkpoint directory on the CPU and return its tensors under the model's names, strictly.
    With `served_config`, `check_checkpoint_files` runs first (before anything is allocated)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if served_config is not None:
        check_checkpoint_files(path, served_config=served_config, expected_shapes=expected_shapes)
    read_config(path)
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


_MAX_CONFIG_BYTES = 4 * 2**20
# config keys that fix the model's tensor shapes (or its routing): every int under such a name must agree
_SIZE_KEY = re.compile(r"size|dim|vocab|layers|heads|experts|^num_|^n_|_num_")


def _size_fields(config: Mapping, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_size_fields(v, f"{key}."))
        elif k == "model_type" or (isinstance(v, int) and not isinstance(v, bool) and _SIZE_KEY.search(k)):
            out[key] = v
    return out


def _raise_if(where: str, *, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
    parts = [f"{kind} {names[:8]}{' ...' if len(names) > 8 else ''} ({len(names)})"
             for kind, names in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched))
             if names]
    if parts:
        raise WeightLoadError(f"{where}: every tensor must be a weight of the model, with its shape (and, for a full "
                              f"update, every weight must be there): got {'; '.join(parts)}")
