"""`--task guess`: a multi-turn task (an episode, r3rl.episodes). The environment picks a secret number in
[0, size); the model answers one digit; the environment replies ">" (the secret is higher), "<" (lower) or "?" (not
a digit in range), appended as token ids; the model guesses again, up to `max_turns` times.

    guess:3<eos>>6<eos><5<eos>          secret 5, found on the third turn: reward 1 - 2/4 = 0.5

A guess is a response that reads as exactly one digit (EOS and surrounding whitespace aside): "3<eos>". Anything
else ("36", "3>5", a response cut at the turn's token limit with more after the digit) is not a guess and gets "?".
That makes the turn's end part of the task: a lenient parse (the first character) makes EOS irrelevant to the
reward, and the policy gradient then drifts it away (turns with more EOS tokens lose more often, and Adam turns that
small, consistent push into full steps): measured, turns stopped ending at step ~13 and the reward fell.

Reward: 1 - (turn - 1) / max_turns when the secret is found on `turn` (1.0 on the first guess), 0 when it is not.
Expected reward (size 8, 4 turns, simulated): uniform random guesses 0.27; random guesses the replies allow 0.48;
bisection 0.60; a middle first guess (3 or 4) then random allowed guesses 0.55. The supervised warm-up teaches the
format and the rules: its targets are transcripts of random guesses among the numbers the replies allow, with the
true replies (`sft_turns`: the trainer trains on the guesses and their EOS, never on the replies, which are the
environment's tokens). Choosing well among them (bisection: fewer turns, more reward) is left to RL.

`GuessTask.train_defaults`: what `r3rl train --task guess` uses for the flags the user did not set (a turn is one
digit and EOS, so 2 tokens a turn; a longer warm-up, so that RL starts from a policy that keeps the rules).
The trainer's greedy evaluation plays whole episodes; `reward(response, label)` (the first guess only) is the
single-turn view.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from r3rl.episodes import EnvStep
from r3rl.tasks.base import EOS_TEXT, PromptItem, clean_response

__all__ = ["GuessTask", "GuessEnv"]

PROMPT = "guess:"


@dataclass(frozen=True, kw_only=True)
class GuessTask:
    """The task side: prompt items (the secret as label), the warm-up transcripts, and an environment per item."""

    size: int = 8
    """Secrets are drawn from 0..size-1 (2..10: one digit)."""
    max_turns: int = 4
    """Guesses per episode (the reward shrinks by 1/max_turns per extra guess)."""
    name: str = "guess"
    train_defaults: ClassVar[dict] = {"rollout_max_response_len": 2, "sft_steps": 200, "sft_stop_loss": 0.0}
    """`r3rl train --task guess`: the values of the flags the user did not set (r3rl.cli); a turn is one digit and
    EOS, and a longer warm-up keeps the rules before RL."""

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 2 <= self.size <= 10:
            raise ValueError(f"task 'guess': size must be an int in [2, 10] (one digit): got {self.size!r}")
        if isinstance(self.max_turns, bool) or not isinstance(self.max_turns, int) or not 1 <= self.max_turns <= 16:
            raise ValueError(f"task 'guess': max_turns must be an int in [1, 16]: got {self.max_turns!r}")

    def sample_prompts(self, n: int, rng: random.Random) -> list[PromptItem]:
        out = []
        for _ in range(n):
            secret = rng.randrange(self.size)
            out.append(PromptItem(prompt=PROMPT, label=str(secret),
                                  metadata={"source": f"task:{self.name}", "warmup_seed": rng.getrandbits(32)}))
        return out

    def reward(self, response: str, label: str) -> float:
        """The first guess alone (the single-turn view): 1 when it is the secret."""
        return float(parse_guess(response) == int(label))

    def sft_turns(self, item: PromptItem) -> list[tuple[str, str]]:
        """A transcript as (model response, environment reply) pairs, the last reply "": random guesses, each
        uniform over the numbers the replies so far allow, with the true replies: the format and the rules, not the
        strategy (bisection earns more; RL finds it). The trainer ends each response with EOS and trains on the
        responses only."""
        rng = random.Random(item.metadata.get("warmup_seed", 0))
        secret, turns, lo, hi = int(item.label), [], 0, self.size - 1
        for turn in range(self.max_turns):
            guess = rng.randint(lo, hi)  # any number the replies so far allow, uniformly: no bisection
            lo, hi = (guess + 1, hi) if secret > guess else (lo, guess - 1)
            last = guess == secret or turn + 1 == self.max_turns
            turns.append((str(guess), "" if last else reply(guess, secret, self.size)))
            if last:
                break
        return turns

    def sft_target(self, item: PromptItem) -> str:
        """`sft_turns` as one text ("3<eos>>6<eos><5"; the trainer appends the final EOS)."""
        return "".join(resp + (EOS_TEXT + obs if obs else "") for resp, obs in self.sft_turns(item))

    def make_env(self, item: PromptItem, tokenizer) -> GuessEnv:
        return GuessEnv(secret=int(item.label), tokenizer=tokenizer, size=self.size, max_turns=self.max_turns)


def parse_guess(text: str) -> int | None:
    """The guess a response makes: its text must read as exactly one digit ("3", "3<eos>", " 3\n"); else None."""
    text = clean_response(text)
    return int(text) if len(text) == 1 and text.isdigit() else None


def reply(guess: int | None, secret: int, size: int) -> str:
    if guess is None or not 0 <= guess < size:
        return "?"
    return ">" if secret > guess else "<"


class GuessEnv:
    """One episode of the guessing game (r3rl.episodes.Environment)."""

    def __init__(self, *, secret: int, tokenizer, size: int = 8, max_turns: int = 4) -> None:
        self.secret, self.tokenizer, self.size, self.max_turns = secret, tokenizer, size, max_turns
        self.turn = 0

    def reset(self) -> list[int]:
        self.turn = 0
        return self.tokenizer.encode(PROMPT, add_special_tokens=False)

    def step(self, response_ids: list[int]) -> EnvStep:
        self.turn += 1
        guess = parse_guess(self.tokenizer.decode(response_ids, skip_special_tokens=True))
        if guess == self.secret:
            return EnvStep(done=True, reward=1.0 - (self.turn - 1) / self.max_turns, info={"guess": guess})
        obs = self.tokenizer.encode(reply(guess, self.secret, self.size), add_special_tokens=False)
        return EnvStep(observation_ids=obs, done=self.turn >= self.max_turns, info={"guess": guess})
