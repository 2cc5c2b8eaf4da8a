"""Episodes (multi-turn rollouts): every route aligned across turns, in-process and through a real `r3rl serve`.

    pytest tests/rollout/net/test_episodes.py -q

One test per multi-turn failure class of the field (FIELD_NOTES, class 3), each injecting the fault:
  - a later turn overwriting an earlier one's routes (weights change between turns: the re-prefill differs);
  - `routed_experts_start_len` ignored (the server sends every row: over-counted);
  - a boundary token left without its route (rows asked from one too late);
  - a chat template re-rendered between turns (the prefix shifts);
  - an episode served by two weight versions.
Real tiny model, real engine, real HTTP server on 127.0.0.1 (conftest.py).
"""

from __future__ import annotations

import copy
import random

import httpx
import numpy as np
import pytest
import torch

from r3rl.check import ReplayCheck
from r3rl.episodes import EnvStep, EpisodeError, EpisodeTrace, PrefixError, check_prefix, load_env_factory, run_episodes
from r3rl.models import load_model
from r3rl.models.presets import make_tokenizer
from r3rl.replay import RoutingReplay
from r3rl.rollout import EngineBackend, EngineRequest, HTTPBackend, SamplingParams
from r3rl.rollout.engine.messages import ProtocolError
from r3rl.rollout.net.client import ModelShape, RolloutServerError, decode_generate_output
from r3rl.tasks import get_task
from r3rl.train.config import StalePolicy
from r3rl.train.data import Layout, make_micro_batches
from r3rl.train.step import _check_samples

TOK = make_tokenizer()
EOS = TOK.eos_token_id
SAMPLING = SamplingParams(max_new_tokens=3, stop_token_ids=[EOS], seed=11)


class Recorder:
    """A real backend that also keeps every turn's samples (what each `generate` returned)."""

    def __init__(self, backend) -> None:
        self.backend, self.turns = backend, []

    def generate(self, prompts, sampling, **kw):
        out = self.backend.generate(prompts, sampling, **kw)
        self.turns.append(out)
        return out

    def __getattr__(self, name):
        return getattr(self.backend, name)


def guess_envs(n: int, seed: int = 0):
    task = get_task("guess")
    return [task.make_env(it, TOK) for it in task.sample_prompts(n, random.Random(seed))]


def perturbed(model, scale: float = 0.5):
    other = copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu", dtype=torch.float32)


@pytest.fixture
def backend(model):
    b = EngineBackend(model, max_slots=8, max_seq_len=128)
    yield b
    b.close()


# --- routed_experts_start_len -----------------------------------------------------------------------------------------
def test_engine_returns_only_rows_from_start_len(backend):
    prompt = [5, 6, 7, 8, 9]
    [full] = backend.generate([prompt], SamplingParams(max_new_tokens=4, seed=3))
    [part] = backend.generate([prompt], SamplingParams(max_new_tokens=4, seed=3), routed_experts_start_len=[3])
    assert part.response_ids == full.response_ids and part.routed_experts_start_len == 3
    assert part.trace.num_rows == full.num_tokens - 1 - 3
    np.testing.assert_array_equal(part.trace.expert_ids, full.trace.expert_ids[3:])
    with pytest.raises(ProtocolError,
                       match=r"routed_experts_start_len must be an integer in \[0, len\(input_ids\)=5\]"):
        backend.engine.generate([EngineRequest(request_id="x", input_ids=prompt, routed_experts_start_len=6)])


