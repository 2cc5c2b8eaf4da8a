"""Golden replay: replaying a model's own recorded routing gives logits bitwise identical to the unpatched model,
in fp32 and bf16, for every family; a shifted trace (every expert id + 1 mod E) changes them (the negative
control)."""
import pytest
import torch

from r3rl.models.presets import TINY_NEW_FAMILIES, make_model, preset_available
from r3rl.replay import RoutingReplay
from r3rl.trace import ReplayBatch

# (preset, token id bound: None = the vocabulary): the byte range for the families of tests/models/test_families.py
PRESETS = [("tiny-qwen3-moe", None)] + [(p, 256) for p in TINY_NEW_FAMILIES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("preset", "high"), PRESETS, ids=[p for p, _ in PRESETS])
def test_own_trace_is_bitwise_golden_and_shifted_trace_differs(preset, high, dtype):
    if not preset_available(preset):
        pytest.skip(f"the installed transformers has no model class for {preset}")
    model = make_model(preset, seed=0, dtype=dtype)
    tokens = torch.randint(0, high or model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens).logits
        with RoutingReplay(model) as replay:
            with replay.record() as rec:
                model(tokens)
            batch = rec.batch()
            with replay.replay(batch):
                rep = model(tokens).logits
            ids = batch.expert_ids.long()
            shifted = ReplayBatch.from_tensor((ids + 1) % replay.num_experts, replay.num_experts)
            with replay.replay(shifted):
                moved = model(tokens).logits
    assert ref.dtype == dtype
    assert torch.equal(rep, ref)
    assert not torch.equal(moved, ref)
