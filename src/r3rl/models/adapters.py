"""Router adapters: find the MoE routers of a transformers v5 model and split routing into three parts.

  scores      live router logits and probabilities (always computed by the live router, so it gets gradients)
  selection   which experts: the live top-k, or replayed ids (the only thing replay changes)
  gate        routing weights gathered from the live probabilities at the selected ids, normalized the way the
              family normalizes them (softmax over all experts, optional top-k renormalization, dtype cast)

With the live top-k as selection, `routed_forward` is bitwise identical to the family's own router forward: the
gate gathers the very values `torch.topk` returned and applies the same operations in the same order.

Supported families (transformers v5 classes): Qwen3-MoE, Qwen2-MoE (shared expert is not routed and needs
nothing), Mixtral, OLMoE. A model with a router class no adapter knows raises `UnsupportedRouterError` naming the
class: r3rl never silently runs without replay.

Tensor suffixes: T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RouterAdapter",
    "RouterSite",
    "UnsupportedRouterError",
    "find_routers",
    "routed_forward",
    "AdapterRegistry",
    "BUILTIN_ADAPTERS",
    "RouterOrderError",
]

# A module whose class name matches this and that no adapter knows is treated as an unknown MoE router.
_ROUTER_NAME = re.compile(r"(Router|MoeGate|MoEGate|TopkGate|TopKGate)$")


class RouterOrderError(RuntimeError):
    """The routers of a model were not found in decoder-layer order, so trace layer l would not be MoE layer l."""


class UnsupportedRouterError(TypeError):
    """The model has an MoE router class that no r3rl adapter supports."""


@dataclass(frozen=True)
class RouterAdapter:
    """How one family's router scores and normalizes. Families here share softmax-then-top-k routing."""

    family: str
    renormalize: Callable[[nn.Module], bool]  # renormalize the top-k weights to sum to 1?
    cast_to_logits_dtype: bool  # the family casts gate weights back to the logits dtype
    upcast_logits: bool = False  # softmax(logits.float()) instead of softmax(logits, dtype=float32), as Mixtral does

    def num_experts(self, router: nn.Module) -> int:
        return int(router.num_experts)

    def top_k(self, router: nn.Module) -> int:
        return int(router.top_k)

    def scores(self, router: nn.Module, hidden_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Live logits (model dtype) and float32 probabilities over all experts."""
        logits_TE = F.linear(hidden_TH, router.weight)
        if self.upcast_logits:
            probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        else:
            probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        return logits_TE, probs_TE

    def gate_weights(
        self, router: nn.Module, logits_TE: torch.Tensor, probs_TE: torch.Tensor, ids_TK: torch.Tensor
    ) -> torch.Tensor:
        weights_TK = probs_TE.gather(1, ids_TK)
        if self.renormalize(router):
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if self.cast_to_logits_dtype:
            weights_TK = weights_TK.to(logits_TE.dtype)
        return weights_TK


@dataclass(frozen=True)
class RouterSite:
    """One router in a model: its MoE layer index (the trace's layer axis), module path, module, adapter, and the
    index of the decoder layer it sits in (differs from `layer` when some decoder layers are dense)."""

    layer: int
    name: str
    router: nn.Module
    adapter: RouterAdapter
    decoder_layer: int | None = None

    @property
    def num_experts(self) -> int:
        return self.adapter.num_experts(self.router)

    @property
    def top_k(self) -> int:
        return self.adapter.top_k(self.router)


Selection = Callable[[torch.Tensor], torch.Tensor]  # probs_TE -> ids_TK


def routed_forward(
    site: RouterSite, hidden: torch.Tensor, select: Selection | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The family router's forward with a pluggable selection. Returns (logits_TE, weights_TK, ids_TK)."""
    router, adapter = site.router, site.adapter
    hidden_TH = hidden.reshape(-1, router.weight.shape[1])
    logits_TE, probs_TE = adapter.scores(router, hidden_TH)
    ids_TK = torch.topk(probs_TE, adapter.top_k(router), dim=-1).indices if select is None else select(probs_TE)
    return logits_TE, adapter.gate_weights(router, logits_TE, probs_TE, ids_TK), ids_TK


# --- registry -------------------------------------------------------------------------------------------------------
_BY_NORM_TOPK = RouterAdapter("softmax-topk", renormalize=lambda r: bool(r.norm_topk_prob), cast_to_logits_dtype=True)
_MIXTRAL = RouterAdapter("mixtral", renormalize=lambda r: True, cast_to_logits_dtype=False, upcast_logits=True)

# (module, class name) -> adapter. Classes are resolved lazily so that importing r3rl imports no model code.
_KNOWN: dict[tuple[str, str], RouterAdapter] = {
    ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeTopKRouter"): _BY_NORM_TOPK,
    ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeTopKRouter"): _BY_NORM_TOPK,
    ("transformers.models.olmoe.modeling_olmoe", "OlmoeTopKRouter"): _BY_NORM_TOPK,
    ("transformers.models.mixtral.modeling_mixtral", "MixtralTopKRouter"): _MIXTRAL,
}


@dataclass(frozen=True)
class AdapterRegistry:
    """Which adapter routes which router class: the built-in families by (module, class name), resolved lazily so
    that importing r3rl imports no model code, plus classes registered explicitly. Immutable: `with_adapter`
    returns a new registry, which the caller passes to `find_routers` / `RoutingReplay(adapters=...)`."""

    known: tuple[tuple[tuple[str, str], RouterAdapter], ...] = tuple(_KNOWN.items())
    extra: tuple[tuple[type, RouterAdapter], ...] = ()

    def with_adapter(self, router_cls: type, adapter: RouterAdapter) -> AdapterRegistry:
        """A registry that also knows `router_cls` (e.g. a family outside transformers)."""
        return AdapterRegistry(self.known, (*[(c, a) for c, a in self.extra if c is not router_cls],
                                            (router_cls, adapter)))

    def adapter_for(self, router_cls: type) -> RouterAdapter | None:
        """The adapter of `router_cls` or of its nearest known base class (FSDP2 and user subclasses keep theirs)."""
        extra, known = dict(self.extra), dict(self.known)
        for cls in router_cls.__mro__:
            if cls in extra:
                return extra[cls]
            adapter = known.get((cls.__module__, cls.__name__))
            if adapter is not None:
                return adapter
        return None

    def class_names(self) -> list[str]:
        return sorted([c for (_, c), _ in self.known] + [c.__name__ for c, _ in self.extra])


BUILTIN_ADAPTERS = AdapterRegistry()


def adapter_for(router_cls: type, adapters: AdapterRegistry = BUILTIN_ADAPTERS) -> RouterAdapter | None:
    return adapters.adapter_for(router_cls)


def find_routers(model: nn.Module, adapters: AdapterRegistry = BUILTIN_ADAPTERS) -> list[RouterSite]:
    """All MoE routers of `model`, in layer order, with their MoE layer index.

    Raises `UnsupportedRouterError` naming the class if a router-like module has no adapter, or if the model has no
    MoE router at all.
    """
    sites: list[RouterSite] = []
    for name, module in model.named_modules():
        cls = type(module)
        adapter = adapters.adapter_for(cls)
        if adapter is not None:
            m = re.search(r"layers\.(\d+)\.", name)
            sites.append(RouterSite(layer=len(sites), name=name, router=module, adapter=adapter,
                                    decoder_layer=int(m.group(1)) if m else None))
        elif _ROUTER_NAME.search(cls.__name__) or (_looks_like_router(module)):
            raise UnsupportedRouterError(
                f"unsupported MoE router class {cls.__module__}.{cls.__name__} at '{name}' in "
                f"{type(model).__name__}: r3rl has no adapter for it, so routing cannot be recorded or replayed. "
                f"Supported: {adapters.class_names()}; add one with AdapterRegistry.with_adapter() and pass the "
                f"registry (find_routers(model, adapters) / RoutingReplay(model, adapters=...))."
            )
    if not sites:
        raise UnsupportedRouterError(
            f"no MoE router found in {type(model).__name__}: r3rl replays routing of MoE models only "
            f"(supported router classes: {adapters.class_names()})"
        )
    _check_layer_order(sites)
    return sites


def _looks_like_router(module: nn.Module) -> bool:
    """A module holding a [num_experts, hidden] weight with top_k/num_experts attributes is a router, known or not."""
    return hasattr(module, "top_k") and (hasattr(module, "num_experts") or hasattr(module, "n_routed_experts")) and (
        isinstance(getattr(module, "weight", None), torch.Tensor)
    )


def _check_layer_order(sites: list[RouterSite]) -> None:
    layer_numbers = [s.decoder_layer for s in sites if s.decoder_layer is not None]
    if len(layer_numbers) == len(sites) and layer_numbers != sorted(layer_numbers):
        raise RouterOrderError(f"routers must be found in decoder-layer order (the trace's layer axis follows it): got "
                               f"decoder layers {layer_numbers} for {[s.name for s in sites]}")


def load_known_router_classes() -> list[type]:
    """Import the supported router classes (for tests and docs)."""
    return [getattr(importlib.import_module(mod), cls) for mod, cls in _KNOWN]