def test_server_returns_only_rows_from_start_len(server, tiny_model_dir):
    http = HTTPBackend(server.url)
    try:
        prompts = [[5, 6, 7, 8, 9], [1, 2, 3]]
        full = http.generate(prompts, SamplingParams(max_new_tokens=4, seed=3))
        part = http.generate(prompts, SamplingParams(max_new_tokens=4, seed=3), routed_experts_start_len=[4, 1])
        for f, p, start in zip(full, part, (4, 1), strict=True):
            assert p.routed_experts_start_len == start and p.trace.num_rows == f.num_tokens - 1 - start
            np.testing.assert_array_equal(p.trace.expert_ids, f.trace.expert_ids[start:])
        bad = httpx.post(f"{server.url}/generate", json={"input_ids": [[1, 2], [3]], "return_routed_experts": True,
                                                          "routed_experts_start_len": [0, 2]}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "routed_experts_start_len[1]"
        one = httpx.post(f"{server.url}/generate", json={"input_ids": [1, 2, 3], "return_routed_experts": True,
                                                          "routed_experts_start_len": 2,
                                                          "sampling_params": {"max_new_tokens": 2}}, timeout=60)
        assert one.status_code == 200 and one.json()["meta_info"]["routed_experts_start_len"] == 2
    finally:
        http.close()


def test_start_len_ignored_is_refused(server):
    """Fault: a server that ignores routed_experts_start_len sends every row; the client must not over-count."""
    body = {"input_ids": [5, 6, 7, 8], "return_routed_experts": True, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 3, "seed": 1}}
    answer = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()  # all rows, as if start were ignored
    shape = ModelShape(num_layers=4, top_k=4, num_experts=16)
    ok = decode_generate_output(answer, [5, 6, 7, 8], shape=shape)
    assert ok.trace.num_rows == 6
    with pytest.raises(RolloutServerError,
                       match=r"routed_experts has 6 rows, expected 3 for routed_experts_start_len=3 "
                             r".*ignored routed_experts_start_len"):
        decode_generate_output(answer, [5, 6, 7, 8], shape=shape, routed_experts_start_len=3)
    # the episode's assembly refuses an over-counted blob too (a backend that sliced nothing)
    ep = EpisodeTrace([5, 6])
    ep.add_turn(_turn([5, 6], ok.response_ids[:2], ok.trace.truncate(4), start=0))
    ep.tokens += [9]
    with pytest.raises(EpisodeError, match=r"routes start at row 0, expected 3"):
        ep.add_turn(_turn(ep.tokens, [1], ok.trace.truncate(6), start=0))
    over = _turn(ep.tokens, [1], ok.trace.truncate(6), start=3)
    over.routed_experts_start_len = 3  # claims the start, but carries every row
    with pytest.raises(EpisodeError, match=r"have 5 rows, expected 2 .*\+3 rows"):
        ep.add_turn(over)


def _turn(prompt, response, trace, *, start):
    from r3rl.sample import Sample

    return Sample(prompt_ids=list(prompt), response_ids=list(response), rollout_logprobs=[0.0] * len(response),
                  trace=trace, routed_experts_start_len=start)


# --- the episode's trace --------------------------------------------------------------------------------------------
def test_episode_trace_covers_every_token_each_turn_from_its_own_forward(backend):
    rec = Recorder(backend)
    samples = run_episodes(rec, guess_envs(4), SAMPLING, max_turns=4)
    assert any(s.metadata["turns"] > 1 for s in samples)
    for s in samples:
        assert s.trace.num_rows == s.num_tokens - 1 and not s.trace.pad_mask().any()
        spans = s.metadata["turn_spans"]
        assert sum(s.loss_mask) == sum(e - b for b, e in spans)  # model tokens only
        row = 0
        for t, (b, e) in enumerate(spans):  # turn t's rows are exactly what turn t's request returned
            out = next(o for o in rec.turns[t] if o.prompt_ids == s.tokens[:b] and o.response_ids == s.tokens[b:e])
            assert out.routed_experts_start_len == row
            np.testing.assert_array_equal(s.trace.expert_ids[row : e - 1], out.trace.expert_ids)
            row = e - 1


