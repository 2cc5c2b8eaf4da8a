"""Rollout test fixtures: a tiny random MoE checkpoint and real `r3rl serve` processes (`python -m r3rl.cli serve`).

    pytest tests/rollout/net/test_server.py -q

`start_server` launches the server on 127.0.0.1 at a free port and waits for `/health`; `ServerProcess.stop` sends
SIGTERM (graceful drain) and kills the process if it does not exit in time. Server logs go to a file whose tail is
shown when startup fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from r3rl.models.presets import init_model
from r3rl.rollout.net.client import wait_until_healthy

SERVER_MAX_SEQ_LEN = 256
SERVER_MAX_SLOTS = 64


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log_path: Path
    max_seq_len: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the drain; SIGKILL if it takes longer than `timeout`. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, log_path: Path, *, max_slots: int = SERVER_MAX_SLOTS,
                 max_seq_len: int = SERVER_MAX_SEQ_LEN, startup_timeout: float = 120.0, log_level: str = "INFO",
                 extra_args: tuple[str, ...] = ()) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "r3rl.cli", "--log-level", log_level, "serve", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--max-slots", str(max_slots), "--max-seq-len", str(max_seq_len),
           "--device", "cpu", "--dtype", "float32", *extra_args]
    log = open(log_path, "w")  # noqa: SIM115 - the child writes to it for its whole life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = ServerProcess(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, max_seq_len=max_seq_len)
    try:
        wait_until_healthy(server.url, timeout_s=startup_timeout, proc=proc)
    except RuntimeError as e:
        server.stop(timeout=5)
        pytest.fail(f"{e}:\n{server.log()[-3000:]}")
    return server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return init_model("tiny-qwen3-moe", tmp_path_factory.mktemp("tiny-qwen3-moe"))


@pytest.fixture
def server_factory(tiny_model_dir, tmp_path):
    """Start extra servers inside a test (`server_factory(max_slots=16)`, `model_dir=...`); all are stopped at
    teardown."""
    started: list[ServerProcess] = []

    def start(model_dir=None, **kw) -> ServerProcess:
        started.append(start_server(model_dir or tiny_model_dir, tmp_path / f"server{len(started)}.log", **kw))
        return started[-1]

    yield start
    for srv in started:
        srv.stop(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    srv.stop()
