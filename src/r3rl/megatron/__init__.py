"""r3rl for Megatron-core (the optional extra `r3rl[megatron]`): R3 on mcore's native RouterReplay.

- `layout`: per-sample traces -> the ids one rank's routers see (THD packing / right padding, CP zigzag, SP scatter,
  pipeline-stage layer maps). Pure torch: importable without megatron-core.
- `replay`: `MegatronReplay`, which drives mcore's `RouterReplay` keyed by layer number and runs r3rl's
  `ReplayCheck` on mcore's routers. Needs megatron-core (>= 0.16): import it as `r3rl.megatron.replay`.

See docs/megatron.md for the hook points in a Megatron training loop (miles, slime, NeMo-RL).
"""

from r3rl.megatron.layout import (
    RankLayout,
    moe_layer_numbers,
    pack_thd,
    pad_bshd,
    rank_router_batch,
    router_order_bshd,
    sp_scatter,
    stage_trace_layers,
    thd_cp_slice,
    zigzag_cp_slice,
)

__all__ = ["RankLayout", "moe_layer_numbers", "pack_thd", "pad_bshd", "rank_router_batch", "router_order_bshd",
           "sp_scatter", "stage_trace_layers", "thd_cp_slice", "zigzag_cp_slice"]
