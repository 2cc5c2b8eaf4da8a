"""Two gloo ranks on CPU (torch.multiprocessing): what each rank must see of the others.

- REINFORCE++-baseline divides by the std of the GLOBAL batch's centered rewards: two ranks, each with its share of
  the groups, get exactly the single-process advantages (negative control: each rank's own std differs).
- A rollout fleet under torchrun: a server whose weight sync failed on rank 0 (which alone syncs) is dropped on
  every rank, and rank 1 then generates on the live server only (negative control: without the broadcast rank 1
  keeps the stale server)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from r3rl.train.losses import AdvantageEstimator, group_advantages
from r3rl.train.parallel import DistEnv, prompt_shard, sum_over_ranks

WORLD = 2
# 4 prompts x 3 samples; rank 0 gets prompts 0-1 (small spread), rank 1 prompts 2-3 (large): their stds differ
REWARDS_PN = torch.tensor([[0.0, 0.1, 0.2], [0.3, 0.3, 0.0], [1.0, 0.0, 3.0], [2.0, -1.0, 0.5]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, port: int) -> DistEnv:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return DistEnv.from_environ("cpu")


def _worker(rank: int, port: int, urls: list[str], out_dir: str) -> None:
    from r3rl.models.presets import make_model
    from r3rl.rollout.engine.messages import SamplingParams
    from r3rl.rollout.net.client import ModelShape
    from r3rl.rollout.net.fleet import FleetBackend
    from r3rl.train.parallel import RankZeroWeightSync

    env = _env(rank, port)
    mine = REWARDS_PN[prompt_shard(len(REWARDS_PN), len(REWARDS_PN), env)]
    est = AdvantageEstimator.REINFORCE_PLUS_PLUS
    torch.save({"global": group_advantages(mine, est, sum_over_ranks=lambda v: sum_over_ranks(v, env)),
                "own": group_advantages(mine, est)}, Path(out_dir) / f"adv{rank}.pt")
    model = make_model("tiny-qwen3-moe", seed=0)
    fleet = FleetBackend(urls, weights_dir=Path(out_dir) / "weights", model_shape=ModelShape.of_model(model))

    class NoShare:  # the fleet as RankZeroWeightSync saw it before: no live-set broadcast
        def __init__(self, inner):
            self.update_weights, self.adopt_version = inner.update_weights, inner.adopt_version

    out = {}
    try:
        RankZeroWeightSync(NoShare(fleet), env).update_weights(model, version=1)  # rank 0 drops the failing server
        out["live_without_share"] = fleet.live_urls
        RankZeroWeightSync(fleet, env).update_weights(model, version=2)
        out["live"] = fleet.live_urls
        out["version"] = fleet.weight_version
        samples = fleet.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=2, seed=rank),
                                 n_samples_per_prompt=2)
        out["served_by"] = sorted({s.metadata["server"] for s in samples})
        (Path(out_dir) / f"fleet{rank}.json").write_text(json.dumps(out))
    finally:
        fleet.close()
        env.close()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One spawn of two gloo ranks (start-up dominates) for both tests; the fleet's servers live in this process."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "rollout" / "net"))
    from _sglang_like import SGLangLikeServer

    from r3rl.models.presets import make_model

    out = tmp_path_factory.mktemp("ranks")
    with SGLangLikeServer(make_model("tiny-qwen3-moe", seed=0)) as good, \
            SGLangLikeServer(make_model("tiny-qwen3-moe", seed=0), fail_updates=True) as bad:
        mp.spawn(_worker, args=(_free_port(), [good.url, bad.url], str(out)), nprocs=WORLD, join=True)
    return out, good.url, bad.url


def test_reinforce_plus_plus_uses_the_global_batch_std_over_two_ranks(two_ranks):
    out, _, _ = two_ranks
    ranks = [torch.load(out / f"adv{r}.pt", weights_only=True) for r in range(WORLD)]
    single = group_advantages(REWARDS_PN, AdvantageEstimator.REINFORCE_PLUS_PLUS)
    torch.testing.assert_close(torch.cat([r["global"] for r in ranks]), single)
    own = torch.cat([r["own"] for r in ranks])
    assert (own - single).abs().max() > 0.5  # each rank's own std: the defect this replaced


def test_a_server_rank_zero_drops_after_a_failed_sync_is_dropped_on_every_rank(two_ranks):
    out, good, bad = two_ranks
    r0, r1 = (json.loads((out / f"fleet{r}.json").read_text()) for r in range(WORLD))
    assert r0["live_without_share"] == [good]
    assert r1["live_without_share"] == [good, bad]  # the defect: rank 1 still used the stale server
    for r in (r0, r1):
        assert r["live"] == [good] and r["served_by"] == [good] and r["version"] == 2
