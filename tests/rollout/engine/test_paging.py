"""Paged KV cache (paging.py, kv_cache.py) and prompt sharing in the engine, on CPU with a tiny MoE model.

    pytest tests/rollout/engine/test_paging.py -q

The CPU engine is batch-invariant, so a request's tokens, log-probs and trace must be bitwise the same whether its
prompt was prefilled by itself or shared with its group, and whether or not it was preempted on the way.
"""

from __future__ import annotations

import pytest
import torch
from _outputs import same_output

from r3rl.models.presets import make_model
from r3rl.rollout import EngineRequest, RolloutEngine, SamplingParams
from r3rl.rollout.engine.config import EngineConfig
from r3rl.rollout.model.paging import NULL_BLOCK, BlockTable


@pytest.fixture(scope="module")
def model():
    return make_model("tiny-qwen3-moe", seed=3)


# Qwen3-Next: its linear-attention layers keep a per-slot state instead of KV blocks; a shared prompt's samples copy
# the owner's state after the one prefill, moved slots carry theirs, and a preempted request's prefill rewrites it
@pytest.fixture(scope="module", params=["tiny-qwen3-moe", "tiny-qwen3-next"])
def family_model(request):
    return make_model(request.param, seed=3)


def _group(prompt, n, *, tag="g", max_new=12, seed0=0, **sampling):
    return [EngineRequest(request_id=f"{tag}{i}", input_ids=list(prompt),
                          sampling=SamplingParams(max_new_tokens=max_new, seed=seed0 + i, temperature=1.0, **sampling))
            for i in range(n)]


def _alone(model, reqs, **cfg):
    """Each request on a fresh engine by itself: the yardstick."""
    return [RolloutEngine(model, **cfg).generate([r])[0] for r in reqs]


def _same(a, b):
    same_output(a, b, finish=False)


def _count_prefill_tokens(engine):
    """Wrap the engine's prefill to count the prompt tokens it computes (N x P)."""
    seen = []
    inner = engine.model.prefill

    def counted(tokens_NP, *args):
        seen.append(tokens_NP.numel())
        return inner(tokens_NP, *args)

    engine.model.prefill = counted
    return seen


# --- BlockTable ------------------------------------------------------------------------------------------------------
def test_block_table_counts_shared_blocks_and_frees_them_with_the_last_holder():
    t = BlockTable(num_slots=3, max_seq_len=32, block_size=8, num_blocks=9, device=torch.device("cpu"))
    owner = t.allocate(3)
    t.assign(0, owner)
    t.assign(1, owner[:2] + t.allocate(1))  # shares two full blocks, owns a private partial block
    t.sync()
    assert t.num_free == 8 - 4 and NULL_BLOCK not in owner
    assert t.table_SM[1, :3].tolist() == owner[:2] + [t.blocks(1)[-1]] and t.table_SM[1, 3].item() == NULL_BLOCK
    t.check()
    t.release(0)
    assert t.num_free == 8 - 3  # owner's third block freed; the two shared ones are still held by slot 1
    t.move(1, 0)
    t.sync()
    assert t.table_SM[1].tolist() == [NULL_BLOCK] * 4 and t.blocks(0)[:2] == owner[:2]
    t.release(0)
    t.check()
    assert t.num_free == 8
    with pytest.raises(MemoryError, match="9 wanted, 8 free"):
        t.allocate(9)


def test_block_table_check_catches_a_leaked_or_double_owned_block():
    t = BlockTable(num_slots=2, max_seq_len=16, block_size=8, num_blocks=5, device=torch.device("cpu"))
    t.assign(0, t.allocate(2))
    t._free.append(t.blocks(0)[0])  # a block both free and held
    with pytest.raises(AssertionError, match="double"):
        t.check()


def test_kv_cache_must_hold_one_full_request():
    with pytest.raises(ValueError, match="kv_cache_tokens must hold one request of max_seq_len=64"):
        EngineConfig(max_seq_len=64, kv_cache_tokens=63)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        EngineConfig(block_size=0)


# --- prompt sharing --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt_len", [21, 24])  # a partial last block (copied per sample), whole blocks only
def test_a_group_prefills_its_prompt_once_and_matches_each_sample_run_alone(family_model, prompt_len):
    model = family_model
    cfg = dict(max_slots=8, max_seq_len=64, block_size=8)
    prompt = [(5 * j + 1) % 200 for j in range(prompt_len)]
    reqs = _group(prompt, 4) + _group([7, 8, 9], 2, tag="h", seed0=10)
    engine = RolloutEngine(model, **cfg)
    prefilled = _count_prefill_tokens(engine)
    outs = engine.generate(reqs)
    assert sum(prefilled) == prompt_len + 3  # one prefill per distinct prompt, not per sample
    for a, b in zip(outs, _alone(model, reqs, **cfg), strict=True):
        _same(a, b)
        assert a.trace.expert_ids.shape[0] == len(a.prompt_ids) + len(a.output_ids) - 1  # whole prompt, every sample
    assert len({tuple(o.output_ids) for o in outs[:4]}) > 1  # distinct seeds: the samples did diverge
    engine.table.check()
    assert engine.table.num_free == engine.table.num_blocks - 1


