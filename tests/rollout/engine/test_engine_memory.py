"""The engine's memory release/resume for colocated training (SGLang's release/resume_memory_occupation)."""

import pytest

from r3rl.models.presets import make_model
from r3rl.rollout import EngineRequest, RolloutEngine, SamplingParams


def test_release_and_resume_memory_frees_the_kv_cache_and_generates_the_same_tokens():
    """Colocated training frees the engine's KV cache during the update; after resume the engine is as before."""
    engine = RolloutEngine(make_model("tiny-qwen3-moe", seed=0), max_slots=2, max_seq_len=32)

    def req(rid: str) -> EngineRequest:
        return EngineRequest(request_id=rid, input_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=6, seed=3))

    [before] = engine.generate([req("a")])
    freed = engine.release_memory()
    assert freed > 0 and engine.memory_released and engine.release_memory() == 0
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.add_request(req("b"))
    engine.resume_memory()
    [after] = engine.generate([req("c")])
    assert after.output_ids == before.output_ids and (after.trace.expert_ids == before.trace.expert_ids).all()
    engine.add_request(req("d"))  # a busy engine refuses to release
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.release_memory()
