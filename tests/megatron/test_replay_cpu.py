"""MegatronReplay on real megatron-core routers, on CPU: record, replay forward, replay backward under recompute,
the check on mcore's router, fault injection, layouts through the routers, and the errors.

Every check has its negative control: a shifted trace, a contiguous CP split, a wrong stage offset, a backward out
of order (FIFO drift), a missing recompute (consumption).
"""

import logging
import re

import numpy as np
import pytest
import torch

from r3rl.check import ReplayCheck
from r3rl.config import Fault
from r3rl.faults import corrupt_trace
from r3rl.megatron.layout import RankLayout, moe_layer_numbers, rank_router_batch, sp_scatter, zigzag_cp_slice
from r3rl.trace import RoutingTrace

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install 'r3rl[megatron]')")
from mcore_stack import TOPK, E, H, MoEStack, make_config, used_ids  # noqa: E402

from r3rl.megatron.replay import MegatronReplay, MegatronReplayError, MtpRouting  # noqa: E402

WRAPPER_RE = re.compile(r"^R3 wrapper: (replay_forward|replay_backward) branch taken \(rank 0, n_tokens=(\d+), "
                        r"topk=2, replay_idx_sum=(\d+)\)$")
CHECK_RE = re.compile(r"^R3 check \(rank 0, stage (replay_forward|replay_backward)\): n_tokens=(\d+) "
                      r"mismatch=(\d+) \((\d+\.\d\d)%\)$")


def _stack(num_layers=3, freq=1, *, recompute=None, seed=0, numbers=None):
    config = make_config(num_layers, freq)
    moe = moe_layer_numbers(num_layers, freq)
    return MoEStack(config, numbers or range(1, num_layers + 1), moe, seed=seed, recompute=recompute), config


def _hidden(S, B, seed=1):
    return torch.randn(S, B, H, generator=torch.Generator().manual_seed(seed))


def _record_traces(model, config, h_SBH, lengths):
    """The rollout: record mcore's routing on the full batch, cut into per-sample traces (row i = token i)."""
    replay = MegatronReplay(model, num_layers=config.num_layers, moe_layer_freq=config.moe_layer_freq)
    recompute, model.recompute = model.recompute, None  # no backward here: no checkpoint
    with torch.no_grad(), replay.record() as rec:
        model(h_SBH)
    model.recompute = recompute
    B = h_SBH.shape[1]
    ids_TLK = torch.stack([rec[layer][0] for layer in sorted(rec)], dim=1)  # router order: t = s * B + b
    return [RoutingTrace.from_ids(ids_TLK[b::B][: n - 1].numpy().astype(np.uint8), E) for b, n in enumerate(lengths)]


def _used_vs_batch(model, batch, call=0):
    """Tokens (valid rows) whose experts used, read at the experts' input, differ from the replayed ids."""
    bad = 0
    for i, n in enumerate(sorted(model.used)):
        want = batch.expert_ids[:, i, :].long()
        valid = (want != batch.pad_value).all(-1)
        got = used_ids(model.used[n][call])
        bad += int((got[valid] != want[valid].sort(-1).values).any(-1).sum())
    return bad


def _evidence(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "r3rl"]


@pytest.mark.parametrize("recompute", ["reentrant", "non-reentrant"])
def test_replay_forward_and_backward_under_recompute(recompute, caplog):
    model, config = _stack(recompute=recompute)
    h = _hidden(6, 2)
    traces = _record_traces(model, config, h, [6, 5])
    check = ReplayCheck(3, TOPK)
    replay = MegatronReplay(model, num_layers=3, check=check)
    batch = rank_router_batch(traces, RankLayout(seq_len=6))
    x = h.clone().requires_grad_(True)
    with caplog.at_level(logging.INFO, logger="r3rl"), replay.replay():
        replay.set_micro_batch(batch)
        model(x).square().sum().backward()
        summary = check.summary()
    assert summary.passed and summary.zero_overlap == 0
    lines = _evidence(caplog)
    wrappers = [WRAPPER_RE.match(line).groups() for line in lines if line.startswith("R3 wrapper")]
    assert [w[0] for w in wrappers] == ["replay_forward"] * 3 + ["replay_backward"] * 3
    assert wrappers[:3] == [("replay_forward", *w[1:]) for w in wrappers[3:]]  # the recompute replayed the same ids
    checks = [CHECK_RE.match(line).groups() for line in lines if line.startswith("R3 check")]
    valid_rows = 3 * (5 + 4)  # 3 layers x trace rows; pad rows (padding, last tokens) are not checked
    assert checks == [("replay_forward", str(valid_rows), "0", "0.00"), ("replay_backward", str(valid_rows), "0",
                                                                          "0.00")]
    assert _used_vs_batch(model, batch) == 0
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in model.routers.values())
    assert all(not s.native.replay_backward_list for s in replay.sites)  # consumed exactly once


