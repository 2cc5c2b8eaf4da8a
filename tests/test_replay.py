import pytest
import torch
from torch import nn

from r3rl.check import ReplayCheck, Stage
from r3rl.models import UnsupportedRouterError, find_routers
from r3rl.models.loading import set_activation_checkpointing
from r3rl.replay import RoutingReplay, RoutingReplayError, fill_pad_slots
from r3rl.trace import ReplayBatch


def _loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    logits = model(tokens).logits
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _experts_inputs(model):
    """Hook the experts modules themselves (not the adapter): the ids they actually receive."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(args[1].detach().clone()))
             for n, m in model.named_modules() if n.endswith("mlp.experts")]
    return seen, hooks


def _foreign_batch(replay, n_tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(replay.num_experts, generator=g)[: replay.top_k]
                       for _ in range(n_tokens * replay.num_layers)]).view(n_tokens, replay.num_layers, -1)
    return ReplayBatch.from_tensor(ids, replay.num_experts)


def test_record_then_replay_is_bitwise_identical_to_unpatched(family_model, tokens):
    ref_logits, ref_grads = _loss_and_grads(family_model, tokens)
    with RoutingReplay(family_model) as replay:
        with replay.record() as rec:
            rec_logits, rec_grads = _loss_and_grads(family_model, tokens)
        with replay.replay(rec.batch()):
            rep_logits, rep_grads = _loss_and_grads(family_model, tokens)
        with replay.off():
            off_logits, _ = _loss_and_grads(family_model, tokens)
    for logits in (rec_logits, rep_logits, off_logits):
        assert torch.equal(logits, ref_logits)
    assert ref_grads.keys() == rep_grads.keys()
    for name in ref_grads:
        assert torch.equal(rep_grads[name], ref_grads[name]), name
        assert torch.equal(rec_grads[name], ref_grads[name]), name
    assert any("gate.weight" in n for n in rep_grads), "the router must receive gradients under replay"


def test_foreign_trace_routes_to_exactly_the_trace_experts(family_model, tokens):
    replay = RoutingReplay(family_model)
    batch = _foreign_batch(replay, tokens.numel())
    seen, hooks = _experts_inputs(family_model)
    with replay.replay(batch):
        logits = family_model(tokens).logits
    for h in hooks:
        h.remove()
    assert len(seen) == replay.num_layers
    for layer, ids in enumerate(seen):
        assert torch.equal(ids, batch.expert_ids[:, layer, :]), f"layer {layer}"
    # and it really changed the model's output: live routing differs from a random trace
    with replay.off():
        assert not torch.allclose(family_model(tokens).logits, logits)
    replay.close()


def test_replay_gate_weights_come_from_live_router(qwen3_model, tokens):
    replay = RoutingReplay(qwen3_model)
    batch = _foreign_batch(replay, tokens.numel())
    router = replay.sites[0].router
    seen = {}
    hooks = [
        router.register_forward_pre_hook(lambda m, a: seen.update(hidden=a[0].detach())),
        qwen3_model.model.layers[0].mlp.experts.register_forward_hook(lambda m, a, o: seen.update(w=a[2])),
    ]
    with replay.replay(batch):
        qwen3_model(tokens).logits.sum().backward()
    for h in hooks:
        h.remove()
    probs = torch.softmax(seen["hidden"] @ router.weight.detach().T, dim=-1, dtype=torch.float32)
    expected = probs.gather(1, batch.expert_ids[:, 0])
    expected = expected / expected.sum(-1, keepdim=True)  # Qwen3 preset: norm_topk_prob=True
    torch.testing.assert_close(seen["w"].detach(), expected)
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    replay.close()


def test_checkpoint_recompute_is_replay_backward_with_identical_grads(family_model, tokens):
    family_model.train()
    replay = RoutingReplay(family_model, check=ReplayCheck(4, find_routers(family_model)[0].top_k))
    batch = _foreign_batch(replay, tokens.numel(), seed=3)
    with replay.replay(batch):
        plain_logits, plain_grads = _loss_and_grads(family_model, tokens)
    assert sum(replay.calls[Stage.REPLAY_BACKWARD]) == 0
    set_activation_checkpointing(family_model, True)
    with replay.replay(batch):
        ckpt_logits, ckpt_grads = _loss_and_grads(family_model, tokens)
    set_activation_checkpointing(family_model, False)
    assert replay.calls[Stage.REPLAY_BACKWARD] == [1] * replay.num_layers
    assert replay.calls[Stage.REPLAY_FORWARD] == [2] * replay.num_layers
    assert torch.equal(plain_logits, ckpt_logits)
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=0, atol=0, msg=name)
    summary = replay.check.summary(raise_on_fail=False)
    assert summary.stages["replay_backward"].calls == replay.num_layers
    replay.close()


def test_recompute_after_replay_context_closed_is_an_error(qwen3_model, tokens):
    qwen3_model.train()
    set_activation_checkpointing(qwen3_model, True)
    replay = RoutingReplay(qwen3_model)
    with replay.replay(_foreign_batch(replay, tokens.numel())):
        loss = qwen3_model(tokens).logits.sum()
    with pytest.raises(RoutingReplayError, match="recompute at MoE layer 3 .* ran after the replay\\(\\) context"):
        loss.backward()
    replay.close()


def test_token_count_mismatch_names_layer_expected_actual(qwen3_model, tokens):
    replay = RoutingReplay(qwen3_model)
    batch = _foreign_batch(replay, tokens.numel() - 1)
    with pytest.raises(RoutingReplayError, match=r"MoE layer 0 \(model.layers.0.mlp.gate\): expected=29 .* actual=30"):
        with replay.replay(batch):
            qwen3_model(tokens)
    bad_layers = ReplayBatch.from_tensor(batch.expert_ids[:, :2], replay.num_experts)
    with pytest.raises(RoutingReplayError, match=r"got \(layers, top_k, experts\)=\(2, 4, 16\), expected=\(4, 4, 16\)"):
        with replay.replay(bad_layers):
            pass
    replay.close()


def test_replayed_router_call_never_syncs_to_host(qwen3_model, monkeypatch):
    replay = RoutingReplay(qwen3_model, check=ReplayCheck(4, 4))
    site = replay.sites[1]
    hidden = torch.randn(12, 64)
    ids = _foreign_batch(replay, 12).expert_ids.clone()
    ids[::3, :, 1:] = 255
    with replay.replay(ReplayBatch(expert_ids=ids, pad_value=255, has_pad=True, num_experts=replay.num_experts)):
        def boom(*a, **k):
            raise AssertionError("host sync in the replay hot path")

        for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "cpu", "numpy", "nonzero"):
            monkeypatch.setattr(torch.Tensor, name, boom)
        logits, weights, used = site.router(hidden)
        monkeypatch.undo()
    assert used.shape == (12, 4) and (used.sort(-1).values.diff(dim=-1) != 0).all()
    assert replay.check.summary(raise_on_fail=False).stages["replay_forward"].calls == 1
    replay.close()


def test_pad_fill_takes_best_live_experts_without_duplicates():
    probs = torch.tensor([[0.05, 0.4, 0.3, 0.1, 0.15], [0.5, 0.2, 0.1, 0.1, 0.1]])
    ids = torch.tensor([[1, 255, 255], [4, 0, 255]])
    valid = ids != 255
    filled = fill_pad_slots(ids, valid, probs)
    assert filled.tolist() == [[1, 2, 4], [4, 0, 1]]  # row 0: expert 1 is taken, so 2 then 4; no duplicates
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        probs = torch.rand(64, 16, generator=g)
        ids = torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(64)])
        valid = torch.rand(64, 6, generator=g) > 0.5
        out = fill_pad_slots(torch.where(valid, ids, 255), valid, probs)
        assert (out.sort(-1).values.diff(dim=-1) != 0).all(), "duplicate expert after pad fill"
        assert torch.equal(out[valid], ids[valid])


def test_pad_rows_route_live_in_the_model(qwen3_model, tokens):
    replay = RoutingReplay(qwen3_model)
    with replay.record() as rec:
        ref = qwen3_model(tokens).logits
    batch = rec.batch()
    ids = batch.expert_ids.clone()
    ids[::2] = 255  # every other token: no replayed experts -> the live router decides, as without replay
    seen, hooks = _experts_inputs(qwen3_model)
    with replay.replay(ReplayBatch(expert_ids=ids, pad_value=255, has_pad=True, num_experts=replay.num_experts)):
        out = qwen3_model(tokens).logits
    for h in hooks:
        h.remove()
    assert torch.equal(out, ref)
    assert all((s.sort(-1).values.diff(dim=-1) != 0).all() for s in seen)
    replay.close()


def test_patches_are_undone_and_modes_do_not_nest(qwen3_model, tokens):
    replay = RoutingReplay(qwen3_model)
    router = replay.sites[0].router
    assert "forward" in vars(router)
    with pytest.raises(RoutingReplayError, match="already patched"):
        RoutingReplay(qwen3_model)
    with replay.record(), pytest.raises(RoutingReplayError, match="cannot enter replay inside record"):
        with replay.replay(_foreign_batch(replay, 2)):
            pass
    replay.close()
    assert "forward" not in vars(router)
    with pytest.raises(RoutingReplayError, match="closed"), replay.record():
        pass


def test_strict_mode_requires_every_layer_consumed(qwen3_model, tokens):
    replay = RoutingReplay(qwen3_model, strict=True)
    with pytest.raises(RoutingReplayError, match="not consumed once per layer"):
        with replay.replay(_foreign_batch(replay, tokens.numel())):
            pass  # no forward at all
    with replay.replay(_foreign_batch(replay, tokens.numel())):
        qwen3_model(tokens)
    replay.close()


class _FooMoeRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 8))
        self.top_k, self.num_experts = 2, 4


def test_unknown_router_class_is_named():
    model = nn.Sequential(nn.Linear(8, 8), _FooMoeRouter())
    with pytest.raises(UnsupportedRouterError, match=r"unsupported MoE router class .*_FooMoeRouter at '1'"):
        find_routers(model)
    with pytest.raises(UnsupportedRouterError, match="no MoE router found in Sequential"):
        find_routers(nn.Sequential(nn.Linear(8, 8)))


def _micro_batch_setup(model):
    """4 samples x 10 tokens, a foreign trace for all of them, and the full-batch replayed gradients."""
    model.train()
    tokens = torch.randint(0, 256, (4, 10), generator=torch.Generator().manual_seed(5))
    replay = RoutingReplay(model)
    full = _foreign_batch(replay, tokens.numel(), seed=7)
    with replay.replay(full):
        _, ref_grads = _loss_and_grads(model, tokens)
    return tokens, replay, full, ref_grads


def test_micro_batches_each_replay_their_own_rows(qwen3_model):
    """Gradient accumulation over micro-batches sliced from one batch equals the full-batch replay."""
    tokens, replay, full, ref_grads = _micro_batch_setup(qwen3_model)
    set_activation_checkpointing(qwen3_model, True)
    qwen3_model.zero_grad(set_to_none=True)
    for mb in range(2):
        with replay.replay(full.narrow(mb * 20, 20)):
            qwen3_model(tokens[2 * mb : 2 * mb + 2]).logits.float().logsumexp(-1).sum().div(40).backward()
    set_activation_checkpointing(qwen3_model, False)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(dict(qwen3_model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)
    replay.close()


def test_recompute_under_another_micro_batch_is_an_error(qwen3_model):
    qwen3_model.train()
    set_activation_checkpointing(qwen3_model, True)
    tokens = torch.randint(0, 256, (4, 10), generator=torch.Generator().manual_seed(5))
    replay = RoutingReplay(qwen3_model)
    full = _foreign_batch(replay, tokens.numel(), seed=7)
    with replay.replay(full.narrow(0, 20)):
        loss0 = qwen3_model(tokens[:2]).logits.sum()
    # forward mb0, then forward+backward mb1, then backward mb0: mb0's recompute would replay mb1's rows, or route
    # live after the contexts closed. Refused when mb1's context opens, whatever happens next.
    with pytest.raises(RoutingReplayError, match="earlier replay\\(\\) context has not run its backward"):
        with replay.replay(full.narrow(20, 20)):
            pass
    del loss0  # the graph is gone: nothing is pending any more, so no false alarm afterwards
    with replay.replay(full.narrow(20, 20)):
        qwen3_model(tokens[2:]).logits.sum().backward()
    replay.close()


def test_a_step_boundary_does_not_forget_a_pending_recompute(qwen3_model, tokens):
    """The step's check summary resets the call counts, never the pending recomputes (a reset of those once made
    the recompute after it route live, silently)."""
    qwen3_model.train()
    set_activation_checkpointing(qwen3_model, True)
    cfg = qwen3_model.config
    replay = RoutingReplay(qwen3_model, check=ReplayCheck(cfg.num_hidden_layers, cfg.num_experts_per_tok))
    with replay.replay(_foreign_batch(replay, tokens.numel())):
        loss = qwen3_model(tokens).logits.sum()
    replay.check.summary(raise_on_fail=False)  # the step ends: counts reset
    assert sum(replay.calls[Stage.REPLAY_FORWARD]) == 0
    with pytest.raises(RoutingReplayError, match="ran after the replay\\(\\) context closed"):
        loss.backward()
    set_activation_checkpointing(qwen3_model, False)
    replay.close()


@pytest.mark.parametrize("context_fn", [False, True])
def test_checkpoint_wrapper_recompute_replays_or_raises(qwen3_model, tokens, context_fn):
    """torch's checkpoint_wrapper (the FSDP2 style) leaves HF's is_gradient_checkpointing False: still guarded."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    qwen3_model.train()
    replay = RoutingReplay(qwen3_model)
    batch = _foreign_batch(replay, tokens.numel(), seed=3)
    kwargs = {"context_fn": replay.checkpoint_context_fn} if context_fn else {}
    apply_activation_checkpointing(qwen3_model, check_fn=lambda m: type(m).__name__.endswith("DecoderLayer"),
                                   **({"checkpoint_wrapper_fn": _wrapper_with(**kwargs)} if kwargs else {}))
    flag = "is_activation_checkpointing" if hasattr(type(qwen3_model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    assert not getattr(qwen3_model, flag)
    with replay.replay(batch):
        loss = qwen3_model(tokens).logits.sum()
    if context_fn:  # the recompute runs under its own forward's batch, after the context closed
        loss.backward()
        assert sum(replay.calls[Stage.REPLAY_BACKWARD]) == replay.num_layers
    else:
        with pytest.raises(RoutingReplayError, match="ran after the replay\\(\\) context closed"):
            loss.backward()
    replay.close()


def _wrapper_with(**kwargs):
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    return functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **kwargs)


def test_off_between_forward_and_backward_is_an_error_and_no_false_alarm_after(qwen3_model, tokens):
    qwen3_model.train()
    set_activation_checkpointing(qwen3_model, True)
    replay = RoutingReplay(qwen3_model)
    batch = _foreign_batch(replay, tokens.numel())
    with replay.replay(batch):
        loss = qwen3_model(tokens).logits.sum()
    with replay.off():
        qwen3_model(tokens)  # e.g. a reference forward
        with pytest.raises(RoutingReplayError, match="ran after the replay\\(\\) context closed"):
            loss.backward()
    del loss  # drop the failed step's graph: its pending recomputes leave with it
    with replay.replay(batch):  # a correct step: backward inside the context
        qwen3_model(tokens).logits.sum().backward()
    qwen3_model(tokens).logits.sum().backward()  # then a plain checkpointed step: no false alarm
    replay.close()


def test_int16_trace_path_with_more_than_255_experts():
    from r3rl.models.presets import make_model
    from r3rl.trace import RoutingTrace
    from r3rl.train.data import layout_padded

    model = make_model("tiny-qwen3-moe", num_experts=300, num_experts_per_tok=4)
    tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    with RoutingReplay(model) as replay:
        with replay.record() as rec:
            ref = model(tokens).logits
        traces = rec.traces(lengths=[6, 6], seq_len=6)
        assert traces[0].expert_ids.dtype.name == "int16" and traces[0].pad_value == -1
        traces = [RoutingTrace.from_sglang(t.to_sglang(), num_layers=4, top_k=4, num_experts=300) for t in traces]
        batch = layout_padded(traces, seq_len=6, lengths=[6, 6])
        assert batch.pad_value == -1 and batch.expert_ids.dtype == torch.int16
        with replay.replay(batch):
            assert torch.equal(model(tokens).logits, ref)


def test_router_subclass_keeps_its_adapter(qwen3_model):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    class SubclassedRouter(Qwen3MoeTopKRouter):  # what FSDP2 or a user subclass does
        pass

    router = SubclassedRouter(qwen3_model.config)
    qwen3_model.model.layers[0].mlp.gate = router
    sites = find_routers(qwen3_model)
    assert sites[0].router is router and sites[0].adapter.family == "softmax-topk"


def test_all_pad_rows_take_the_live_top_k_shortcut_with_the_same_result(qwen3_model, tokens):
    import dataclasses

    from r3rl.trace import RoutingTrace
    from r3rl.train.data import layout_padded

    replay = RoutingReplay(qwen3_model)
    B, S = tokens.shape
    with replay.record() as rec:
        ref = qwen3_model(tokens).logits
    traces = rec.traces(lengths=[S] * B, seq_len=S)
    batch = layout_padded(traces, seq_len=S, lengths=[S] * B)
    assert batch.has_pad and not batch.partial_pad  # only each sample's last position lacks a row
    with replay.replay(batch):
        fast = qwen3_model(tokens).logits
    with replay.replay(dataclasses.replace(batch, partial_pad=True)):  # force the deduping fill
        slow = qwen3_model(tokens).logits
    assert torch.equal(fast, ref) and torch.equal(slow, ref)
    ids = traces[0].expert_ids.astype("int64")
    ids[2, 1, 0] = -1  # one pad slot in a real row
    partial = [RoutingTrace.from_ids(ids, replay.num_experts), *traces[1:]]
    assert layout_padded(partial, seq_len=S, lengths=[S] * B).partial_pad
    replay.close()


def test_checkpoint_context_fn_replays_each_recompute_with_its_own_batch(qwen3_model):
    """With context_fn, backward may run after the contexts closed, over several micro-batches, or twice."""
    tokens, replay, full, ref_grads = _micro_batch_setup(qwen3_model)
    set_activation_checkpointing(qwen3_model, True, context_fn=replay.checkpoint_context_fn)
    qwen3_model.zero_grad(set_to_none=True)
    losses = []
    for mb in range(2):
        with replay.replay(full.narrow(mb * 20, 20)):
            losses.append(qwen3_model(tokens[2 * mb : 2 * mb + 2]).logits.float().logsumexp(-1).sum().div(40))
    with replay.off():  # e.g. a reference forward in between
        qwen3_model(tokens)
    sum(losses).backward(retain_graph=True)  # both micro-batches, outside their contexts
    for name, grad in ref_grads.items():
        torch.testing.assert_close(dict(qwen3_model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)
    sum(losses).backward()  # a second backward through the same graph recomputes again: no false alarm
    assert replay.calls[Stage.REPLAY_BACKWARD] == [4] * replay.num_layers
    set_activation_checkpointing(qwen3_model, False)
    replay.close()


def test_no_false_alarm_when_a_replayed_step_did_not_checkpoint(qwen3_model, tokens):
    qwen3_model.train()
    replay = RoutingReplay(qwen3_model)
    with replay.replay(_foreign_batch(replay, tokens.numel())):
        qwen3_model(tokens).logits.sum().backward()  # no checkpointing: no recompute will ever come
    set_activation_checkpointing(qwen3_model, True)
    with replay.off():
        qwen3_model(tokens).logits.sum().backward()  # a later checkpointed step routes live, legitimately
    set_activation_checkpointing(qwen3_model, False)
    replay.close()


def test_check_must_fit_the_model(qwen3_model):
    with pytest.raises(RoutingReplayError, match=r"ReplayCheck does not fit .*got \(layers, top_k\)=\(4, 2\), "
                                                 r"expected=\(4, 4\)"):
        RoutingReplay(qwen3_model, check=ReplayCheck(4, 2))
