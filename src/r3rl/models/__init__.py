"""Router adapters per transformers MoE family, model presets and loading."""

from r3rl.models.adapters import (
    RouterAdapter,
    RouterSite,
    UnsupportedRouterError,
    find_routers,
    register_adapter,
    routed_forward,
)
from r3rl.models.loading import load_model, resolve_dtype

__all__ = [
    "RouterAdapter",
    "RouterSite",
    "UnsupportedRouterError",
    "find_routers",
    "load_model",
    "register_adapter",
    "resolve_dtype",
    "routed_forward",
]
