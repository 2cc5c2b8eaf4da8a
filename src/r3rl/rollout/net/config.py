"""Configuration of `r3rl serve`: the server and the engine it runs. Only cli.py knows argparse; it builds these.

    ServerConfig(model="/tmp/tiny", port=30000, engine=EngineConfig(max_slots=64, max_seq_len=1024))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from r3rl.rollout.engine.config import EngineConfig

__all__ = ["ServerConfig", "TEXT_CHARS_PER_TOKEN"]

TEXT_CHARS_PER_TOKEN = 16  # `text` longer than max_seq_len * this is rejected before tokenization


@dataclass(kw_only=True)
class ServerConfig:
    """`r3rl serve` (`serve(config)`; cli.py maps the flags onto it)."""

    model: str
    """Local HF checkpoint directory (see `r3rl init-model`)."""
    host: str = "127.0.0.1"
    """Interface to bind; 0.0.0.0 exposes the server to the network."""
    port: int = 30000
    """TCP port (SGLang's default)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The rollout engine: slots, context length, device, dtype (see EngineConfig)."""
    drain_timeout_s: float = 120.0
    """On the first SIGTERM/SIGINT, seconds to wait for in-flight requests before exiting anyway."""
    keep_alive_timeout_s: float = 75.0
    """Idle keep-alive connections are closed after this. Longer than any client's pool expiry (RolloutClient: 2 s,
    httpx: 5 s), so a client never sends on a connection the server is closing."""
    max_body_bytes: int = 64 * 2**20
    """Larger request bodies are answered 413 without being parsed."""
    max_hold_steps: int = 0
    """Engine steps a new request may be held back while others run, so that prefills come in batches
    (worker.AdmissionConfig); 0 = hand every request to the engine at once."""
    log_level: str = "info"
    """Python/uvicorn log level."""
    api_key: str | None = field(default=None, repr=False)
    """When set, the admin endpoints (weight updates, the update group) require `Authorization: Bearer <api_key>`
    (401 otherwise), as SGLang's `--api-key` does. Never reported by /server_info."""
    require_api_key_for_generate: bool = False
    """`/generate` requires the API key too (needs `api_key`)."""
    dist_timeout_s: float = 120.0
    """NCCL/gloo weight sync: a rendezvous (`/init_weights_update_group`) and each received tensor must complete
    within this; a failed receive applies nothing."""
    body_read_timeout_s: float = 60.0
    """A request body must arrive within this many seconds of its headers (408 and the connection closed
    otherwise): a slow or stalled upload cannot hold a connection open."""

    def __post_init__(self) -> None:
        self.log_level = {"warn": "warning", "fatal": "critical"}.get(self.log_level.lower(), self.log_level.lower())
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError(f"log_level must be one of critical, error, warning, info, debug, trace: got "
                             f"{self.log_level!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535]: got {self.port}")
        if self.max_hold_steps < 0:
            raise ValueError(f"max_hold_steps must be >= 0: got {self.max_hold_steps}")
        if self.api_key is not None and not (self.api_key.isascii() and self.api_key.isprintable()
                                             and self.api_key.strip() == self.api_key and self.api_key):
            raise ValueError("api_key must be a non-empty string of printable ASCII without surrounding spaces (it "
                             "travels in an HTTP header)")
        if self.require_api_key_for_generate and self.api_key is None:
            raise ValueError("require_api_key_for_generate needs an api_key (--api-key or R3RL_API_KEY)")
        for name in ("drain_timeout_s", "keep_alive_timeout_s", "max_body_bytes", "dist_timeout_s",
                     "body_read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0: got {getattr(self, name)}")
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model must be a local HF checkpoint directory with a config.json (see `r3rl "
                             f"init-model`): got {self.model!r}")
