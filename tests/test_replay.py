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
    assert summary.stages["replay_backward"]["calls"] == replay.num_layers
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
    with replay.replay(ReplayBatch(ids, 255, True, replay.num_experts)):
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
