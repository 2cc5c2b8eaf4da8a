"""A CPU stack of real megatron-core routers (`TopKRouter` + native `RouterReplay`) for the replay tests.

mcore's `Router.gating` moves the gate weight to CUDA, so a GPTModel's forward needs a GPU. Everything after the
gate runs on CPU: `TopKRouter.routing` (z-loss, `topk_routing_with_score_function`, the native RouterReplay branch).
`MoEStack` computes the gate logits itself (`linear(h, weight, bias)`, what `router_gating_linear` computes) and then
calls mcore's `routing`, so replay, gradients and recompute go through mcore's own code. Its experts read the
routing map mcore returned (the experts' input): `used` holds, per forward call, the experts each token used,
read there, independently of the replay. Imported by the tests after `pytest.importorskip("megatron.core")`.
"""

import warnings

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

H, E, TOPK = 16, 8, 2


def make_config(num_layers: int, moe_layer_freq=1, *, replay: bool = True, mtp_num_layers: int | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerConfig(
            num_layers=num_layers, hidden_size=H, num_attention_heads=2, num_moe_experts=E, moe_router_topk=TOPK,
            moe_layer_freq=moe_layer_freq, moe_enable_routing_replay=replay, moe_router_load_balancing_type="none",
            use_cpu_initialization=True, mtp_num_layers=mtp_num_layers,
        )


class MoEStack(nn.Module):
    """Decoder layers `layer_offset + 1 ..`: MoE layers (mcore router + dense-combined experts) or dense layers.
    Tokens do not mix (no attention), so a token's routing depends only on its own input: layouts are testable."""

    def __init__(self, config, layer_numbers, moe_numbers, *, seed: int = 0, recompute: str | None = None):
        super().__init__()
        torch.manual_seed(seed)
        pg = ProcessGroupCollection(tp=None, cp=None, tp_cp=None, tp_dp_cp=None)
        self.layer_numbers = list(layer_numbers)
        self.routers = nn.ModuleDict()
        self.mix = nn.ParameterDict()
        for n in self.layer_numbers:
            if n in moe_numbers:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    router = TopKRouter(config, pg_collection=pg)
                router.set_layer_number(n)
                self.routers[str(n)] = router
                self.mix[str(n)] = nn.Parameter(torch.randn(E, H, H) / H**0.5)
            else:
                self.mix[str(n)] = nn.Parameter(torch.randn(H, H) / H**0.5)
        self.recompute = recompute  # None, "reentrant" (mcore's CheckpointFunction is reentrant) or "non-reentrant"
        self.used: dict[int, list[torch.Tensor]] = {n: [] for n in self.layer_numbers if str(n) in self.routers}

    def forward(self, h_SBH: torch.Tensor) -> torch.Tensor:
        for n in self.layer_numbers:
            if self.recompute is None:
                h_SBH = self._layer(n, h_SBH)
            else:
                h_SBH = checkpoint(self._layer, n, h_SBH, use_reentrant=self.recompute == "reentrant")
        return h_SBH

    def _layer(self, n: int, h_SBH: torch.Tensor) -> torch.Tensor:
        if str(n) not in self.routers:
            return h_SBH + torch.tanh(h_SBH @ self.mix[str(n)])
        router = self.routers[str(n)]
        S, B, _ = h_SBH.shape
        logits_SBE = nn.functional.linear(h_SBH, router.weight, router.bias)  # what router_gating_linear computes
        probs_TE, map_TE = router.routing(logits_SBE)  # mcore's routing: replay branch, probs from the live scores
        if torch._C._current_graph_task_id() == -1:  # the experts' input, read on the first pass only
            self.used[n].append(map_TE.detach().clone())
        x_TH = h_SBH.reshape(S * B, H)
        y_TH = torch.einsum("te,eij,ti->tj", probs_TE, self.mix[str(n)], x_TH)
        return h_SBH + torch.tanh(y_TH).view(S, B, H)


def used_ids(map_TE: torch.Tensor) -> torch.Tensor:
    """Sorted expert ids per token from a routing map (the experts' view)."""
    return map_TE.nonzero()[:, 1].view(map_TE.shape[0], -1)