def test_later_turn_does_not_overwrite_earlier_turns(model):
    """Fault: assemble from the last turn's full re-prefill. After a weight change between turns it differs from
    what the first turn's forward used; the episode keeps turn 0's own rows."""
    backend = EngineBackend(model, max_slots=8, max_seq_len=128)
    rec = Recorder(backend)
    new = perturbed(model)
    samples = run_episodes(rec, guess_envs(4, seed=1), SAMPLING, max_turns=3, mixed_versions="keep",
                           between_turns=lambda t: backend.update_weights(new, version=t + 1) if t == 0 else None)
    multi = [s for s in samples if s.metadata["turns"] > 1]
    assert multi, "no episode reached a second turn"
    for s in multi:
        b0, e0 = s.metadata["turn_spans"][0]
        first = rec.turns[0][s.metadata["episode_index"]]  # every episode runs turn 0, in order
        assert first.response_ids == s.tokens[b0:e0]
        np.testing.assert_array_equal(s.trace.expert_ids[: e0 - 1], first.trace.expert_ids)
        [later] = backend.generate([s.tokens[: s.metadata["turn_spans"][1][0]]], SamplingParams(max_new_tokens=1))
        overwritten = later.trace.expert_ids[: e0 - 1]  # what a later turn's full answer holds for those rows
        assert not np.array_equal(overwritten, first.trace.expert_ids), "the fault would go unnoticed"
    backend.close()


def test_boundary_token_gets_the_route_of_the_prefill_that_read_it(backend):
    """Fault: asking a later turn for rows from one past the held rows leaves the boundary token (the previous
    response's last token, read first by the next turn's prefill) without a route."""
    samples = run_episodes(backend, guess_envs(4, seed=2), SAMPLING, max_turns=3)
    s = next(s for s in samples if s.metadata["turns"] > 1)
    (b0, e0), (b1, _) = s.metadata["turn_spans"][:2]
    [again] = backend.generate([s.tokens[:b1]], SamplingParams(max_new_tokens=1, seed=0))
    np.testing.assert_array_equal(s.trace.expert_ids[e0 - 1], again.trace.expert_ids[e0 - 1])
    assert not s.trace.pad_mask()[e0 - 1].any()
    ep = EpisodeTrace(s.prompt_ids)
    ep.add_turn(_turn(s.prompt_ids, s.tokens[b0:e0], s.trace.truncate(e0), start=0))
    ep.tokens += s.tokens[e0:b1]
    [late] = backend.generate([ep.tokens], SamplingParams(max_new_tokens=1, seed=0), routed_experts_start_len=[e0])
    with pytest.raises(EpisodeError, match=rf"start at row {e0}, expected {e0 - 1} .*boundary token without a route"):
        ep.add_turn(late)


def test_rerendered_chat_template_prefix_is_refused(backend):
    """Fault: the environment re-renders the conversation with a chat template that renders the generation prompt
    (an empty think block, as Qwen3's does) differently from a finished assistant turn: the prefix shifts."""
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}[{{ m.role }}]{% if m.role == 'assistant' %}"
                         "{{ m.content }}{% else %}{{ m.content }}{% endif %}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]<think></think>{% endif %}")

    class ChatEnv:
        def __init__(self) -> None:
            self.messages = [{"role": "user", "content": "hi"}]

        def reset(self):
            return _ids(tok.apply_chat_template(self.messages, tokenize=True, add_generation_prompt=True))

        def step(self, response_ids):
            self.messages += [{"role": "assistant", "content": tok.decode(response_ids, skip_special_tokens=True)},
                              {"role": "user", "content": "again"}]
            return EnvStep(context_ids=_ids(tok.apply_chat_template(self.messages, tokenize=True,
                                                                    add_generation_prompt=True)))

    env = ChatEnv()
    context = env.reset()
    [turn] = backend.generate([context], SAMPLING)
    rendered = env.step(turn.response_ids).context_ids
    held = context + turn.response_ids
    assert rendered[: len(held)] != held  # slicing by the previous length would shift every later route
    first = next(i for i, (a, b) in enumerate(zip(held, rendered, strict=False)) if a != b)
    assert first <= len(context)  # at the generation prompt's think block, or where the response was decoded
    with pytest.raises(PrefixError, match=r"first difference at token \d+ of"):
        run_episodes(backend, [ChatEnv()], SAMPLING, max_turns=2)
    assert check_prefix([1, 2], [1, 2, 3, 4]) == [3, 4]  # an append-only rendering passes, adding only its tail


def _ids(x):
    return list(x["input_ids"]) if hasattr(x, "keys") else list(x)


