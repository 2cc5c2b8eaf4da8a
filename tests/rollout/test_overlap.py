"""The overlap schedule (`EngineConfig.overlap_schedule`: launch decode step N+1 before reading step N back), on CPU
where it is off by default: forced on, it must give bitwise the outputs of the plain schedule (tokens, log-probs,
traces, finish reasons) through continuous batching, stop tokens, shared prompts, preemption, aborts and weight
updates in flight, and leave no block behind.

    pytest tests/rollout/test_overlap.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from r3rl.models.presets import make_model
from r3rl.rollout import EngineRequest, RolloutEngine, SamplingParams


@pytest.fixture(scope="module")
def model():
    return make_model("tiny-qwen3-moe", seed=5)


def _requests(n=7, *, stop_every=3, seed0=0):
    """Staggered prompts and budgets, sampled and greedy; every `stop_every`-th request stops on any of 40 tokens
    (so stops land at varied steps, also while a later step is in flight)."""
    return [EngineRequest(request_id=f"r{i}", input_ids=[(7 * i + 3 * j) % 200 + 1 for j in range(3 + 4 * i)],
                          sampling=SamplingParams(max_new_tokens=5 + 4 * i, seed=seed0 + i,
                                                  temperature=0.0 if i % 2 else 1.0,
                                                  stop_token_ids=list(range(40)) if i % stop_every == 0 else []))
            for i in range(n)]


def _same(a, b):
    assert (a.request_id, a.finish_reason) == (b.request_id, b.finish_reason)
    assert a.output_ids == b.output_ids, (a.request_id, a.output_ids, b.output_ids)
    assert a.output_logprobs == b.output_logprobs, a.request_id
    np.testing.assert_array_equal(a.trace.expert_ids, b.trace.expert_ids)


def _both(model, reqs, **cfg):
    plain = RolloutEngine(model, overlap_schedule=False, **cfg)
    overlap = RolloutEngine(model, overlap_schedule=True, **cfg)
    a, b = plain.generate(reqs()), overlap.generate(reqs())
    for x, y in zip(a, b, strict=True):
        _same(x, y)
    overlap.table.check()
    assert overlap.table.num_free == overlap.table.num_blocks - 1 and not overlap.has_work()
    return plain, overlap, b


def test_overlap_gives_the_plain_schedules_outputs(model):
    plain, overlap, outs = _both(model, lambda: _requests(7), max_slots=3, max_seq_len=96)
    assert overlap.num_launched_ahead > 10 and plain.num_launched_ahead == 0  # it did run ahead
    assert {o.finish_reason for o in outs} == {"stop", "length"}
    # control: the same comparison fails on other seeds' outputs
    other = RolloutEngine(model, overlap_schedule=True, max_slots=3, max_seq_len=96).generate(_requests(7, seed0=50))
    with pytest.raises(AssertionError):
        for x, y in zip(outs, other, strict=True):
            _same(x, y)


def test_overlap_with_shared_prompts_and_preemption(model):
    def reqs():
        group = [EngineRequest(request_id=f"g{i}", input_ids=list(range(1, 22)),
                               sampling=SamplingParams(max_new_tokens=40, seed=i, temperature=1.0)) for i in range(4)]
        return group + _requests(5, stop_every=2)

    _, overlap, _ = _both(model, reqs, max_slots=6, max_seq_len=64, block_size=8, kv_cache_tokens=160)
    assert overlap.num_preemptions > 0 and overlap.num_launched_ahead > 0


def test_overlap_abort_and_update_weights_while_a_step_is_in_flight(model):
    engine = RolloutEngine(model, overlap_schedule=True, max_slots=4, max_seq_len=96)
    reqs = _requests(4, stop_every=99)
    for r in reqs:
        engine.add_request(r)
    done = {}
    for _ in range(4):
        done.update((o.request_id, o) for o in engine.step())
    assert engine._inflight is not None  # a step is in flight
    assert engine.abort(["r3"]) == ["r3"]
    assert engine.update_weights(dict(model.named_parameters())) == 1  # same values, new version
    while engine.has_work():
        done.update((o.request_id, o) for o in engine.step())
    assert sorted(done) == ["r0", "r1", "r2"]
    ref = {o.request_id: o for o in RolloutEngine(model, max_slots=4, max_seq_len=96).generate(reqs[:3])}
    for rid in done:
        _same(done[rid], ref[rid])
    assert done["r2"].weight_version == 1 and done["r0"].weight_version == 0  # r0 ended in the drain before it
    engine.table.check()
    assert engine.table.num_free == engine.table.num_blocks - 1


def test_overlap_with_requests_arriving_while_others_run(model):
    engine = RolloutEngine(model, overlap_schedule=True, max_slots=2, max_seq_len=96)
    reqs, done = _requests(6), {}
    engine.add_request(reqs[0])
    for req in reqs[1:]:
        done.update((o.request_id, o) for o in engine.step())
        engine.add_request(req)
    while engine.has_work():
        done.update((o.request_id, o) for o in engine.step())
    for ref in RolloutEngine(model, max_slots=6, max_seq_len=96).generate(_requests(6)):
        _same(done[ref.request_id], ref)
