"""Router adapters per transformers MoE family, model presets and loading."""

from r3rl.models.adapters import (
    BUILTIN_ADAPTERS,
    AdapterRegistry,
    RouterAdapter,
    RouterSite,
    UnsupportedRouterError,
    find_routers,
    routed_forward,
)
from r3rl.models.loading import load_model, resolve_dtype

__all__ = [
    "RouterAdapter",
    "RouterSite",
    "UnsupportedRouterError",
    "find_routers",
    "load_model",
    "AdapterRegistry",
    "BUILTIN_ADAPTERS",
    "resolve_dtype",
    "routed_forward",
]
