"""Routing replay on DeepSeek-V3, GLM-4.5, GPT-OSS and MiniMax-M2 (tiny presets, CPU).

Golden: replaying a model's own routing gives logits bitwise identical to the unpatched model (fp32 and bf16) and a
shifted trace changes them. DeepSeek-style routing: the correction bias decides the selection but never enters the
gate weights, replayed ids are used as given (no group masking re-applied), the check's live selection is the
family's own (bias and groups), dense first layers are not on the trace, and 256 experts give an int16 trace.
A family whose class the installed transformers lacks is skipped.
"""

import inspect

import numpy as np
import pytest
import torch

from r3rl.check import ReplayCheck
from r3rl.models import find_routers, routed_forward
from r3rl.models.presets import TINY_NEW_FAMILIES, make_model, preset_available
from r3rl.models.routing import gate_weights, scores
from r3rl.replay import RoutingReplay
from r3rl.trace import ReplayBatch

NEW_FAMILIES = TINY_NEW_FAMILIES
GROUPED = ["tiny-deepseek-v3", "tiny-glm4-moe"]  # sigmoid + correction bias + group-limited top-k + dense layer 0


def _needs(preset):
    if not preset_available(preset):
        pytest.skip(f"the installed transformers has no model class for {preset}")
    if preset == "tiny-minimax-m2" and not _replay_passes_router_args():
        pytest.skip("MiniMax-M2's router takes (hidden, e_score_correction_bias): RoutingReplay._router_forward must "
                    "pass extra positional args through to the original forward")


def _replay_passes_router_args():
    params = inspect.signature(RoutingReplay._router_forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def _tokens(model, shape=(2, 12)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0))


def _router_inputs(model, tokens):
    """Per site: the positional args its router was called with (hidden, and MiniMax-M2's bias)."""
    sites, seen = find_routers(model), {}
    hooks = [s.router.register_forward_pre_hook(lambda m, a, i=s.layer: seen.__setitem__(i, a)) for s in sites]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return sites, seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", NEW_FAMILIES)
