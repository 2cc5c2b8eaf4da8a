"""NCCL-path weight sync on CPU with gloo: a real `r3rl serve` process joins an update group with the test process
as trainer rank 0, receives the broadcast weights, and its next outputs use them and report the new version.

    pytest tests/rollout/net/test_dist_sync.py -q
"""

from __future__ import annotations

import asyncio
import socket

import torch

from r3rl.models import load_model
from r3rl.rollout import SamplingParams
from r3rl.rollout.engine.weights import model_tensors
from r3rl.rollout.net.backend import EngineBackend, HTTPBackend
from r3rl.rollout.net.client import RolloutHTTPError, RolloutRequestError
from r3rl.rollout.net.dist_sync import (
    broadcast_weights,
    init_update_group,
    init_weights_update_group,
    update_weights_from_distributed,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SAMPLING = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)


def _key(samples):
    return [(s.response_ids, s.rollout_logprobs) for s in samples]


def test_gloo_broadcast_updates_the_server(server_factory, tiny_model_dir):
    srv = server_factory(max_slots=8)
    hb = HTTPBackend(srv.url)
    try:
        before = hb.generate([[5, 6, 7]], SAMPLING, n_samples_per_prompt=2)
        model = load_model(tiny_model_dir)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.3)
        expected = EngineBackend(model, max_slots=8, max_seq_len=64)
        expected.update_weights(model, version=9)
        port = free_port()

        async def join():
            return await init_weights_update_group(hb.client, master_address="127.0.0.1", master_port=port,
                                                   rank_offset=1, world_size=2, backend="gloo")

        fut = asyncio.run_coroutine_threadsafe(join(), hb._loop)
        pg = init_update_group("127.0.0.1", port, world_size=2, rank=0, backend="gloo")
        assert fut.result(60)["success"]
        tensors = model_tensors(model)
        fut = asyncio.run_coroutine_threadsafe(update_weights_from_distributed(hb.client, tensors,
                                                                               weight_version="9"), hb._loop)
        broadcast_weights(tensors, pg)
        assert fut.result(60)["weight_version"] == 9
        after = hb.generate([[5, 6, 7]], SAMPLING, n_samples_per_prompt=2)
        assert {s.weight_version_start for s in after} == {9}
        assert _key(after) != _key(before)
        assert _key(after) == _key(expected.generate([[5, 6, 7]], SAMPLING, n_samples_per_prompt=2))
        # negative control: a wrong shape is refused before anything is received
        bad = dict(tensors)
        name = next(iter(bad))
        bad[name] = bad[name][:1]
        fut = asyncio.run_coroutine_threadsafe(update_weights_from_distributed(hb.client, bad, weight_version="10"),
                                               hb._loop)
        try:
            fut.result(60)
            raise AssertionError("a wrong shape must be refused")
        except RolloutRequestError as e:
            assert name in str(e) and "shape" in str(e)
        assert hb._run(hb.client.get_model_info())["weight_version"] in (9, "9")
    finally:
        hb.close()


def _served_model_path(hb) -> str:
    return hb._run(hb.client.get_model_info())["model_path"]


def _announce(hb, tensors, **kw):
    return asyncio.run_coroutine_threadsafe(update_weights_from_distributed(hb.client, tensors, **kw), hb._loop)


def test_announced_dtypes_are_checked_and_a_partial_broadcast_applies_nothing(server_factory):
    """Issue 20: int8, bool and complex128 were accepted for float weights; a receive is applied only whole."""
    srv = server_factory(max_slots=4, extra_args=("--dist-timeout-s", "3"))
    hb = HTTPBackend(srv.url)
    try:
        greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
        before = _key(hb.generate([[5, 6, 7]], greedy))
        port = free_port()
        fut = asyncio.run_coroutine_threadsafe(init_weights_update_group(
            hb.client, master_address="127.0.0.1", master_port=port, rank_offset=1, world_size=2, backend="gloo"),
            hb._loop)
        pg = init_update_group("127.0.0.1", port, world_size=2, rank=0, backend="gloo")
        assert fut.result(60)["success"]
        tensors = {n: t * 1.5 for n, t in model_tensors(load_model(_served_model_path(hb))).items()}
        name = next(iter(tensors))
        for dtype in (torch.int8, torch.bool, torch.complex128):  # refused at once, before any receive
            bad = {**tensors, name: tensors[name].to(dtype)}
            try:
                _announce(hb, bad, weight_version="5").result(10)
                raise AssertionError(f"dtype {dtype} must be refused")
            except RolloutRequestError as e:
                assert "dtypes[0]" in str(e) and str(dtype).removeprefix("torch.") in str(e), str(e)
        # the trainer broadcasts half of the announced tensors, then stops: nothing is applied
        fut = _announce(hb, tensors, weight_version="5")
        half = dict(list(tensors.items())[: len(tensors) // 2])
        broadcast_weights(half, pg)
        try:
            fut.result(60)
            raise AssertionError("a partial broadcast must fail")
        except RolloutHTTPError as e:
            assert e.status == 504 and f"received {len(half)} of {len(tensors)}" in str(e), str(e)
            assert "nothing was applied" in str(e)
        info = hb._run(hb.client.get_model_info())
        assert info["weight_version"] in (0, "0")
        assert _key(hb.generate([[5, 6, 7]], greedy)) == before
    finally:
        hb.close()
