"""ExpertsTap: the experts each training forward really used, read where the experts consume them.

    tap = ExpertsTap(model)            # the experts module of every MoE layer, found through the router adapters
    with tap.reading() as used:        # forward pre-hooks, removed on exit
        model(input_ids)
    ids_NLK = used.ids()               # [N tokens, L MoE layers, K], in the forward's token order

transformers v5 passes the selected experts (`top_k_index`) to every `*Experts` module, whatever produced them: the
live router, a replay, or a bug in between. The tap reads that argument, so the routing metrics
(`r3rl.train.metrics.routing_mismatch_per_layer`) measure what the experts computed with, never the replay's own
record of what it meant to replay. A checkpoint recompute in backward is not read (it runs the same rows again; the
R3 check covers it as stage `replay_backward`).

Tensor suffixes: N tokens, L MoE layers, K top-k.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from r3rl.models.adapters import BUILTIN_ADAPTERS, AdapterRegistry, find_routers

__all__ = ["ExpertsTap", "ExpertsReading"]


class ExpertsReading:
    """The experts ids that each MoE layer's experts module received during one `reading()`, in call order."""

    def __init__(self, num_layers: int) -> None:
        self.ids_per_layer: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def ids(self) -> torch.Tensor:
        """`[N, L, K]` int64 on the host: every first-pass call of each layer concatenated in call order."""
        return self.stacked().long().cpu()

    def stacked(self) -> torch.Tensor:
        """The same `[N, L, K]` ids on the device they were read on, in their own dtype: no host sync."""
        counts = [len(calls) for calls in self.ids_per_layer]
        if len(set(counts)) != 1 or counts[0] == 0:
            raise RuntimeError(f"experts tap: calls per MoE layer={counts} (expected the same non-zero count for every "
                               "layer: did the forward run inside reading()?)")
        return torch.stack([torch.cat(calls) for calls in self.ids_per_layer], dim=1)


class ExpertsTap:
    """Reads `top_k_index` at the input of every MoE layer's experts module (`<moe block>.experts`)."""

    def __init__(self, model: nn.Module, adapters: AdapterRegistry = BUILTIN_ADAPTERS) -> None:
        self.experts: list[nn.Module] = []
        for site in find_routers(model, adapters):
            experts = getattr(site.moe_block, "experts", None)
            if not isinstance(experts, nn.Module):
                raise TypeError(f"MoE layer {site.layer} ({site.moe_block_name}, {type(site.moe_block).__name__}) has "
                                "no `experts` module: the experts tap cannot read the routing it computes with")
            self.experts.append(experts)
        self.num_layers = len(self.experts)

    @contextlib.contextmanager
    def reading(self) -> Iterator[ExpertsReading]:
        reading = ExpertsReading(self.num_layers)
        handles = [m.register_forward_pre_hook(self._hook(reading, layer), with_kwargs=True)
                   for layer, m in enumerate(self.experts)]
        try:
            yield reading
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _hook(reading: ExpertsReading, layer: int):
        def hook(module, args, kwargs):
            if torch._C._current_graph_task_id() != -1:  # a checkpoint recompute inside backward: read once only
                return None
            ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
            reading.ids_per_layer[layer].append(ids.detach().reshape(-1, ids.shape[-1]))
            return None

        return hook
