"""load_model refuses checkpoints that transformers would load with random or ignored tensors, and names a broken
weight file (issue 11, items 8 and 9)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from r3rl.models.loading import CheckpointError, load_model
from r3rl.models.presets import init_model


@pytest.fixture
def ckpt(tmp_path):
    return init_model("tiny-qwen3-moe", tmp_path / "m", seed=0)


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_a_complete_checkpoint_loads(ckpt):
    assert load_model(ckpt).config.num_hidden_layers == 4


def test_missing_lm_head_and_router_are_named(ckpt):
    def drop(t):
        del t["lm_head.weight"]
        del t[next(k for k in t if k.endswith("mlp.gate.weight"))]
    _rewrite(ckpt, drop)
    with pytest.raises(CheckpointError, match=r"missing \[.*lm_head.weight.*\] \(2\)"):
        load_model(ckpt)


def test_unexpected_and_mismatched_tensors_are_named(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected \['model.extra.weight'\]"):
        load_model(ckpt)


@pytest.mark.parametrize("content", [b"", b"junk" * 10, "truncate"])
def test_broken_weight_file_names_the_file(ckpt, content):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100] if content == "truncate" else content)
    with pytest.raises(CheckpointError, match=r"cannot load the checkpoint .*model.safetensors"):
        load_model(ckpt)
