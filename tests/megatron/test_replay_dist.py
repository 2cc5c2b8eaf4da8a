"""Two gloo processes as two tensor-parallel ranks with sequence parallel: each rank's mcore routers see their half
of the sequence, replay that half of the traces (forward and reentrant recompute), and the check reaches one verdict
over the ranks (`summary(over_ranks=True)`), with each rank's evidence lines carrying its own rank and counts.
Negative control: rank 1 lays its ids out as tp rank 0 (the SP scatter ignored), and both ranks raise together."""

import logging

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install 'r3rl[megatron]')")


def _worker(rank: int, init_file: str, out: dict) -> None:
    torch.set_num_threads(1)
    from mcore_stack import TOPK, MoEStack, make_config
    from test_replay_cpu import _hidden, _record_traces

    from r3rl.check import ReplayCheck
    from r3rl.megatron.layout import RankLayout, rank_router_batch, sp_scatter
    from r3rl.megatron.replay import MegatronReplay

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        config = make_config(2)
        model = MoEStack(config, [1, 2], [1, 2], seed=0, recompute="reentrant")  # same weights on both ranks
        h = _hidden(8, 2)
        traces = _record_traces(model, config, h, [8, 6])  # the rollout's traces, whole samples
        check = ReplayCheck(2, TOPK)
        replay = MegatronReplay(model, num_layers=2, check=check)
        lines = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())
        logging.getLogger("r3rl").addHandler(handler)
        logging.getLogger("r3rl").setLevel(logging.INFO)
        for wrong_rank in (False, True):
            layout = RankLayout(seq_len=8, tp_size=2, tp_rank=0 if wrong_rank else rank, sequence_parallel=True)
            lines.clear()
            with replay.replay():
                replay.set_micro_batch(rank_router_batch(traces, layout))
                model(sp_scatter(h, 2, rank).requires_grad_(True)).sum().backward()  # this rank's SP part of [s,b,h]
            try:
                summary = check.summary(over_ranks=True)
                out[(rank, wrong_rank)] = ("passed", summary.tokens_checked, list(lines))
            except AssertionError as exc:
                out[(rank, wrong_rank)] = (str(exc), None, list(lines))
    finally:
        dist.destroy_process_group()


def test_sequence_parallel_ranks_replay_their_half(tmp_path):
    """One spawn (two processes) runs the right layout, then the negative control."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
        out = dict(out)
    results = {rank: out[(rank, False)] for rank in (0, 1)}
    # rows: sample 0 has 7 trace rows (positions 0..6), sample 1 has 5 (0..4); tp rank 0 holds positions 0..3,
    # rank 1 positions 4..7: rank 0 checks (4 + 4) rows per layer, rank 1 (3 + 1); summed over ranks, 2 layers
    assert results[0][:2] == results[1][:2] == ("passed", 2 * (8 + 4) * 2)
    for rank, n_rows in ((0, 16), (1, 8)):
        lines = results[rank][2]
        assert f"R3 check (rank {rank}, stage replay_forward): n_tokens={n_rows} mismatch=0 (0.00%)" in lines
        assert f"R3 check (rank {rank}, stage replay_backward): n_tokens={n_rows} mismatch=0 (0.00%)" in lines
    # negative control: rank 1 lays its ids out as tp rank 0 (the SP scatter ignored): one verdict, both ranks raise
    wrong = {rank: out[(rank, True)] for rank in (0, 1)}
    assert wrong[0][0] == wrong[1][0] and wrong[0][0].startswith("R3 mismatch tokens (")