def test_episode_served_by_two_weight_versions_is_refused_or_flagged(model):
    backend = EngineBackend(model, max_slots=8, max_seq_len=128)
    new = perturbed(model, 0.05)

    def update(t):
        if t == 0:
            backend.update_weights(new, version=1)

    with pytest.raises(EpisodeError, match=r"served by weight versions \[\(0, 0\), \(1, 1\)"):
        run_episodes(backend, guess_envs(4, seed=1), SAMPLING, max_turns=2, between_turns=update)
    backend.update_weights(model, version=0)
    kept = run_episodes(backend, guess_envs(4, seed=1), SAMPLING, max_turns=2, mixed_versions="drop",
                        between_turns=update)
    mixed = [s.metadata["mixed_weight_versions"] for s in kept]
    assert any(mixed) and all(m == (s.metadata["turns"] > 1) for m, s in zip(mixed, kept, strict=True))
    # the trainer's stale policy sees them: drop marks them stale, error refuses the step
    assert _check_samples(kept, 1, 0, 1.0, max_staleness=5, policy=StalePolicy.DROP) == mixed
    with pytest.raises(RuntimeError, match="generated with weight version 0..1"):
        _check_samples(kept, 1, 0, 1.0, max_staleness=5, policy=StalePolicy.ERROR)
    backend.close()


# --- HTTP, training ---------------------------------------------------------------------------------------------------
def test_episodes_over_http_match_the_engine(server, backend):
    """The same episodes through `r3rl serve` (later turns ask only for new rows) and in-process: identical."""
    http = HTTPBackend(server.url)
    try:
        remote = run_episodes(http, guess_envs(3, seed=4), SAMPLING, max_turns=4)
    finally:
        http.close()
    local = run_episodes(backend, guess_envs(3, seed=4), SAMPLING, max_turns=4)
    assert any(s.metadata["turns"] > 1 for s in remote)
    for r, loc in zip(remote, local, strict=True):
        assert r.tokens == loc.tokens and r.loss_mask == loc.loss_mask and r.reward == loc.reward
        np.testing.assert_array_equal(r.trace.expert_ids, loc.trace.expert_ids)


def test_episode_sample_trains_model_tokens_and_replays_every_token(model, backend):
    samples = run_episodes(backend, guess_envs(4, seed=5), SAMPLING, max_turns=4)
    train = copy.deepcopy(model)
    replay = RoutingReplay(train)
    replay.check = check = ReplayCheck(replay.num_layers, replay.top_k, threshold=1e-2)
    try:
        for layout in (Layout.PACKED, Layout.PADDED):
            [mb] = make_micro_batches(samples, advantages=[1.0] * len(samples), layout=layout, micro_batch_size=8)
            assert mb.num_response_tokens == sum(sum(s.loss_mask) for s in samples)
            observations = [t for s in samples for t, m in zip(s.response_ids, s.loss_mask, strict=True) if not m]
            assert observations and mb.target_ids_T.tolist() == [t for s in samples for t, m in
                                                                 zip(s.response_ids, s.loss_mask, strict=True) if m]
            with torch.no_grad(), replay.replay(mb.replay):
                train(**mb.model_inputs())
        summary = check.summary()
        assert summary.passed and summary.zero_overlap == 0
        assert summary.tokens_checked >= 2 * sum(s.num_tokens - 1 for s in samples)
    finally:
        replay.close()


def test_load_env_factory(tmp_path):
    f = tmp_path / "envs.py"
    f.write_text("class E:\n    def __init__(self, item, tokenizer):\n        self.item = item\n")
    assert load_env_factory(f"{f}:E").__name__ == "E"
    assert load_env_factory("r3rl.tasks.guess:GuessEnv").__name__ == "GuessEnv"
    for spec, msg in ((f"{f}:Missing", "has no attribute 'Missing'"), ("nope", "expected 'module:Class'"),
                      (f"{tmp_path}/x.py:E", "not found")):
        with pytest.raises(ValueError, match=msg):
            load_env_factory(spec)