def test_replay_of_own_recording_gives_bitwise_equal_gradients():
    """Golden: replaying what the router chose changes nothing, gradients included (the gate weight's too)."""
    model, config = _stack(recompute="reentrant")
    h = _hidden(4, 2)
    traces = _record_traces(model, config, h, [4, 4])
    h.requires_grad_(True)  # a reentrant checkpoint passes gradients only when its input needs them
    model(h).square().sum().backward()
    live = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    replay = MegatronReplay(model, num_layers=3)
    with replay.replay():
        replay.set_micro_batch(rank_router_batch(traces, RankLayout(seq_len=4)))
        model(h).square().sum().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(live, model.parameters(), strict=True))


def test_replay_forces_the_trace_and_the_check_sees_it():
    """A trace the live router disagrees with: the experts use the trace; the check counts zero-overlap rows."""
    model, _ = _stack()
    h = _hidden(4, 2)
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(E)[:TOPK] for _ in range(3 * 3)]).reshape(3, 3, TOPK).astype(np.uint8)
    traces = [RoutingTrace.from_ids(ids, E), RoutingTrace.from_ids(ids[::-1].copy(), E)]
    check = ReplayCheck(3, TOPK)
    replay = MegatronReplay(model, num_layers=3, check=check)
    batch = rank_router_batch(traces, RankLayout(seq_len=4))
    with replay.replay():
        replay.set_micro_batch(batch)
        model(h)
    summary = check.summary(raise_on_fail=False)
    assert _used_vs_batch(model, batch) == 0
    assert summary.tokens_checked == 18 and summary.zero_overlap > 0 and not summary.passed


def test_shift_fault_fails_the_check(caplog):
    model, config = _stack(recompute="reentrant")
    h = _hidden(8, 2)
    traces = _record_traces(model, config, h, [8, 8])
    check = ReplayCheck(3, TOPK)
    replay = MegatronReplay(model, num_layers=3, check=check)
    shifted = [corrupt_trace(t, Fault.SHIFT) for t in traces]
    with caplog.at_level(logging.INFO, logger="r3rl"), replay.replay():
        replay.set_micro_batch(rank_router_batch(shifted, RankLayout(seq_len=8)))
        model(h.requires_grad_(True)).sum().backward()
        with pytest.raises(AssertionError, match=r"^R3 mismatch tokens \(\d+\) > threshold \(\d+\.\d\d\)$"):
            check.summary()
    stages = [CHECK_RE.match(line).group(1) for line in _evidence(caplog) if line.startswith("R3 check")]
    assert stages == ["replay_forward", "replay_backward"]
    assert any(r.getMessage().startswith("R3 mismatch (rank 0, stage replay_forward, layer ") for r in caplog.records)


