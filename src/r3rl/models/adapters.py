"""Router adapters: find the MoE routers of a transformers v5 model and split routing into three parts.

  scores      live router logits and scores (always computed by the live router, so it gets gradients)
  selection   which experts: the family's live top-k (with its selection bias and group limits), or replayed ids
              (the only thing replay changes; no group masking is re-applied to them)
  gate        routing weights gathered from the live scores (never the selection bias) at the selected ids,
              normalized and scaled the way the family does it

The arithmetic lives once, on plain tensors, in `r3rl.models.routing` (the rollout engine calls it too). An adapter
says how a family's router module maps onto it: its constants (`RouterSpec`, read once per site) and where its
tensors are. With the live selection `routed_forward` is bitwise identical to the family's own router forward.

Supported families (transformers v5 router classes): Qwen3-MoE, Qwen2-MoE (shared expert is not routed and needs
nothing), Mixtral, OLMoE, DeepSeek-V3 (Kimi-K2), GLM-4.5, MiniMax-M2, GPT-OSS, Qwen3-Next (Qwen2-MoE's router: float32
softmax, sorted top-k, optional renorm, cast back; its shared expert and sigmoid shared-expert gate are not routed).
A family whose class the installed transformers lacks is never matched (a Qwen3-Next whose router class is missing
then fails loudly: "no MoE router found in Qwen3NextForCausalLM"). A model with a router class no adapter knows raises
`UnsupportedRouterError` naming the class: r3rl never silently runs without replay.

Each adapter also says how its family's training forward keeps packed samples apart (`r3rl.models.packing`): most
families read the sample boundaries from position ids that restart at 0; GPT-OSS takes its layer masks from r3rl;
Qwen3-Next's linear attention carries its state across the row in transformers' torch path, so it is not packed.

Tensor suffixes: T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

import enum
import functools
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from r3rl.models.packing import Packing
from r3rl.models.routing import RouterSpec, Scoring, Selection, route, router_logits

__all__ = [
    "BiasAt",
    "RouterAdapter",
    "RouterSite",
    "RouterTensors",
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


class BiasAt(enum.Enum):
    """Where a family keeps its selection-only correction bias (`e_score_correction_bias`)."""

    NONE = "none"
    ROUTER = "router"  # on the router module (DeepSeek-V3, GLM-4.5)
    MOE_BLOCK = "moe_block"  # on the MoE block that owns the router, passed to the router's forward (MiniMax-M2)


@dataclass(frozen=True)
class RouterTensors:
    """A router's tensors, or their state-dict names: weight `[E, H]`, the logit bias `[E]` added inside the linear
    (GPT-OSS), and the selection-only correction bias `[E]` (sigmoid families)."""

    weight: Any
    logit_bias: Any = None
    correction: Any = None


@dataclass(frozen=True, kw_only=True)
class RouterAdapter:
    """How one family's router module maps onto `r3rl.models.routing`: its constants and where its tensors are."""

    family: str
    """Family name, for messages."""
    read_spec: Callable[[nn.Module], RouterSpec]
    """Reads the router module's constants into a `RouterSpec` (called once per site)."""
    logit_bias: bool = False
    """The router module's `bias` is added to its logits (GPT-OSS)."""
    correction_bias_at: BiasAt = BiasAt.NONE
    """Where the selection-only correction bias lives."""
    packing: Packing = Packing.POSITION_IDS
    """How the family's training forward keeps packed samples apart (see `Packing`)."""

    def spec(self, router: nn.Module) -> RouterSpec:
        return self.read_spec(router)

    def num_experts(self, router: nn.Module) -> int:
        return self.read_spec(router).num_experts

    def top_k(self, router: nn.Module) -> int:
        return self.read_spec(router).top_k

    def tensor_names(self, site: RouterSite) -> RouterTensors:
        """State-dict names of the site's router tensors (the engine loads its copy by these)."""
        return RouterTensors(
            weight=f"{site.name}.weight",
            logit_bias=f"{site.name}.bias" if self.logit_bias else None,
            correction={BiasAt.NONE: None, BiasAt.ROUTER: f"{site.name}.e_score_correction_bias",
                        BiasAt.MOE_BLOCK: f"{site.moe_block_name}.e_score_correction_bias"}[self.correction_bias_at],
        )

    def tensors(self, site: RouterSite) -> RouterTensors:
        """The site's live router tensors (read at call time: weight updates and FSDP2 swaps are seen)."""
        router = site.router
        correction = None
        if self.correction_bias_at is BiasAt.ROUTER:
            correction = router.e_score_correction_bias
        elif self.correction_bias_at is BiasAt.MOE_BLOCK:
            correction = site.moe_block.e_score_correction_bias
        return RouterTensors(router.weight, router.bias if self.logit_bias else None, correction)


