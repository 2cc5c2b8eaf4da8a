"""RolloutBackend: group seeds, weight sync and log-prob kinds, in-process (EngineBackend) and through a real
`r3rl serve` process (HTTPBackend, weights synced by disk).

    pytest tests/rollout/net/test_backend.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r3rl.models import load_model
from r3rl.models.presets import make_model
from r3rl.rollout import EngineBackend, EngineRequest, HTTPBackend, RolloutBackend, RolloutEngine, SamplingParams
from r3rl.rollout.engine.sampling import group_seed
from r3rl.rollout.net.backend import WeightSyncError
from r3rl.rollout.net.client import ModelShape, RolloutRequestError

LAYERS, TOP_K, EXPERTS = 4, 4, 16  # tiny-qwen3-moe


def _key(samples):
    return [(s.response_ids, s.rollout_logprobs, s.trace.expert_ids.tobytes()) for s in samples]


@pytest.fixture(scope="module")
def qwen3():
    return make_model("tiny-qwen3-moe", seed=3)


def test_group_samples_are_distinct_and_seeded_reproducibly(qwen3):
    backend = EngineBackend(qwen3, max_slots=8, max_seq_len=64)
    assert isinstance(backend, RolloutBackend)
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, seed=123)
    a = backend.generate([[5, 6, 7]] * 8, sampling)  # 8 copies, one sample each: a GRPO group written out
    assert len({tuple(s.response_ids) for s in a}) > 1, "one shared seed would collapse the group"
    grouped = backend.generate([[5, 6, 7]], sampling, n_samples_per_prompt=8)
    assert len({tuple(s.response_ids) for s in grouped}) > 1
    assert _key(backend.generate([[5, 6, 7]], sampling, n_samples_per_prompt=8)) == _key(grouped)  # bitwise again
    other = backend.generate([[5, 6, 7]], SamplingParams(max_new_tokens=8, seed=124), n_samples_per_prompt=8)
    assert _key(other) != _key(grouped)
    unseeded = backend.generate([[5, 6, 7]], SamplingParams(max_new_tokens=8), n_samples_per_prompt=8)
    assert len({tuple(s.response_ids) for s in unseeded}) > 1


def test_samples_are_prompt_major_with_metadata_and_validated_traces(qwen3):
    backend = EngineBackend(qwen3, max_slots=4, max_seq_len=64)
    prompts = [[1, 2], [3, 4, 5], [6]]
    samples = backend.generate(prompts, SamplingParams(max_new_tokens=3, seed=0), n_samples_per_prompt=2)
    assert [(s.metadata["prompt_index"], s.metadata["sample_index"]) for s in samples] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [s.prompt_ids for s in samples] == [p for p in prompts for _ in range(2)]
    assert len({s.metadata["rid"] for s in samples}) == 6
    for s in samples:
        assert s.trace.expert_ids.shape == (s.num_tokens - 1, LAYERS, TOP_K) and s.logprob_temperature == 1.0
    # sample j of prompt i is the engine request seeded with group_seed(base, i, j): nothing else decides it
    engine = RolloutEngine(qwen3, max_slots=1, max_seq_len=64)
    [ref] = engine.generate([EngineRequest(request_id="x", input_ids=[3, 4, 5],
                                           sampling=SamplingParams(max_new_tokens=3, seed=group_seed(0, 1, 1)))])
    assert ref.output_ids == samples[3].response_ids
    with pytest.raises(ValueError, match="n_samples_per_prompt"):
        backend.generate(prompts, SamplingParams(), n_samples_per_prompt=0)


def test_engine_backend_update_weights_changes_outputs_and_version(qwen3):
    backend = EngineBackend(qwen3, max_slots=4, max_seq_len=64)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    before = backend.generate([[9, 8, 7]], greedy)
    other = make_model("tiny-qwen3-moe", seed=4)
    backend.update_weights(other, version=7)
    after = backend.generate([[9, 8, 7]], greedy)
    assert backend.weight_version == 7 and after[0].weight_version == after[0].weight_version_start == 7
    assert after[0].response_ids != before[0].response_ids
    assert _key(after) == _key(EngineBackend(other, max_slots=4, max_seq_len=64).generate([[9, 8, 7]], greedy))
    with torch.no_grad():  # strict: an update that misses a tensor changes nothing
        broken = make_model("tiny-qwen3-moe", seed=4)
        broken.lm_head = torch.nn.Identity()
    with pytest.raises(ValueError, match="missing.*lm_head.weight"):
        backend.update_weights(broken, version=8)
    assert backend.weight_version == 7


def test_logprobs_at_temperature_are_those_of_the_sampled_distribution(qwen3):
    sampling = SamplingParams(max_new_tokens=5, temperature=0.7, seed=5)
    raw = EngineBackend(qwen3, max_slots=2, max_seq_len=64).generate([[4, 5, 6]], sampling)[0]
    scaled = EngineBackend(qwen3, max_slots=2, max_seq_len=64, logprobs_at_temperature=True).generate(
        [[4, 5, 6]], sampling)[0]
    assert scaled.response_ids == raw.response_ids, "the option changes what is reported, not what is sampled"
    assert raw.logprob_temperature == 1.0 and scaled.logprob_temperature == 0.7
    with torch.no_grad():
        logits = qwen3(torch.tensor([raw.tokens])).logits[0, 2:-1].float()
    ids = torch.tensor(raw.response_ids)[:, None]
    for temperature, sample in ((1.0, raw), (0.7, scaled)):
        expected = torch.log_softmax(logits / temperature, dim=-1).gather(1, ids)[:, 0]
        torch.testing.assert_close(torch.tensor(sample.rollout_logprobs), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="backend option"):
        EngineBackend(qwen3, max_slots=2, max_seq_len=64).generate(
            [[1]], SamplingParams(max_new_tokens=1, logprobs_at_temperature=True))


def test_weight_version_start_and_end_differ_across_an_update(qwen3):
    engine = RolloutEngine(qwen3, max_slots=2, max_seq_len=64)
    engine.add_request(EngineRequest(request_id="a", input_ids=[1, 2], sampling=SamplingParams(max_new_tokens=4)))
    assert engine.step() == []
    engine.update_weights(qwen3.state_dict(), version=3)
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert (outs[0].weight_version_start, outs[0].weight_version) == (0, 3)


# --- through a real `r3rl serve` process -------------------------------------------------------------------------
def test_http_backend_syncs_weights_by_disk_end_to_end(server_factory, tiny_model_dir, tmp_path):
    srv = server_factory(max_slots=8)
    backend = HTTPBackend(srv.url, weights_dir=tmp_path / "weights")
    try:
        assert isinstance(backend, RolloutBackend) and backend.weight_version == 0
        assert backend.model_shape == EngineBackend(load_model(tiny_model_dir), max_slots=1, max_seq_len=8).model_shape
        # r3rl serve reports its shape: a local policy's (what the trainer passes) must agree with it
        same = HTTPBackend(srv.url, model_shape=ModelShape.of_model(load_model(tiny_model_dir)))
        wrong = HTTPBackend(srv.url, model_shape=ModelShape.of_model(make_model("tiny-mixtral", seed=0)))
        try:
            assert same.model_shape == backend.model_shape
            with pytest.raises(RolloutRequestError, match=r"serves a model of MoE shape \(layers, top_k, experts\)="
                                                          r"\(4, 4, 16\), the local policy's is \(4, 2, 8\)"):
                wrong.generate([[1, 2]], SamplingParams(max_new_tokens=2, seed=0))
        finally:
            same.close()
            wrong.close()
        sampling = SamplingParams(max_new_tokens=6, temperature=1.0, seed=11)
        before = backend.generate([[7, 8, 9], [1, 2]], sampling, n_samples_per_prompt=3)
        assert [s.weight_version for s in before] == [0] * 6
        assert [s.metadata["prompt_index"] for s in before] == [0, 0, 0, 1, 1, 1]
        assert len({tuple(s.response_ids) for s in before[:3]}) > 1

        model = load_model(tiny_model_dir)
        with torch.no_grad():
            model.lm_head.weight.mul_(3.0)  # a sharper policy: different tokens and log-probs
        backend.update_weights(model, version=5)
        assert backend.weight_version == 5 and sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["v5"]
        after = backend.generate([[7, 8, 9], [1, 2]], sampling, n_samples_per_prompt=3)
        assert {(s.weight_version_start, s.weight_version) for s in after} == {(5, 5)}
        local = EngineBackend(model, max_slots=8, max_seq_len=srv.max_seq_len).generate(
            [[7, 8, 9], [1, 2]], sampling, n_samples_per_prompt=3)
        assert _key(after) == _key(local), "the server must serve exactly the weights sent"
        assert _key(after) != _key(before)

        hot = HTTPBackend(srv.url, logprobs_at_temperature=True)
        warm = SamplingParams(max_new_tokens=4, temperature=0.5, seed=2)
        [s] = hot.generate([[3, 3]], warm)
        [ref] = EngineBackend(model, max_slots=2, max_seq_len=64, logprobs_at_temperature=True).generate([[3, 3]], warm)
        assert s.logprob_temperature == 0.5 and s.response_ids == ref.response_ids
        np.testing.assert_array_equal(s.rollout_logprobs, ref.rollout_logprobs)
        with pytest.raises(WeightSyncError, match="weights_dir"):
            hot.update_weights(model, version=6)
        hot.close()

        other_family = make_model("tiny-mixtral", seed=0)  # another architecture: the server must refuse it
        with pytest.raises(RolloutRequestError,
                           match="update_weights_from_disk.*(missing|unexpected|mismatched|must describe the served)"):
            backend.update_weights(other_family, version=6)
        assert backend.weight_version == 5 and backend.generate([[7, 8, 9]], sampling)[0].weight_version == 5
    finally:
        backend.close()
