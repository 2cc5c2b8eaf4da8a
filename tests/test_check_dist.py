"""ReplayCheck.all_reduce across two gloo processes: one verdict from every rank's counters, including a rank that
observed nothing."""

import logging

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from r3rl.check import ReplayCheck, Stage


def _worker(rank: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        check = ReplayCheck(2, 4, rank=rank)
        if rank == 0:  # rank 1 observes nothing at all
            live = torch.tensor([[0, 1, 2, 3]] * 5)
            replay = torch.tensor([[0, 1, 2, 3]] * 3 + [[4, 5, 6, 7]] * 2)  # 2 rows with zero overlap
            check.observe(Stage.REPLAY_FORWARD, 0, live, replay)
            check.observe(Stage.REPLAY_BACKWARD, 1, live, live)
        lines = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())
        logging.getLogger("r3rl").addHandler(handler)
        logging.getLogger("r3rl").setLevel(logging.INFO)
        s = check.summary(raise_on_fail=False, over_ranks=True)
        out[rank] = (s.tokens_checked, s.zero_overlap, check.last_summary.passed, lines)
        try:  # the verdict is global, so every rank raises together (no rank left waiting in a collective)
            check.calls.add(Stage.REPLAY_FORWARD, 0, 5)
            if rank == 0:
                check.observe(Stage.REPLAY_FORWARD, 0, live, replay)
            check.summary(over_ranks=True)
            out[f"raised{rank}"] = None
        except AssertionError as e:
            out[f"raised{rank}"] = str(e)
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_every_rank_into_one_verdict(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
        results = dict(out)
    assert results[0][:3] == results[1][:3] == (10, 2, False)  # rank 1's verdict sees rank 0's mismatch
    # the evidence lines carry each rank's own counts: rank 1 checked nothing, so it logs nothing
    assert "R3 check (rank 0, stage replay_forward): n_tokens=5 mismatch=2 (40.00%)" in results[0][3]
    assert not any("R3 check" in line for line in results[1][3])
    assert results["raised0"] == results["raised1"] == "R3 mismatch tokens (2) > threshold (0.05)"
