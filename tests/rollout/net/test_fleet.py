"""FleetBackend over two real `r3rl serve` processes: load spread, a server SIGKILLed mid-rollout (every sample
returned exactly once, bitwise equal to a run without the kill), weight sync to both and a dead server excluded;
drop_stale counting.

    pytest tests/rollout/net/test_fleet.py -q
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from r3rl.models import load_model
from r3rl.rollout import SamplingParams
from r3rl.rollout.net.backend import HTTPBackend, drop_stale
from r3rl.rollout.net.fleet import FleetBackend, make_backend


def _key(samples):
    return [(s.response_ids, s.rollout_logprobs, s.trace.expert_ids.tobytes()) for s in samples]


@pytest.fixture
def two_servers(server_factory):
    return server_factory(max_slots=8), server_factory(max_slots=8)


PROMPTS = [[5, 6, 7], [9, 10], [11, 12, 13, 14], [3]]
SAMPLING = SamplingParams(max_new_tokens=24, temperature=1.0, seed=7)


def test_fleet_spreads_load_and_survives_a_kill(two_servers, tmp_path, caplog):
    a, b = two_servers
    fleet = make_backend([a.url, b.url], weights_dir=tmp_path, logprobs_at_temperature=False)
    assert isinstance(fleet, FleetBackend)
    try:
        ref = fleet.generate(PROMPTS, SAMPLING, n_samples_per_prompt=4)
        assert len(ref) == 16 and all(n > 0 for n in fleet.served), f"load not spread: {fleet.served}"
        # a GRPO group stays on one server (its engine prefills the prompt once for the group)
        assert all(len({s.metadata["server"] for s in ref[4 * i : 4 * i + 4]}) == 1 for i in range(4))
        # the same seeds again, with server b SIGKILLed while the batch is in flight
        def kill_when_busy():  # SIGKILL while b has requests in flight
            deadline = time.monotonic() + 20
            while fleet.in_flight[1] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)
            b.proc.kill()

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        got = fleet.generate(PROMPTS, SAMPLING, n_samples_per_prompt=4)
        killer.join()
        assert not fleet.live[1], "the killed server must be out of rotation"
        assert "re-sending them with the same seed" in caplog.text, "the kill must hit requests in flight"
        assert len(got) == 16
        assert [(s.metadata["prompt_index"], s.metadata["sample_index"]) for s in got] == \
            [(i, j) for i in range(4) for j in range(4)]
        assert _key(got) == _key(ref), "a re-sent sample must be bitwise the one a live server gives (same seed)"
    finally:
        fleet.close()


def test_fleet_weight_sync_and_dead_server_excluded(two_servers, tiny_model_dir, tmp_path, caplog):
    a, b = two_servers
    fleet = FleetBackend([a.url, b.url], weights_dir=tmp_path)
    try:
        model = load_model(tiny_model_dir)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        fleet.update_weights(model, version=3)
        for url in (a.url, b.url):
            with _closing(HTTPBackend(url)) as hb:
                assert hb.weight_version == 3
        samples = fleet.generate(PROMPTS, SAMPLING, n_samples_per_prompt=2)
        assert {s.weight_version_start for s in samples} == {3}
        b.proc.kill()
        b.proc.wait()
        fleet.update_weights(model, version=4)
        assert fleet.live == [True, False] and "taken out of rotation" in caplog.text
        assert {s.weight_version_start for s in fleet.generate(PROMPTS, SAMPLING)} == {4}
    finally:
        fleet.close()


class _closing:
    def __init__(self, obj):
        self.obj = obj

    def __enter__(self):
        return self.obj

    def __exit__(self, *exc):
        self.obj.close()


def test_drop_stale_counts_and_filters():
    class S:
        def __init__(self, v):
            self.weight_version_start = v

    samples = [S(5), S(4), S(2)]
    kept, n = drop_stale(samples, 5, None)
    assert len(kept) == 3 and n == 2
    kept, n = drop_stale(samples, 5, 1)
    assert [s.weight_version_start for s in kept] == [5, 4] and n == 1
    with pytest.raises(ValueError, match="max_staleness"):
        drop_stale(samples, 5, -1)