def test_a_group_holds_its_prompt_blocks_once(model):
    prompt = list(range(1, 22))  # 21 tokens: 2 full blocks of 8 and a partial one
    engine = RolloutEngine(model, max_slots=8, max_seq_len=64, block_size=8)
    for r in _group(prompt, 4):
        engine.add_request(r)
    free0 = engine.table.num_free
    engine.step()  # admit + prefill + one decode (position 21 is in the partial block: no new block)
    assert free0 - engine.table.num_free == 3 + 3  # the owner's 3 blocks + one private partial block per other sample
    distinct = RolloutEngine(model, max_slots=8, max_seq_len=64, block_size=8)  # control: no sharing
    for i, r in enumerate(_group(prompt, 4)):
        r.input_ids[0] = 100 + i
        distinct.add_request(r)
    distinct.step()
    assert free0 - distinct.table.num_free == 4 * 3


# --- bounded memory and preemption -----------------------------------------------------------------------------------
def test_memory_is_the_configured_pool_not_slots_times_context(model):
    small = RolloutEngine(model, max_slots=32, max_seq_len=256, kv_cache_tokens=512, block_size=16)
    full = RolloutEngine(model, max_slots=32, max_seq_len=256, block_size=16)
    assert small.table.capacity_tokens == 512 and full.table.capacity_tokens == 32 * 256
    assert small.kv.nbytes * 513 == full.kv.nbytes * 33  # 1 + 32 blocks vs 1 + 512 (the null block)
    assert small.routes.nbytes < full.routes.nbytes / 15


def test_a_full_cache_preempts_and_recomputes_with_the_same_tokens(family_model):
    model = family_model
    cfg = dict(max_slots=6, max_seq_len=96, block_size=8)
    reqs = [EngineRequest(request_id=f"p{i}", input_ids=[(3 * i + j) % 150 + 1 for j in range(10 + 3 * i)],
                          sampling=SamplingParams(max_new_tokens=60, seed=i, temperature=1.0)) for i in range(6)]
    engine = RolloutEngine(model, kv_cache_tokens=200, **cfg)  # 25 blocks; six requests want ~6 x 9
    outs = engine.generate(reqs)
    assert engine.num_preemptions > 0
    for a, b in zip(outs, _alone(model, reqs, **cfg), strict=True):
        _same(a, b)
    engine.table.check()
    assert engine.table.num_free == engine.table.num_blocks - 1


def test_abort_frees_the_blocks_of_running_and_preempted_requests(model):
    engine = RolloutEngine(model, max_slots=4, max_seq_len=64, block_size=8, kv_cache_tokens=64)
    for r in _group(list(range(1, 30)), 3, max_new=30):
        engine.add_request(r)
    for _ in range(5):
        engine.step()
    assert engine.table.num_free < engine.table.num_blocks - 1
    engine.abort(["g0", "g1", "g2"])
    engine.table.check()
    assert engine.table.num_free == engine.table.num_blocks - 1 and not engine.has_work()


# --- GPU (pytest -m gpu on a CUDA machine) ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_with_shared_prompts_and_preemption_in_bf16():
    model = make_model("tiny-qwen3-moe", seed=3, device="cuda", dtype=torch.bfloat16)
    greedy = [EngineRequest(request_id=f"g{i}", input_ids=list(range(1, 22)),
                            sampling=SamplingParams(max_new_tokens=60, temperature=0.0)) for i in range(4)]
    # greedy samples of one shared prompt read the same prompt blocks (each its own copy of the partial block), so
    # they decode the same tokens; a stale or missing partial block would make them diverge
    roomy = RolloutEngine(model, max_slots=16, max_seq_len=96, block_size=8)
    outs = roomy.generate(greedy)
    assert roomy._graphs and len({tuple(o.output_ids) for o in outs}) == 1 and len(outs[0].output_ids) == 60
    # a pool too small for every request at once: preemption under CUDA graphs, everything completes
    engine = RolloutEngine(model, max_slots=16, max_seq_len=96, block_size=8, kv_cache_tokens=320)
    sampled = _group(list(range(30, 43)), 8, tag="s", max_new=60)
    outs = engine.generate(greedy + sampled)
    assert engine.num_preemptions > 0  # 12 x ~80 tokens do not fit 320
    for o in outs:
        assert len(o.output_ids) == 60 and o.trace.expert_ids.shape[0] == len(o.prompt_ids) + 59
    engine.table.check()
    assert engine.table.num_free == engine.table.num_blocks - 1


def test_admission_keeps_a_block_of_headroom_so_it_does_not_force_a_preemption(model, monkeypatch):
    """Two 16-token prompts (two whole blocks each) that both grow at their first decode, in a pool of 4 blocks: the
    second must wait for the first rather than be admitted, prefilled, and preempted at once (a wasted prefill)."""

    def run(headroom: bool):
        engine = RolloutEngine(model, max_slots=4, max_seq_len=32, block_size=8, kv_cache_tokens=32)
        if not headroom:  # negative control: admission without the reserve
            monkeypatch.setattr(engine, "_grows", lambda req, held: 0)
        prefilled = _count_prefill_tokens(engine)
        reqs = [EngineRequest(request_id=f"a{i}", input_ids=list(range(1 + i, 17 + i)),
                              sampling=SamplingParams(max_new_tokens=8, seed=i, temperature=1.0)) for i in range(2)]
        outs = engine.generate(reqs)
        return engine, sum(prefilled), outs

    engine, tokens, outs = run(headroom=True)
    assert engine.num_preemptions == 0 and tokens == 32
    control, control_tokens, control_outs = run(headroom=False)
    assert control.num_preemptions >= 1 and control_tokens > 32
    for a, b in zip(outs, control_outs, strict=True):  # the same tokens either way (seeded recompute)
        _same(a, b)
