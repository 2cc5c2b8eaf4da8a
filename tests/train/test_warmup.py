"""The warm-up's greedy-exact stop bound: what it counts is what greedy decoding reproduces, and when it stops."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from r3rl.models.presets import make_model
from r3rl.sample import Sample
from r3rl.train.data import Layout, make_micro_batches
from r3rl.train.warmup import SFT_STOP_WINDOW, exact_targets, sft_stop


@torch.no_grad()
def _greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("layout", [Layout.PACKED, Layout.PADDED])
def test_a_target_counts_as_exact_iff_greedy_decoding_reproduces_it(layout):
    model = make_model("tiny-qwen3-moe", seed=0).eval()
    prompts = [[65 + i, 66 + 2 * i, 67, 68 + i % 3][: 2 + i % 3] for i in range(6)]
    targets = [_greedy(model, p, 3 + i % 2) for i, p in enumerate(prompts)]
    wrong = [list(t) for t in targets]
    for i in (1, 4):  # one token off in two targets (the last one: every earlier position still matches)
        wrong[i][-1] = (wrong[i][-1] + 1) % model.config.vocab_size

    def count(ts):
        samples = [Sample(prompt_ids=p, response_ids=t, rollout_logprobs=[0.0] * len(t))
                   for p, t in zip(prompts, ts, strict=True)]
        total = 0
        for mb in make_micro_batches(samples, advantages=[0.0] * len(samples), layout=layout, micro_batch_size=4,
                                     traces=[None] * len(samples)):
            with torch.no_grad():
                logits_TV = mb.response_logits(model(**mb.model_inputs()).logits)
            total += exact_targets(logits_TV, mb.target_ids_T, mb.seq_idx_T, mb.num_seqs)
        return total

    assert count(targets) == 6  # greedy's own outputs: every argmax right
    assert count(wrong) == 4  # the negative control: a single wrong token fails its target, and only its own


def test_the_warm_up_stops_at_the_first_bound_met_over_its_window():
    cfg = SimpleNamespace(sft_stop_loss=0.45, sft_stop_exact=0.4)
    assert sft_stop([(0.1, 0.9)] * (SFT_STOP_WINDOW - 1), cfg) == ""  # not a full window yet
    assert "mean loss <= 0.45" in sft_stop([(0.4, 0.0)] * SFT_STOP_WINDOW, cfg)
    assert "greedy-exact fraction >= 0.4" in sft_stop([(0.9, 0.5)] * SFT_STOP_WINDOW, cfg)
    # a mean, not the last step: 4 steps at 0.3 and one at 0.9 is 0.42
    assert "greedy-exact" in sft_stop([(0.9, 0.3)] * 4 + [(0.9, 0.9)], cfg)
    assert sft_stop([(0.9, 0.3)] * 5, cfg) == ""  # the negative control: neither bound met
    assert sft_stop([(0.9, 1.0)] * 5, SimpleNamespace(sft_stop_loss=0.0, sft_stop_exact=0.0)) == ""  # 0: off


def test_the_reverse_task_warms_up_to_an_exact_bound_and_a_custom_task_to_a_loss_bound(tmp_path):
    from r3rl.cli import build_parser, train_config_from_args
    from r3rl.train.config import TrainConfig

    def cfg(*argv):
        return train_config_from_args(build_parser().parse_args(["train", *argv]))

    reverse = cfg()
    assert (reverse.sft_stop_loss, reverse.sft_stop_exact) == (0.0, 0.4)
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "a=", "label": "A"}\n' * 5)
    custom = cfg("--prompt-data", str(data))
    assert (custom.sft_stop_loss, custom.sft_stop_exact) == (0.45, None)
    assert cfg("--sft-stop-exact", "0.7").sft_stop_exact == 0.7
    with pytest.raises(ValueError, match="sft_stop_exact must be in"):
        TrainConfig(sft_stop_exact=1.5)
