"""Batch layouts: padded and packed micro-batches replay the rollout trace row for row, and give the same log-probs
and the same routing as one sample at a time (a real tiny MoE, real replay)."""

import pytest
import torch

from r3rl.models.presets import make_model
from r3rl.replay import RoutingReplay
from r3rl.sample import Sample
from r3rl.train.data import Layout, make_micro_batches, token_logprobs


def _samples(model, replay, lengths, seed=0):
    """Samples with traces recorded from the model itself (one sample per forward, no padding anywhere)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n_prompt, n_resp in lengths:
        tokens = torch.randint(0, 256, (1, n_prompt + n_resp), generator=gen)
        with torch.no_grad(), replay.record() as rec:
            model(tokens, use_cache=False)
        trace = rec.traces(lengths=[n_prompt + n_resp], seq_len=n_prompt + n_resp)[0]
        ids = tokens[0].tolist()
        out.append(Sample(prompt_ids=ids[:n_prompt], response_ids=ids[n_prompt:], rollout_logprobs=[0.0] * n_resp,
                          trace=trace))
    return out


def _one_at_a_time(model, replay, samples):
    logps, used = [], []
    for s in samples:
        [mb] = make_micro_batches([s], advantages=[0.0], layout=Layout.PADDED, micro_batch_size=1, pad_id=256)
        lp, routes = _forward(model, replay, mb)
        logps.append(lp)
        used.append(routes)
    return torch.cat(logps), used


def _forward(model, replay, mb):
    captured = []
    hooks = [m.register_forward_hook(lambda mod, args, out: captured.append(args[1].detach()))
             for name, m in model.named_modules() if name.endswith("mlp.experts")]
    try:
        with torch.no_grad(), replay.replay(mb.replay):
            logits = model(**mb.model_inputs()).logits
    finally:
        for h in hooks:
            h.remove()
    ids_NLK = torch.stack(captured, dim=1)
    return token_logprobs(mb.response_logits(logits), mb.target_ids_T), mb.split_routing(ids_NLK, 16)


@pytest.mark.parametrize("layout", [Layout.PADDED, Layout.PACKED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts_match_one_sample_at_a_time(layout, dtype):
    model = make_model("tiny-qwen3-moe", seed=2, dtype=dtype)
    with RoutingReplay(model) as replay:
        samples = _samples(model, replay, [(5, 4), (3, 7), (6, 2), (4, 4)])
        ref_logp, ref_routes = _one_at_a_time(model, replay, samples)
        mbs = make_micro_batches(samples, advantages=[1.0, -1.0, 0.5, 0.0], layout=layout, micro_batch_size=3,
                                 pad_id=256)
        assert [mb.sample_indices for mb in mbs] == [[0, 1, 2], [3]]
        logps, routes = zip(*[_forward(model, replay, mb) for mb in mbs], strict=True)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=3e-2)  # bf16 batch-shape noise
    torch.testing.assert_close(torch.cat(logps), ref_logp, **tol)
    routes = [t for r in routes for t in r]
    for b, (got, ref) in enumerate(zip(routes, ref_routes, strict=True)):
        # Replay pins every row that has a trace row: the routing is the rollout's, whatever the batch shape.
        assert (got.expert_ids[:, :, :] == samples[b].trace.expert_ids).all(), f"sample {b}"
        assert (ref[0].expert_ids == samples[b].trace.expert_ids).all()


def test_token_budget_packs_and_rejects_an_oversized_sample():
    samples = [Sample(prompt_ids=[1, 2, 3], response_ids=[4, 5], rollout_logprobs=[-1.0, -2.0]) for _ in range(5)]
    mbs = make_micro_batches(samples, advantages=[0.0] * 5, layout=Layout.PACKED, max_tokens=10)
    assert [mb.sample_indices for mb in mbs] == [[0, 1], [2, 3], [4]]
    assert mbs[0].position_ids_BS.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]
    assert mbs[0].target_pos_T.tolist() == [2, 3, 7, 8]  # logits at t predict token t + 1
    assert mbs[0].seq_idx_T.tolist() == [0, 0, 1, 1] and mbs[0].replay is None
    with pytest.raises(ValueError, match="sample 0 has 5 tokens: more than the micro-batch token budget max_tokens=4"):
        make_micro_batches(samples, advantages=[0.0] * 5, layout=Layout.PACKED, max_tokens=4)


def test_by_length_groups_like_lengths_and_pads_less_with_the_same_log_probs():
    model = make_model("tiny-qwen3-moe", seed=2)
    with RoutingReplay(model) as replay:
        samples = _samples(model, replay, [(3, 2), (4, 9), (2, 3), (5, 8), (3, 1), (4, 10)])
        adv = [0.5, -1.0, 1.0, 0.0, -0.5, 2.0]
        kw = dict(advantages=adv, layout=Layout.PADDED, micro_batch_size=2, pad_id=256)
        in_order, by_length = make_micro_batches(samples, **kw), make_micro_batches(samples, by_length=True, **kw)
        assert [mb.sample_indices for mb in in_order] == [[0, 1], [2, 3], [4, 5]]
        assert [mb.sample_indices for mb in by_length] == [[5, 1], [3, 0], [2, 4]]  # 14, 13 | 13, 5 | 5, 4 tokens
        assert [mb.computed_tokens for mb in in_order] == [26, 26, 28]  # 80 positions for 46 tokens
        assert [mb.computed_tokens for mb in by_length] == [28, 26, 10]  # 64
        assert all(mb.num_tokens == sum(mb.lengths) for mb in by_length)
        per_sample = {}
        for mb in by_length:  # each sample keeps its own advantages, targets and trace, whatever its micro-batch
            logp, routes = _forward(model, replay, mb)
            for b, i in enumerate(mb.sample_indices):
                per_sample[i] = logp[mb.seq_idx_T == b]
                assert mb.advantages_T[mb.seq_idx_T == b].eq(adv[i]).all()
                assert (routes[b].expert_ids == samples[i].trace.expert_ids).all()
        ref_logp, _ = _one_at_a_time(model, replay, samples)
    torch.testing.assert_close(torch.cat([per_sample[i] for i in range(len(samples))]), ref_logp, rtol=0, atol=1e-5)


def test_padded_targets_and_mask():
    samples = [Sample(prompt_ids=[1, 2], response_ids=[3], rollout_logprobs=[-0.5]),
               Sample(prompt_ids=[1], response_ids=[7, 8, 9], rollout_logprobs=[-1.0, -2.0, -3.0])]
    [mb] = make_micro_batches(samples, advantages=[2.0, -1.0], micro_batch_size=2, pad_id=0)
    assert mb.input_ids_BS.tolist() == [[1, 2, 3, 0], [1, 7, 8, 9]]
    assert mb.attention_mask_BS.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert mb.target_pos_T.tolist() == [1, 4, 5, 6] and mb.target_ids_T.tolist() == [3, 7, 8, 9]
    assert mb.advantages_T.tolist() == [2.0, -1.0, -1.0, -1.0]


def test_bad_inputs_name_the_sample():
    good = Sample(prompt_ids=[1], response_ids=[2], rollout_logprobs=[-1.0])
    bad = Sample(prompt_ids=[1], response_ids=[2, 3], rollout_logprobs=[-1.0])
    with pytest.raises(ValueError, match="sample 1: rollout_logprobs length 1 != response length 2"):
        make_micro_batches([good, bad], advantages=[0.0, 0.0], micro_batch_size=2)
    with pytest.raises(ValueError, match="one advantage per sample"):
        make_micro_batches([good], advantages=[], micro_batch_size=1)


def test_layout_padded_refuses_a_negative_left_pad():
    from r3rl.trace import RoutingTrace, TraceError
    from r3rl.train.data import layout_padded

    trace = RoutingTrace.from_ids([[[0, 1]]], 4)
    with pytest.raises(TraceError, match="left_pad must be >= 0 \\(sample 0\\): got -1"):
        layout_padded([trace], seq_len=4, left_pad=[-1])