@dataclass(frozen=True)
class RouterSite:
    """One router in a model: its MoE layer index (the trace's layer axis), module path, module, adapter, and the
    index of the decoder layer it sits in (differs from `layer` when some decoder layers are dense). `moe_block`
    is the module that owns the router (MiniMax-M2 keeps the correction bias there)."""

    layer: int
    name: str
    router: nn.Module
    adapter: RouterAdapter
    decoder_layer: int | None = None
    moe_block: nn.Module | None = None

    @functools.cached_property
    def spec(self) -> RouterSpec:
        """The router's constants, read once."""
        return self.adapter.spec(self.router)

    @property
    def moe_block_name(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    @property
    def top_k(self) -> int:
        return self.spec.top_k


def routed_forward(
    site: RouterSite, hidden: torch.Tensor, select: Selection | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The family router's forward with a pluggable selection. Returns (logits_TE, weights_TK, ids_TK).

    `select(choice_TE)` gets the family's selection ranking (its top-k is the live selection: bias and groups
    applied) and returns the ids to use; the gate weights are always the live scores at those ids."""
    spec, t = site.spec, site.adapter.tensors(site)
    hidden_TH = hidden.reshape(-1, t.weight.shape[1])
    logits_TE = router_logits(spec, hidden_TH, t.weight, t.logit_bias)
    weights_TK, ids_TK = route(spec, logits_TE, t.correction, select)
    return logits_TE, weights_TK, ids_TK


# --- registry -------------------------------------------------------------------------------------------------------
def _softmax_norm_topk(router: nn.Module) -> RouterSpec:
    return RouterSpec(num_experts=int(router.num_experts), top_k=int(router.top_k),
                      renormalize=bool(router.norm_topk_prob), cast_to_logits_dtype=True)


def _mixtral(router: nn.Module) -> RouterSpec:
    return RouterSpec(num_experts=int(router.num_experts), top_k=int(router.top_k), upcast_logits=True,
                      renormalize=True)


def _deepseek(router: nn.Module) -> RouterSpec:
    """DeepSeek-V3 and GLM-4.5: float32 logits, sigmoid, group-limited top-k on scores + bias, renorm + 1e-20, scale."""
    return RouterSpec(num_experts=int(router.num_experts), top_k=int(router.top_k), scoring=Scoring.SIGMOID,
                      logits_fp32=True, renormalize=bool(router.norm_topk_prob), renorm_eps=1e-20,
                      n_group=int(router.num_group), topk_group=int(router.topk_group),
                      scaling_factor=float(router.routed_scaling_factor), sorted_topk=False)


def _minimax(router: nn.Module) -> RouterSpec:
    """MiniMax-M2: sigmoid, top-k on scores + the MoE block's bias, always renormalized, no groups, no scale."""
    return RouterSpec(num_experts=int(router.num_experts), top_k=int(router.top_k), scoring=Scoring.SIGMOID,
                      renormalize=True, sorted_topk=False)


def _gpt_oss(router: nn.Module) -> RouterSpec:
    """GPT-OSS: logits with a bias, top-k of the logits, softmax over the chosen (in the logits' dtype)."""
    return RouterSpec(num_experts=int(router.num_experts), top_k=int(router.top_k), scoring=Scoring.TOPK_SOFTMAX)


_BY_NORM_TOPK = RouterAdapter(family="softmax-topk", read_spec=_softmax_norm_topk)
_MIXTRAL = RouterAdapter(family="mixtral", read_spec=_mixtral)
_DEEPSEEK = RouterAdapter(family="deepseek-v3", read_spec=_deepseek, correction_bias_at=BiasAt.ROUTER)
_MINIMAX = RouterAdapter(family="minimax-m2", read_spec=_minimax, correction_bias_at=BiasAt.MOE_BLOCK)
_GPT_OSS = RouterAdapter(family="gpt-oss", read_spec=_gpt_oss, logit_bias=True, packing=Packing.LAYER_MASKS)
# Qwen2-MoE's router; the gated delta net's state crosses sample boundaries in transformers' torch path (its
# cu_seqlens reach only the flash-linear-attention kernels)
_QWEN3_NEXT = RouterAdapter(family="qwen3-next", read_spec=_softmax_norm_topk, packing=Packing.NONE)

_M = "transformers.models."
# (module, class name) -> adapter. Classes are resolved lazily so that importing r3rl imports no model code; a
# class missing from the installed transformers is simply never matched.
_KNOWN: dict[tuple[str, str], RouterAdapter] = {
    (_M + "qwen3_moe.modeling_qwen3_moe", "Qwen3MoeTopKRouter"): _BY_NORM_TOPK,
    (_M + "qwen2_moe.modeling_qwen2_moe", "Qwen2MoeTopKRouter"): _BY_NORM_TOPK,
    (_M + "olmoe.modeling_olmoe", "OlmoeTopKRouter"): _BY_NORM_TOPK,
    (_M + "qwen3_next.modeling_qwen3_next", "Qwen3NextTopKRouter"): _QWEN3_NEXT,
    (_M + "mixtral.modeling_mixtral", "MixtralTopKRouter"): _MIXTRAL,
    (_M + "deepseek_v3.modeling_deepseek_v3", "DeepseekV3TopkRouter"): _DEEPSEEK,
    (_M + "glm4_moe.modeling_glm4_moe", "Glm4MoeTopkRouter"): _DEEPSEEK,
    (_M + "minimax_m2.modeling_minimax_m2", "MiniMaxM2TopKRouter"): _MINIMAX,
    (_M + "gpt_oss.modeling_gpt_oss", "GptOssTopKRouter"): _GPT_OSS,
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
            block = model.get_submodule(name.rpartition(".")[0])
            sites.append(RouterSite(layer=len(sites), name=name, router=module, adapter=adapter,
                                    decoder_layer=int(m.group(1)) if m else None, moe_block=block))
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
    """Import the supported router classes that the installed transformers has (for tests and docs)."""
    classes = []
    for mod, cls in _KNOWN:
        try:
            classes.append(getattr(importlib.import_module(mod), cls))
        except (ImportError, AttributeError):
            continue
    return classes
