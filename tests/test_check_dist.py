"""ReplayCheck.all_reduce across two gloo processes: one verdict from every rank's counters, including a rank that
observed nothing."""

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
        check.all_reduce()
        s = check.summary(raise_on_fail=False)
        out[rank] = (s.tokens_checked, s.zero_overlap, check.last_summary.passed)
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_every_rank_into_one_verdict(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
        results = dict(out)
    assert results[0] == results[1] == (10, 2, False)  # rank 1's verdict sees rank 0's mismatch
