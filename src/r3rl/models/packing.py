"""Packing: how a family's training forward keeps samples apart when they sit back to back in one row.

    packing = model_packing(find_routers(model))          # the family adapters' property
    masks = LayerMasks(model.config, dtype=torch.float32)  # LAYER_MASKS families: {layer type: 4D mask}
    model(input_ids=ids_1S, position_ids=pos_1S, attention_mask=masks(pos_1S), use_cache=False)

transformers v5 reads packing from position ids that restart at 0 when no attention mask is given
(`masking_utils.find_packed_sequence_indices`): every mask function then ANDs a block-diagonal term in. That only
works where the model passes the position ids to its mask functions. GPT-OSS (5.17-5.25) does not, so its
sliding-window and full layers let a sample see its predecessors; its forward does take a ready
{layer type: mask} mapping, which `LayerMasks` builds with the same transformers functions, given the position ids.
Qwen3-Next's gated delta net (linear attention) has no sequence boundary in transformers' torch path: its
`cu_seqlens` reach only the flash-linear-attention kernels, so its recurrent state and its causal convolution run
across samples. It is trained padded.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from r3rl.models.adapters import RouterSite

__all__ = ["Packing", "LayerMasks", "model_packing"]


class Packing(enum.Enum):
    """How a family's transformers forward keeps packed samples (back to back in one row) apart."""

    POSITION_IDS = "position_ids"
    """Its forward builds block-diagonal masks from position ids that restart at 0 (no attention mask passed)."""
    LAYER_MASKS = "layer_masks"
    """Its forward builds its masks without the position ids, but takes a ready {layer type: 4D mask} mapping:
    `LayerMasks` builds each from the position ids with transformers' own mask functions (GPT-OSS)."""
    NONE = "none"
    """No sequence boundary in transformers' torch path (a linear-attention state runs across the row): padded."""


def model_packing(sites: Sequence[RouterSite]) -> Packing:
    """How a model's samples can be packed: the most restrictive of its routers' families (NONE > LAYER_MASKS)."""
    kinds = {s.adapter.packing for s in sites}
    for kind in (Packing.NONE, Packing.LAYER_MASKS):
        if kind in kinds:
            return kind
    return Packing.POSITION_IDS


class LayerMasks:
    """Position ids `[B, S]` of packed rows -> {layer type: the mask transformers builds for it, block-diagonal}.

    `dtype` is the forward's compute dtype (eager attention adds a float mask of that dtype). Layer types other than
    full and sliding-window attention are refused: their mask function is not known here."""

    def __init__(self, config, *, dtype: torch.dtype) -> None:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        types = list(dict.fromkeys(getattr(config, "layer_types", None) or ["full_attention"]))
        unknown = [t for t in types if t not in makers]
        if unknown:
            raise ValueError(f"cannot build packed masks for layer types {unknown} of {config.model_type}: known "
                             f"{sorted(makers)}")
        self.config, self.dtype = config, dtype
        self.makers = {t: makers[t] for t in types}

    def __call__(self, position_ids_BS: torch.Tensor) -> dict[str, torch.Tensor | None]:
        # the mask functions read only the batch size, length, dtype and device of the embeddings
        shape_BS0 = torch.empty(*position_ids_BS.shape, 0, dtype=self.dtype, device=position_ids_BS.device)
        # positional: the cache argument is `past_key_values` before 5.2x and `cache` after
        return {t: make(self.config, shape_BS0, None, None, position_ids_BS) for t, make in self.makers.items()}
