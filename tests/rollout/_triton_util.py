"""Shared by the Triton kernel tests: run a script under Triton's CPU interpreter, compile a kernel for sm90."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))


def run_interpreted(code: str, *argv: str, timeout: int = 300) -> str:
    """Run `code` in a subprocess with TRITON_INTERPRET=1 (chosen before triton is imported) and this folder on the
    path (the scripts import the test modules' helpers); asserts its output ends with "ok"; returns stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([_HERE, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=timeout,
                         env=env)
    assert out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def compile_sm90(kernel, types: dict[str, str], constexprs: dict) -> str:
    """Compile `kernel` for an H100/H200 (sm90) without a GPU (Triton's front end, LLVM and ptxas); returns its PTX.
    `types` maps arguments to Triton type strings ("*bf16", "fp32", ...); arguments in neither dict are int32.
    Skips the test where triton has no NVIDIA backend."""
    import triton
    import triton.backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend here")
    names = kernel.arg_names
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
