"""`--task guess`: the environment's replies and rewards, the warm-up transcripts, and `r3rl train` running it as
episodes with R3 verified over whole episodes.

    pytest tests/tasks/test_guess.py -q
"""

from __future__ import annotations

import json
import random

import pytest

from r3rl.models.presets import make_tokenizer
from r3rl.tasks import get_task
from r3rl.tasks.base import PromptItem

TOK = make_tokenizer()
EOS = TOK.eos_token_id


def ids(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


def test_env_replies_and_rewards_fewer_turns_more():
    task = get_task("guess")
    env = task.make_env(PromptItem(prompt="guess:", label="5"), TOK)
    assert env.reset() == ids("guess:")
    low = env.step(ids("3") + [EOS])
    assert (low.observation_ids, low.done, low.reward) == (ids(">"), False, 0.0)
    high = env.step(ids("7") + [EOS])
    assert (high.observation_ids, high.done) == (ids("<"), False)
    bad = env.step(ids("x") + [EOS])
    assert (bad.observation_ids, bad.done) == (ids("?"), False)
    found = env.step(ids("5") + [EOS])
    assert found.done and found.reward == pytest.approx(1 - 3 / 4)
    first = task.make_env(PromptItem(prompt="guess:", label="2"), TOK)
    first.reset()
    assert first.step(ids("2")).reward == 1.0
    lost = task.make_env(PromptItem(prompt="guess:", label="0"), TOK)
    lost.reset()
    steps = [lost.step(ids("1") + [EOS]) for _ in range(4)]
    assert [s.done for s in steps] == [False, False, False, True] and sum(s.reward for s in steps) == 0.0


def test_warmup_transcripts_follow_the_rules():
    task = get_task("guess")
    for item in task.sample_prompts(50, random.Random(0)):
        turns = task.sft_target(item).split("<eos>")
        assert 1 <= len(turns) <= task.max_turns
        lo, hi, secret, prev = 0, task.size - 1, int(item.label), None
        for k, turn in enumerate(turns):
            guess = int(turn[-1])  # "3" first, then reply + guess: ">5"
            if k:
                assert turn[0] == (">" if secret > prev else "<")
            assert lo <= guess <= hi
            lo, hi = (guess + 1, hi) if secret > guess else (lo, guess - 1)
            prev = guess
        assert int(turns[-1][-1]) == secret or len(turns) == task.max_turns
    with pytest.raises(ValueError, match="size must be an int in"):
        get_task("guess", size=11)


def test_train_guess_runs_episodes_with_r3_verified(tmp_path, caplog):
    from r3rl.config import ReplayConfig
    from r3rl.train.config import TrainConfig
    from r3rl.train.trainer import Trainer

    cfg = TrainConfig(task="guess", replay=ReplayConfig(use_rollout_routing_replay=True,
                                                        enable_r3_correctness_check=True),
                      num_rollout=2, rollout_batch_size=2, n_samples_per_prompt=4, rollout_max_response_len=3,
                      sft_steps=2, sft_batch_size=8, eval_interval=1, eval_prompts=4, run_dir=str(tmp_path),
                      progress=False)
    with caplog.at_level("INFO"):
        summary = Trainer(cfg).run()
    assert summary["verdict"] == "pass"
    assert summary["tokens_checked"]["replay_forward"] > 0 and summary["tokens_checked"]["replay_backward"] > 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0.0 <= r["reward_mean"] <= 1.0 for r in rows)
    # the greedy evaluation plays whole episodes (a single-turn evaluation scores the first guess, with no turns)
    assert all(1.0 <= r["eval_turns_mean"] <= 4.0 and 0.0 <= r["eval_reward"] <= 1.0 for r in rows)
    assert all(1.0 <= r["turns_mean"] <= 4.0 for r in rows)
    assert any("R3 check (rank 0, stage replay_backward)" in m for m in caplog.messages)


def test_a_guess_is_exactly_one_digit():
    """A response that does not end after its digit is no guess ("?"): with the first character read as the guess,
    EOS did not matter to the reward and RL stopped ending turns (negative control: the lenient parse answers ">")."""
    from r3rl.tasks.guess import parse_guess

    task = get_task("guess")
    env = task.make_env(PromptItem(prompt="guess:", label="5"), TOK)
    env.reset()
    for text in ("36", "3>5", "3<eos>9", "", "x"):
        step = env.step(ids(text) + [EOS])
        assert step.observation_ids == ids("?"), text
    assert [parse_guess(t) for t in ("3", " 3\n", "3<eos>", "36", "3>")] == [3, 3, 3, None, None]
    assert task.reward("5<eos>", "5") == 1.0 and task.reward("55", "5") == 0.0


def test_warmup_trains_on_the_model_turns_only():
    """The warm-up target is an episode: each guess + EOS is trained on, the environment's replies are context only
    (mask 0), as in RL. Single-turn tasks keep the whole target + EOS."""
    from r3rl.tasks import make_prompt_source
    from r3rl.train.warmup import sft_target_ids as _sft_target_ids

    source = make_prompt_source(task="guess", seed=3)
    items = source.next_batch(20)
    for it in items:
        target, mask = _sft_target_ids(source, it, TOK, [EOS])
        assert TOK.decode(target) == source.sft_target(it) + "<eos>"
        trained = [t for t, m in zip(target, mask, strict=True) if m]
        context = [t for t, m in zip(target, mask, strict=True) if not m]
        assert all(chr(t) in "0123456789" or t == EOS for t in trained)
        assert all(chr(t) in "<>" for t in context)
        assert sum(t == EOS for t in trained) == len(source.task.sft_turns(it))
    assert any(0 in _sft_target_ids(source, it, TOK, [EOS])[1] for it in items)  # some episodes have replies
    reverse = make_prompt_source(task="reverse", seed=3)
    it = reverse.next_batch(1)[0]
    assert _sft_target_ids(reverse, it, TOK, [EOS]) == (ids(it.label) + [EOS], None)


def test_cli_task_defaults_apply_only_to_unset_flags():
    from r3rl.cli import build_parser, train_config_from_args

    def cfg(*argv):
        return train_config_from_args(build_parser().parse_args(["train", *argv]))

    guess, reverse = cfg("--task", "guess"), cfg()
    assert (guess.rollout_max_response_len, guess.sft_steps, guess.sft_stop_loss) == (2, 200, 0.0)
    assert (reverse.rollout_max_response_len, reverse.sft_steps, reverse.sft_stop_loss, reverse.lr) == (12, 100, 0.0,
                                                                                                      3e-4)
    mine = cfg("--task", "guess", "--rollout-max-response-len", "5", "--sft-steps", "3", "--lr", "1e-4")
    assert (mine.rollout_max_response_len, mine.sft_steps, mine.lr) == (5, 3, 1e-4)
    from r3rl.cli import TRAIN_FLAG_DEFAULTS
    from r3rl.train.config import TrainConfig

    fields = TrainConfig.__dataclass_fields__  # the CLI's fallbacks are the config's own defaults
    assert {k: fields[k].default for k in TRAIN_FLAG_DEFAULTS} == TRAIN_FLAG_DEFAULTS
