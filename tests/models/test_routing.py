"""`r3rl.models.routing` on its own: RouterSpec refuses inconsistent constants (naming them), the engine's
batch-invariant sigmoid and sorted selection agree with the family's, and a preset whose class is missing is named."""

import pytest
import torch

from r3rl.models import presets
from r3rl.models.routing import RouterSpec, Scoring, choice_scores, route, scores, select_live


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=16, top_k=0), r"top_k must be in \[1, num_experts=16\]: got 0"),
    (dict(num_experts=16, top_k=17), r"top_k must be in \[1, num_experts=16\]: got 17"),
    (dict(num_experts=16, top_k=4, scoring=Scoring.SIGMOID, n_group=3), r"n_group must divide num_experts=16: got 3"),
    (dict(num_experts=16, top_k=4, scoring=Scoring.SIGMOID, n_group=4, topk_group=5),
     r"topk_group must be in \[1, n_group=4\].*got topk_group=5"),
    (dict(num_experts=16, top_k=12, scoring=Scoring.SIGMOID, n_group=4, topk_group=2),
     r"must hold top_k=12 experts: got topk_group=2"),
    (dict(num_experts=16, top_k=4, n_group=4, topk_group=2), r"group-limited routing is defined for sigmoid"),
])
def test_router_spec_refuses_inconsistent_constants(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RouterSpec(**kwargs)


def test_group_limit_masks_all_but_the_best_groups():
    spec = RouterSpec(num_experts=8, top_k=2, scoring=Scoring.SIGMOID, n_group=4, topk_group=1)
    scores_TE = torch.tensor([[0.1, 0.2, 0.9, 0.8, 0.3, 0.3, 0.5, 0.1]])
    choice_TE = choice_scores(spec, scores_TE, torch.zeros(8))
    assert torch.isinf(choice_TE).sum() == 6 and select_live(spec, choice_TE).sort().values.tolist() == [[2, 3]]
    bias_E = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0])  # the bias moves the best group to group 3
    assert select_live(spec, choice_scores(spec, scores_TE, bias_E)).sort().values.tolist() == [[6, 7]]


def test_engine_variants_agree_with_the_family():
    """The engine sorts the selection and computes the sigmoid as 1 / (1 + exp(-x)) (batch-invariant on CPU):
    the same experts, and gate weights within float32 rounding."""
    spec = RouterSpec(num_experts=16, top_k=4, scoring=Scoring.SIGMOID, renormalize=True, n_group=4, topk_group=2,
                      scaling_factor=2.5, sorted_topk=False)
    logits_TE = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 2
    bias_E = torch.randn(16, generator=torch.Generator().manual_seed(1)) * 0.1
    w_ref, ids_ref = route(spec, logits_TE, bias_E)
    w_eng, ids_eng = route(spec, logits_TE, bias_E, sorted_topk=True, batch_invariant=True)
    assert torch.equal(ids_eng.sort(-1).values, ids_ref.sort(-1).values)
    order = ids_ref.argsort(-1), ids_eng.argsort(-1)
    torch.testing.assert_close(w_eng.gather(1, order[1]), w_ref.gather(1, order[0]), rtol=1e-6, atol=1e-7)
    rows = [scores(spec, logits_TE[i : i + 1], batch_invariant=True)[0] for i in range(64)]
    assert torch.equal(torch.stack(rows), scores(spec, logits_TE, batch_invariant=True))  # a row ignores its batch


def test_preset_of_a_missing_model_class_is_named(monkeypatch):
    monkeypatch.setitem(presets.PRESETS, "tiny-future-moe", presets.ModelPreset("future_moe_v9", {}))
    assert not presets.preset_available("tiny-future-moe")
    with pytest.raises(KeyError, match="preset 'tiny-future-moe' needs model type 'future_moe_v9'"):
        presets.make_config("tiny-future-moe")
