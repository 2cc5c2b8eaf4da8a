"""Regional `torch.compile` of a training model, with replay's patch points and every module hook left eager.

    regions = compile_regions(model)   # before the first forward; the compiled modules' names
    ...                                # replay / record / check / experts tap work as in eager
    uncompile_regions(model)           # back to the eager forwards

What is compiled: in every decoder layer, each child module that holds no MoE router (attention, the norms, a dense
MLP), and inside a child that does hold one (the MoE block), each of its children that holds none (the experts, the
shared experts and their gate). What stays eager, and why:
- the routers: `RoutingReplay` patches each router instance, and the replay reads the active micro-batch's trace,
  counts the check and decides replay_forward / replay_backward at every call, which compiled code would freeze;
- the MoE block's and the decoder layer's own forwards (the router call, the residual adds), which activation
  checkpointing and FSDP2 wrap from outside;
- every module hook: a region compiles the module's `forward`, never its `__call__`, so `ExpertsTap`'s pre-hook on
  the experts runs at every call and reads the ids the experts receive (a hook added after compiling still runs;
  torch.compile of a whole module skips hooks added later unless told to guard on them).

One compiled function per module class, shared by every layer of that class (one graph per class and grad mode, not
one per layer), with dynamic shapes: micro-batches change length every step without recompiling. A region is the
class's `forward` bound to the instance (`types.MethodType`), so `copy.deepcopy` of the model binds the copy's
regions to the copy's own parameters.

The GPU levers this is for: the update's non-GEMM kernels (elementwise work on strided views in the experts'
gate/up split and routing-weight broadcast, the norms in float32, the SiLU-and-mul) fused into a few kernels each.
`bench/profile_train_step.py` measures it (`…+compile`).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import types

import torch
from torch import nn

from r3rl.models.adapters import BUILTIN_ADAPTERS, AdapterRegistry, find_routers

__all__ = ["compile_regions", "uncompile_regions", "compiled_regions", "compiled", "separate_cache_per_isa"]

logger = logging.getLogger(__name__)

_MARK = "_r3rl_compiled_region"
RECOMPILE_LIMIT = 64
"""torch._dynamo's per-function cache entries, raised to this (torch's default: 8) by `compile_regions`."""


def compile_regions(model: nn.Module, *, dynamic: bool = True, adapters: AdapterRegistry = BUILTIN_ADAPTERS,
                    log: bool = True) -> list[str]:
    """Compile the router-free modules of every decoder layer of `model` in place; returns their names.

    Raises ValueError if the model has no decoder layers (`model.model.layers`) or nothing to compile, and
    RuntimeError on a CPU without a C++ compiler (inductor's CPU backend needs one)."""
    _require_backend(model)
    separate_cache_per_isa()
    routers = {id(site.router) for site in find_routers(model, adapters)}
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"regional compile works per decoder layer: {type(model).__name__} has no `model.layers` "
                         "ModuleList")
    regions: list[tuple[str, nn.Module]] = []
    for i, layer in enumerate(layers):
        regions += _regions(_unwrap(layer), f"model.layers.{i}", routers)
    if not regions:
        raise ValueError("regional compile found no router-free module in the decoder layers of "
                         f"{type(model).__name__}")
    for path, module in regions:  # every region checked before any is compiled: never a half-compiled model
        if "forward" in vars(module):
            raise ValueError(f"{path} ({type(module).__name__}) already has a per-instance forward (compiled, or "
                             "patched by someone else): regional compile would hide it")
    for _, module in regions:
        module.forward = types.MethodType(_compiled_forward(type(module), dynamic), module)
    names = [path for path, _ in regions]
    # One compiled function serves every layer of a class, so its cache holds one entry per guard set over the whole
    # run: grad and no-grad forwards, the policy's and the frozen reference's parameters, batch size 1 (specialized),
    # attention variants (sliding or full per layer), Qwen3-Next's chunk loop per length. Past torch's default of 8
    # a region silently runs eager; this limit keeps them compiled (a limit hit is logged by torch).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if log:
        logger.info("torch.compile: %d regions in %d decoder layers (attention, norms, experts; routers, the MoE "
                    "blocks' and the layers' own forwards and all hooks stay eager)", len(names), len(layers))
    return names


def uncompile_regions(model: nn.Module) -> int:
    """Give every compiled region its eager forward back; returns how many there were."""
    n = 0
    for module in model.modules():
        fwd = vars(module).get("forward")
        if fwd is not None and getattr(getattr(fwd, "__func__", None), _MARK, False):
            del module.forward
            n += 1
    return n


def compiled_regions(model: nn.Module) -> list[str]:
    """The names of `model`'s compiled regions (empty when none)."""
    return [name for name, module in model.named_modules()
            if getattr(getattr(vars(module).get("forward"), "__func__", None), _MARK, False)]


@functools.cache
def compiled(fn):
    """`torch.compile(fn)` with dynamic shapes, one per function (e.g. the training head,
    `r3rl.train.data.response_logprobs`)."""
    separate_cache_per_isa()
    return torch.compile(fn, dynamic=True)


ISA_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def separate_cache_per_isa() -> str | None:
    """Give a process that pins the CPU's instruction set (`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`) its own inductor
    cache directory, unless TORCHINDUCTOR_CACHE_DIR names one; returns it (None when nothing is pinned).

    torch's inductor keys its on-disk CPU kernels without that choice: a process under ATEN_CPU_CAPABILITY=avx2 loads
    the AVX-512 kernels another process wrote to the shared default directory and computes wrong numbers (measured
    on torch 2.13: the compiled log-prob head off by 5.5 nats), and the other way round it crashed."""
    pinned = [os.environ.get(k) for k in ISA_VARS]
    if not any(pinned):
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = default_cache_dir()
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is not None and os.path.abspath(current) != os.path.abspath(default):
        return current  # the user's own directory
    tag = "-".join(re.sub(r"[^A-Za-z0-9]", "", v or "any").lower() for v in pinned)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory = f"{default}_isa-{tag}"
    return directory


def _regions(module: nn.Module, prefix: str, routers: set[int]) -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in module.named_children():
        path = f"{prefix}.{name}"
        if id(child) in routers:
            continue
        if any(id(m) in routers for m in child.modules()):  # the MoE block: compile inside it, around the router
            out += _regions(child, path, routers)
        elif any(True for _ in child.parameters()):  # parameter-free children (rotary, dropout) run inside a parent
            out.append((path, child))
    return out


@functools.cache
def _compiled_forward(cls: type, dynamic: bool):
    fn = torch.compile(cls.forward, dynamic=dynamic)
    setattr(fn, _MARK, True)
    return fn


def _unwrap(layer: nn.Module) -> nn.Module:
    """The decoder layer inside torch's `checkpoint_wrapper` (FSDP2 runs), else the layer."""
    return getattr(layer, "_checkpoint_wrapped_module", layer)


def _require_backend(model: nn.Module) -> None:
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return
    if device.type != "cpu":
        return
    import shutil

    from torch._inductor import config as inductor_config

    cxx = inductor_config.cpp.cxx  # e.g. (None, "g++"): the candidates inductor tries
    candidates = [c for c in (cxx if isinstance(cxx, tuple | list) else [cxx]) if c] + ["g++", "clang++", "c++"]
    if not any(shutil.which(c) for c in candidates):
        raise RuntimeError("--compile on a CPU needs a C++ compiler (torch inductor's CPU backend): none of g++, "
                           "clang++, c++ is on PATH")