# --- layouts through the routers --------------------------------------------------------------------------------------
def _rank_hidden(h_SBH, lengths, layout, *, zigzag=True):
    """This rank's router input, sliced by hand the way mcore does (or contiguously, the negative control)."""
    def cp(x, seq_dim):
        if zigzag:
            return zigzag_cp_slice(x, layout.cp_size, layout.cp_rank, seq_dim=seq_dim)
        return x.chunk(layout.cp_size, dim=seq_dim)[layout.cp_rank]

    m = layout.pad_multiple
    if layout.packed:  # THD: [T, 1, H], each sample padded to its multiple, CP per sample
        parts = []
        for b, n in enumerate(lengths):
            n_pad = -(-n // m) * m
            x = torch.cat([h_SBH[:n, b], torch.zeros(n_pad - n, H)])
            parts.append(cp(x, 0))
        x = torch.cat(parts)
        if layout.sequence_parallel:
            x = sp_scatter(x, layout.tp_size, layout.tp_rank)
        return x[:, None, :]
    x = cp(h_SBH, 0)
    return sp_scatter(x, layout.tp_size, layout.tp_rank) if layout.sequence_parallel else x


LAYOUTS = {
    "cp2": dict(cp_size=2),
    "sp2": dict(tp_size=2, sequence_parallel=True),
    "cp2-sp2": dict(cp_size=2, tp_size=2, sequence_parallel=True),
    "thd-cp2": dict(packed=True, cp_size=2),
    "thd-cp2-sp2": dict(packed=True, cp_size=2, tp_size=2, sequence_parallel=True),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layouts_through_the_routers(name):
    lengths = [8, 5, 7]
    model, config = _stack()
    h = _hidden(8, 3)
    traces = _record_traces(model, config, h, lengths)
    spec = LAYOUTS[name]
    caught = 0
    for cp_rank in range(spec.get("cp_size", 1)):
        for tp_rank in range(spec.get("tp_size", 1)):
            layout = RankLayout(seq_len=None if spec.get("packed") else 8, cp_rank=cp_rank, tp_rank=tp_rank, **spec)
            batch = rank_router_batch(traces, layout)
            check = ReplayCheck(3, TOPK)
            replay = MegatronReplay(model, num_layers=3, check=check)
            model.used = {n: [] for n in model.used}
            with replay.replay():
                replay.set_micro_batch(batch)
                model(_rank_hidden(h, lengths, layout))
            summary = check.summary()
            assert summary.zero_overlap == 0 and summary.tokens_checked > 0
            assert _used_vs_batch(model, batch) == 0
            # negative control: the same ids on a contiguous CP split of the tokens. Some ranks' parts coincide
            # with the zigzag ones (with SP), or differ only at pad rows (THD), so it is counted over the ranks.
            with replay.replay():
                replay.set_micro_batch(batch)
                model(_rank_hidden(h, lengths, layout, zigzag=False))
            try:
                check.summary()
            except AssertionError as exc:
                assert str(exc).startswith("R3 mismatch tokens")
                caught += 1
    assert caught > 0 if spec.get("cp_size", 1) > 1 else caught == 0


def test_pipeline_stage_keyed_by_layer_number():
    """Stage 1 of pp=2 holds decoder layers 3, 4: its routers read trace layers 2, 3. A wrong stage offset fails."""
    full, config = _stack(4)
    h = _hidden(6, 2)
    traces = _record_traces(full, config, h, [6, 6])
    with torch.no_grad():
        h_stage1 = full._layer(2, full._layer(1, h))
    stage1 = MoEStack(config, [3, 4], [3, 4])
    stage1.load_state_dict({k: v for k, v in full.state_dict().items() if k.split(".")[1] in ("3", "4")})
    batch = rank_router_batch(traces, RankLayout(seq_len=6))
    check = ReplayCheck(4, TOPK)
    replay = MegatronReplay(stage1, num_layers=4, check=check)
    assert sorted((s.layer_number, s.trace_layer) for s in replay.sites) == [(3, 2), (4, 3)]
    with replay.replay():
        replay.set_micro_batch(batch)
        stage1(h_stage1)
    assert check.summary().zero_overlap == 0
    for offset, router in zip([1, 2], stage1.routers.values(), strict=True):  # a wrong offset: numbered 1, 2
        router.set_layer_number(offset)
    wrong = MegatronReplay(stage1, num_layers=4, check=check)
    with wrong.replay():
        wrong.set_micro_batch(batch)
        stage1(h_stage1)
    with pytest.raises(AssertionError, match="R3 mismatch tokens"):
        check.summary()


# --- micro-batches, recompute order, consumption ---------------------------------------------------------------------
def _two_micro_batches(recompute="reentrant"):
    model, config = _stack(recompute=recompute)
    hs = [_hidden(6, 2, seed=s) for s in (1, 2)]
    batches = [rank_router_batch(_record_traces(model, config, h, [6, 6]), RankLayout(seq_len=6)) for h in hs]
    return model, hs, batches


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_pipelined_micro_batches_fifo(order):
    """1F1B-like: both forwards, then both backwards. In order, the native FIFO pops the right ids; out of order,
    the recompute replays the other micro-batch's ids and the check fails in stage replay_backward."""
    model, hs, batches = _two_micro_batches()
    check = ReplayCheck(3, TOPK)
    replay = MegatronReplay(model, num_layers=3, check=check)
    with replay.replay():
        losses = []
        for h, batch in zip(hs, batches, strict=True):
            replay.set_micro_batch(batch)
            losses.append(model(h.clone().requires_grad_(True)).sum())
        for i in order:
            losses[i].backward()
        summary = check.summary(raise_on_fail=False)
    assert summary.stages["replay_forward"].zero_overlap == 0
    assert (summary.stages["replay_backward"].zero_overlap == 0) == (order == [0, 1])


def test_no_grad_forward_is_not_queued_for_recompute():
    """An old-log-prob forward (no backward) must not enter the native FIFO, else the next recompute pops it."""
    model, hs, batches = _two_micro_batches()
    check = ReplayCheck(3, TOPK)
    replay = MegatronReplay(model, num_layers=3, check=check)
    with replay.replay():
        with torch.no_grad():
            replay.set_micro_batch(batches[0])
            model(hs[0])
        assert all(not s.native.replay_backward_list for s in replay.sites)
        replay.set_micro_batch(batches[1])
        model(hs[1].clone().requires_grad_(True)).sum().backward()
    assert check.summary().zero_overlap == 0


def test_unconsumed_recompute_is_an_error():
    model, hs, batches = _two_micro_batches()
    replay = MegatronReplay(model, num_layers=3)
    with pytest.raises(MegatronReplayError, match=r"decoder layer 1: 1 queued forward\(s\) never recomputed"):
        with replay.replay():
            losses = []
            for h, batch in zip(hs, batches, strict=True):
                replay.set_micro_batch(batch)
                losses.append(model(h.clone().requires_grad_(True)).sum())
            losses[0].backward()


# --- dense layers, MTP, errors --------------------------------------------------------------------------------------
def test_dense_layers_and_mtp_layers_explicit():
    config = make_config(3, [1, 0, 1], mtp_num_layers=1)
    model = MoEStack(config, [1, 2, 3, 4], [1, 3, 4])  # 4 = the MTP layer (num_layers + 1)
    replay = MegatronReplay(model, num_layers=3, moe_layer_freq=[1, 0, 1])
    assert sorted((s.layer_number, s.trace_layer) for s in replay.sites) == [(1, 0), (3, 1)]
    assert replay.live_layers == [4]
    with pytest.raises(MegatronReplayError, match="trace has 2 layers but the MTP router of decoder layer 4 reads "
                                                  "trace layer 2"):
        MegatronReplay(model, num_layers=3, moe_layer_freq=[1, 0, 1], mtp=MtpRouting.REPLAY, trace_layers=2)
    with pytest.raises(MegatronReplayError, match="router of decoder layer 3 is not a MoE layer"):
        MegatronReplay(model, num_layers=3, moe_layer_freq=[1, 1, 0])


def test_errors_name_what_is_wrong():
    model, _ = _stack()
    replay = MegatronReplay(model, num_layers=3)
    ids = np.zeros((3, 2, TOPK), dtype=np.uint8)
    ids[..., 1] = 1
    with pytest.raises(MegatronReplayError, match=r"trace has 2 layers, the replay needs 3 \(decoder layers \[3\]"):
        with replay.replay():
            replay.set_micro_batch(rank_router_batch([RoutingTrace.from_ids(ids, E)], RankLayout(seq_len=4)))
    full = np.zeros((3, 3, TOPK), dtype=np.uint8)
    full[..., 1] = 1
    with pytest.raises(MegatronReplayError, match="replay ids have 4 tokens, the router of decoder layer 1 sees 6"):
        with replay.replay():
            replay.set_micro_batch(rank_router_batch([RoutingTrace.from_ids(full, E)], RankLayout(seq_len=4)))
            model(_hidden(6, 1))
    off = MoEStack(make_config(3, replay=False), [1, 2, 3], [1, 2, 3])
    with pytest.raises(MegatronReplayError, match=r"moe_enable_routing_replay=True"):
        MegatronReplay(off, num_layers=3)


def test_routers_that_bypass_replay_are_refused():
    """mcore's fused top-k returns before RouterReplay is asked, sinkhorn never asks: replay would silently not
    happen, so the replay refuses them."""
    model, config = _stack()
    config.moe_router_fusion = True
    with pytest.raises(MegatronReplayError, match=r"router of decoder layer 1 bypasses RouterReplay \(moe_router_fusion"
                                                  r"=True"):
        MegatronReplay(model, num_layers=3)
    config.moe_router_fusion = False
    model.routers["2"].routing_type = "sinkhorn"
    with pytest.raises(MegatronReplayError, match="router of decoder layer 2 bypasses RouterReplay"):
        MegatronReplay(model, num_layers=3)


@pytest.mark.parametrize("fault", [Fault.NONE, Fault.SHIFT])
def test_verify_logs_reads_the_mcore_evidence(fault, caplog, tmp_path):
    """`r3rl verify-logs` takes the evidence of a Megatron run as it takes r3rl's own: pass, and fail on a shift."""
    from r3rl.commands.verify_logs import verify_logs

    model, config = _stack(recompute="reentrant")
    h = _hidden(8, 2)
    traces = [corrupt_trace(t, fault) for t in _record_traces(model, config, h, [8, 7])]
    check = ReplayCheck(3, TOPK)
    replay = MegatronReplay(model, num_layers=3, check=check)
    with caplog.at_level(logging.INFO, logger="r3rl"), replay.replay():
        replay.set_micro_batch(rank_router_batch(traces, RankLayout(seq_len=8)))
        model(h.clone().requires_grad_(True)).sum().backward()
        check.summary(raise_on_fail=False)
    log = tmp_path / "rank0.log"
    log.write_text("\n".join(_evidence(caplog)) + "\n")
    report = verify_logs([log])
    assert report["verdict"] == ("pass" if fault is Fault.NONE else "fail")
    assert report["ranks"]["0"]["check"]["replay_backward"]["n_tokens"] == 3 * (7 + 6)


def test_dense_only_pipeline_stage_is_explicit():
    """A stage of dense layers only has no router: an error unless declared, then a no-op whose check still reports."""
    config = make_config(2, [0, 1])
    stage0 = MoEStack(config, [1], [2])  # pp=2: stage 0 holds dense layer 1 only
    with pytest.raises(MegatronReplayError, match="pass dense_stage=True on a pipeline stage without MoE layers"):
        MegatronReplay(stage0, num_layers=2, moe_layer_freq=[0, 1])
    check = ReplayCheck(1, TOPK)
    replay = MegatronReplay(stage0, num_layers=2, moe_layer_freq=[0, 1], check=check, dense_stage=True)
    ids = np.tile(np.array([0, 1], dtype=np.uint8), (3, 1, 1))
    with replay.replay():
        replay.set_micro_batch(rank_router_batch([RoutingTrace.from_ids(ids, E)], RankLayout(seq_len=4)))
        stage0(_hidden(4, 1).requires_grad_(True)).sum().backward()
    summary = check.summary()
    assert summary.passed and summary.tokens_checked == 0
    with pytest.raises(MegatronReplayError, match="dense_stage=True but the model chunks hold 3"):
        MegatronReplay(_stack()[0], num_layers=3, dense_stage=True)


def test_r2_record_then_replay_the_recording():
    """R2: record the old-policy forward, replay it in the training forward and its recompute (check passes); a
    recording replayed into another micro-batch fails the check."""
    model, _ = _stack(recompute="reentrant")
    h0, h1 = _hidden(6, 2, seed=1), _hidden(6, 2, seed=2)
    check = ReplayCheck(3, TOPK)
    replay = MegatronReplay(model, num_layers=3, check=check)
    with torch.no_grad(), replay.record():
        model(h0)
    recorded = replay.recorded_batch(0, num_experts=E)
    assert recorded.num_tokens == 12 and not recorded.has_pad
    for h, passes in ((h0, True), (h1, False)):
        with replay.replay():
            replay.set_micro_batch(recorded)
            model(h.clone().requires_grad_(True)).sum().backward()
        assert check.summary(raise_on_fail=False).passed is passes
    assert torch.equal(replay.recorded_batch(0, num_experts=E).expert_ids, recorded.expert_ids)  # kept until record()
    with pytest.raises(MegatronReplayError, match="no recorded forward #1 on every router"):
        replay.recorded_batch(1, num_experts=E)
