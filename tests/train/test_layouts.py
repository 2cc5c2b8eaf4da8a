"""Every family's training layout is right: packed micro-batches give each sample the log-probs it gets alone
(fp32, <= 1e-5), through the family adapter's packing (position ids, r3rl's layer masks, or padded), and the
trainer says once when it trains a family padded instead of packed.

Negative controls: packing GPT-OSS without its layer masks, or Qwen3-Next at all, leaks neighbours into a sample
(errors far above the tolerance)."""

import json
import logging

import pytest
import torch

from r3rl.models.packing import Packing
from r3rl.models.presets import TINY_FAMILIES, TINY_NEW_FAMILIES, make_model, preset_available
from r3rl.sample import Sample
from r3rl.train.data import Layout, make_micro_batches, plan_layout, token_logprobs

FAMILIES = [p for p in (*TINY_FAMILIES, *TINY_NEW_FAMILIES) if preset_available(p)]
TOL = 1e-5
# GPT-OSS's sliding window is 8 tokens: these samples are longer, so the window and the sample boundary both bind
LENGTHS = [(5, 6), (7, 9), (4, 12)]
EXPECTED = {"tiny-gpt-oss": Packing.LAYER_MASKS, "tiny-qwen3-next": Packing.NONE}


def _samples():
    gen = torch.Generator().manual_seed(0)
    out = []
    for p, r in LENGTHS:
        t = torch.randint(0, 256, (p + r,), generator=gen).tolist()
        out.append(Sample(prompt_ids=t[:p], response_ids=t[p:], rollout_logprobs=[0.0] * r))
    return out


@torch.no_grad()
def _logprobs(model, samples, layout, layer_masks=None):
    mbs = make_micro_batches(samples, advantages=[0.0] * len(samples), layout=layout, micro_batch_size=len(samples),
                             pad_id=256, traces=[None] * len(samples), layer_masks=layer_masks)
    return torch.cat([token_logprobs(mb.response_logits(model(**mb.model_inputs()).logits), mb.target_ids_T)
                      for mb in mbs])


def _alone(model, samples):
    return torch.cat([_logprobs(model, [s], Layout.PADDED) for s in samples])


@pytest.mark.parametrize("preset", FAMILIES)
def test_packed_plan_matches_each_sample_alone(preset):
    model = make_model(preset, seed=1)
    plan = plan_layout(model, Layout.PACKED)
    assert plan.packing is EXPECTED.get(preset, Packing.POSITION_IDS)
    assert plan.layout is (Layout.PADDED if plan.packing is Packing.NONE else Layout.PACKED)
    samples = _samples()
    err = (_logprobs(model, samples, plan.layout, plan.layer_masks) - _alone(model, samples)).abs().max().item()
    assert err <= TOL, f"{preset}: packed vs alone max |diff| {err:.3g} > {TOL}"


@pytest.mark.parametrize("preset", [p for p in ("tiny-gpt-oss", "tiny-qwen3-next") if preset_available(p)])
def test_forcing_plain_packing_on_a_family_that_cannot_leaks_across_samples(preset):
    model = make_model(preset, seed=1)
    samples = _samples()
    err = (_logprobs(model, samples, Layout.PACKED) - _alone(model, samples)).abs().max().item()
    assert err > 100 * TOL, f"{preset}: forced packing gave {err:.3g}: the negative control no longer fails"


def test_auto_packs_only_under_an_attention_that_needs_no_dense_mask(caplog):
    from r3rl.train.config import TrainConfig

    assert TrainConfig().layout is Layout.AUTO  # the default
    model = make_model("tiny-qwen3-moe", seed=1)
    with caplog.at_level(logging.INFO, logger="r3rl"):
        plan = plan_layout(model, Layout.AUTO)
    assert plan.layout is Layout.PADDED  # sdpa: a packed row would attend through a dense mask over all its tokens
    assert "layout: padded (auto: sdpa attention" in caplog.text
    model.config._attn_implementation = "flex_attention"  # a block mask: packed samples cost only their own blocks
    assert plan_layout(model, Layout.AUTO).layout is Layout.PACKED
    with pytest.raises(ValueError, match="needs a concrete layout"):
        make_micro_batches([], advantages=[], layout=Layout.AUTO, micro_batch_size=1)


def test_a_padded_request_stays_padded_and_builds_no_masks():
    plan = plan_layout(make_model("tiny-gpt-oss", seed=1), Layout.PADDED)
    assert plan.layout is Layout.PADDED and plan.layer_masks is None


@pytest.mark.skipif(not preset_available("tiny-qwen3-next"), reason="transformers lacks qwen3_next")
def test_trainer_trains_qwen3_next_padded_and_says_so_once(tmp_path, caplog):
    from r3rl.train.config import TrainConfig
    from r3rl.train.trainer import Trainer

    cfg = TrainConfig(preset="tiny-qwen3-next", rollout_batch_size=2, n_samples_per_prompt=2,
                      rollout_max_response_len=4, num_rollout=1, sft_steps=1, sft_batch_size=4, micro_batch_size=4,
                      eval_interval=None, progress=False, run_dir=str(tmp_path / "run"), layout=Layout.PACKED)
    with caplog.at_level(logging.INFO, logger="r3rl"):
        Trainer(cfg).run()
    said = [r for r in caplog.records if "cannot be packed correctly" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "padded layout instead of packed" in said[0].getMessage()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["layout"] == "padded"
