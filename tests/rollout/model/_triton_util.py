"""Shared by the Triton kernel tests: run a script under Triton's CPU interpreter (with the GPU's bf16 semantics),
compile a kernel for sm90."""

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


def interpreter_with_gpu_bf16() -> None:
    """Give Triton's CPU interpreter the GPU's bf16 semantics, which the kernels rely on: float32 -> bf16 rounds to
    nearest even (the interpreter truncates) and `tl.dot` on bf16 tiles multiplies the values with a float32
    accumulator (the interpreter multiplies the raw uint16 payloads). Only the interpreter is patched, not the kernels.
    """
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter as ti

    cast, dot = ti.InterpreterBuilder.cast_impl, ti.InterpreterBuilder.create_dot

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            f32 = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return ti.TensorHandle(bits.reshape(np.shape(src.data)), tl.bfloat16)
        return cast(self, src, dst_type)

    def as_f32(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return ti.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    ti.InterpreterBuilder.cast_impl = cast_impl
    ti.InterpreterBuilder.create_fp_trunc = lambda self, src, dst_type: self.cast_impl(src, dst_type)
    ti.InterpreterBuilder.create_dot = lambda self, a, b, d, *args: dot(self, as_f32(a), as_f32(b), d, *args)
