"""Shared fixtures: tiny MoE models of every supported family, made in-process (no hub, no files)."""

import pytest
import torch

from r3rl.models.presets import TINY_FAMILIES as FAMILIES
from r3rl.models.presets import make_model


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return make_model(request.param, seed=1)


@pytest.fixture
def qwen3_model():
    return make_model("tiny-qwen3-moe", seed=1)


@pytest.fixture
def tokens():
    return torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))
