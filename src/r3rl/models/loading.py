"""Load a local HF MoE checkpoint (or make a preset on the fly) for training or rollout. Nothing is fetched."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from r3rl.models.adapters import find_routers

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype '{name}': choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    experts_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a local checkpoint and fail early, naming the class, if r3rl cannot replay its routers."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}: pass a local HF checkpoint dir (see `r3rl init-model`)")
    kwargs = {"dtype": resolve_dtype(dtype), "local_files_only": True}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as e:  # truncated, empty or junk safetensors (SafetensorError); a broken config
        files = sorted(p.name for p in path.glob("*.safetensors"))
        raise CheckpointError(f"cannot load the checkpoint {str(path)!r} (weight files {files}): "
                              f"{type(e).__name__}: {e}") from None
    check_loading_info(f"checkpoint {str(path)!r}", info)
    model = model.to(device)
    sites = find_routers(model)
    logger.info("loaded %s from %s: %d MoE layers, %d experts, top-%d", type(model).__name__, path, len(sites),
                sites[0].num_experts, sites[0].top_k)
    return model.eval()


class CheckpointError(ValueError):
    """A checkpoint that does not hold exactly the model's weights, or cannot be read; the message names them."""


def check_loading_info(where: str, info: dict) -> None:
    """Refuse what transformers only reports: missing tensors (it would initialise them at random), unexpected ones
    and shape mismatches. `info` is `from_pretrained(..., output_loading_info=True)`'s second value."""
    parts = []
    for kind, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                      ("shape-mismatched", "mismatched_keys")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key, []) or [])
        if names:
            parts.append(f"{kind} {names[:8]}{' ...' if len(names) > 8 else ''} ({len(names)})")
    if parts:
        raise CheckpointError(f"{where} does not hold exactly the model's weights: {'; '.join(parts)} (a missing "
                              "tensor would be initialised at random and trained or served silently)")


def cache_kwargs(model: PreTrainedModel, cache) -> dict:
    """The KV-cache keyword of this transformers version (`cache` from 5.2x, `past_key_values` before)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def set_activation_checkpointing(model: PreTrainedModel, enabled: bool, *, context_fn=None) -> None:
    """Non-reentrant activation checkpointing of every decoder layer, across transformers 5.x spellings.

    `context_fn`: torch.utils.checkpoint's hook; pass `RoutingReplay.checkpoint_context_fn` so that every recompute
    replays what its own forward replayed."""
    if enabled:
        kwargs = {"use_reentrant": False} | ({"context_fn": context_fn} if context_fn is not None else {})
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        fn = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        fn()
