"""A CPU run's intra-op threads: one for a small model (more cost more than they give), else torch's own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def test_a_small_model_on_cpu_runs_on_one_thread_unless_told_otherwise(monkeypatch):
    from r3rl.train.config import TrainConfig
    from r3rl.train.setup import cpu_threads

    def model(hidden):
        return SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        assert cpu_threads(TrainConfig(), model(64)) == 1  # the embedded default's width
        torch.set_num_threads(2)
        assert cpu_threads(TrainConfig(), model(2048)) == 2  # the negative control: a wide model keeps torch's own
        assert cpu_threads(TrainConfig(cpu_threads=3), model(64)) == 3  # the flag wins
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert cpu_threads(TrainConfig(), model(64)) == 2  # so does the environment
        with pytest.raises(ValueError, match="cpu_threads must be >= 1"):
            TrainConfig(cpu_threads=0)
    finally:
        torch.set_num_threads(before)