def test_routed_forward_with_live_selection_is_bitwise_the_family_router(preset, dtype):
    if not preset_available(preset):
        pytest.skip(f"the installed transformers has no model class for {preset}")
    model = make_model(preset, seed=0, dtype=dtype)
    sites, seen = _router_inputs(model, _tokens(model))
    for site in sites:
        args = seen[site.layer]
        with torch.no_grad():
            ref = type(site.router).forward(site.router, *args)
            mine = routed_forward(site, args[0])
        for name, a, b in zip(("logits", "weights", "ids"), ref, mine, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{preset} layer {site.layer}: {name} differ"


# the golden replay test of every family (own trace bitwise, shifted trace differs) is tests/test_replay_golden.py


@pytest.mark.parametrize("preset", GROUPED)
def test_trace_covers_moe_layers_only(preset):
    _needs(preset)
    model = make_model(preset, seed=0)
    replay = RoutingReplay(model)
    dense = model.config.first_k_dense_replace
    assert dense >= 1 and replay.num_layers == model.config.num_hidden_layers - dense
    assert replay.decoder_layers == list(range(dense, model.config.num_hidden_layers))
    replay.close()


@pytest.mark.parametrize("preset", [*GROUPED, "tiny-minimax-m2"])
def test_correction_bias_decides_selection_but_not_gate_weights(preset):
    if not preset_available(preset):
        pytest.skip(f"the installed transformers has no model class for {preset}")
    model = make_model(preset, seed=0)
    sites, seen = _router_inputs(model, _tokens(model))
    site = sites[0]
    bias = site.adapter.tensors(site).correction
    with torch.no_grad():
        bias.zero_()
        favourite = 5  # a bias no score can beat: expert 5 (and its group) is picked for every token
        bias[favourite] = 10.0
        logits, weights, ids = routed_forward(site, seen[0][0])
    assert (ids == favourite).any(-1).all()
    spec = site.spec
    plain = torch.sigmoid(logits.float()).gather(1, ids)
    expected = plain / (plain.sum(-1, keepdim=True) + spec.renorm_eps) * spec.scaling_factor
    assert torch.equal(weights, expected)  # gate weights: scores without the bias, normalized and scaled
    biased = plain + bias[ids]
    leaked = biased / (biased.sum(-1, keepdim=True) + spec.renorm_eps) * spec.scaling_factor
    assert (weights - leaked).abs().max() > 0.1  # the negative control: had the bias leaked, weights would differ
    assert torch.allclose(weights.sum(-1), torch.full_like(weights[:, 0], spec.scaling_factor))


@pytest.mark.parametrize("preset", GROUPED)
def test_replayed_ids_are_used_as_given_with_live_unbiased_weights(preset):
    """Ids outside the token's allowed groups are replayed as they are: no group mask is re-applied."""
    _needs(preset)
    model = make_model(preset, seed=0)
    tokens = _tokens(model)
    replay = RoutingReplay(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(replay.num_experts, generator=g)[: replay.top_k]
                       for _ in range(tokens.numel() * replay.num_layers)]).view(tokens.numel(), replay.num_layers, -1)
    batch = ReplayBatch.from_tensor(ids, replay.num_experts)
    site = replay.sites[0]
    seen = {}
    hooks = [site.router.register_forward_pre_hook(lambda m, a: seen.update(hidden=a[0])),
             site.moe_block.experts.register_forward_hook(lambda m, a, o: seen.update(ids=a[1], w=a[2]))]
    with torch.no_grad(), replay.replay(batch):
        model(tokens)
    for h in hooks:
        h.remove()
    replay.close()
    assert torch.equal(seen["ids"], batch.expert_ids[:, 0].long())
    hidden = seen["hidden"].reshape(-1, site.router.weight.shape[1])
    live = scores(site.spec, hidden.float() @ site.router.weight.float().T)
    torch.testing.assert_close(seen["w"], gate_weights(site.spec, live, live, seen["ids"]))


@pytest.mark.parametrize("preset", GROUPED)
def test_check_compares_with_the_family_live_selection(preset):
    """Replaying the model's own routing passes the check on every row; the same rows differ from a plain top-k of
    the scores (no bias, no groups) on some rows, so a check that ignored bias or groups would have failed."""
    _needs(preset)
    model = make_model(preset, seed=0)
    tokens = _tokens(model)
    with RoutingReplay(model) as replay:
        with torch.no_grad(), replay.record() as rec:
            model(tokens)
        batch = rec.batch()
        replay.check = ReplayCheck(replay.num_layers, replay.top_k, threshold=0.0)
        with torch.no_grad(), replay.replay(batch):
            model(tokens)
        summary = replay.check.summary()
    assert summary.passed and all(layer.exact_match == layer.tokens for layer in summary.layers)
    sites, seen = _router_inputs(model, tokens)
    logits = routed_forward(sites[0], seen[0][0])[0]
    naive = torch.topk(torch.sigmoid(logits), replay.top_k, dim=-1).indices.sort(-1).values
    assert (naive != batch.expert_ids[:, 0].long().sort(-1).values).any(-1).sum() > 0


def test_256_experts_give_an_int16_trace_that_replays_bitwise():
    _needs("tiny-deepseek-v3")
    model = make_model("tiny-deepseek-v3", seed=0, n_routed_experts=256, n_group=8, topk_group=4,
                       num_experts_per_tok=8)
    tokens = _tokens(model, (2, 6))
    with torch.no_grad():
        ref = model(tokens).logits
        with RoutingReplay(model) as replay:
            with replay.record() as rec:
                model(tokens)
            traces = rec.traces([6, 6], 6)
            batch = rec.batch()
            with replay.replay(batch):
                rep = model(tokens).logits
    assert traces[0].expert_ids.dtype == np.int16 and traces[0].expert_ids.max() <= 255
    assert int(batch.expert_ids.max()) > 200  # ids past uint8's pad value are in use
    assert torch.equal(rep, ref)
