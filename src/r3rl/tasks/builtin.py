"""Built-in procedural tasks a ~0.5M-parameter MoE learns on CPU in minutes: short byte prompts (<= 12 bytes),
short labels (<= 8 bytes), a small alphabet and a partial-credit reward (`position_match`: fraction of positions
right, 0 for an empty response, 1 on an exact match; responses cut at the first "<eos>"/newline, see base.py).

    reverse   "rev:abcd="      -> "dcba"   (length=4, alphabet="abcdef")
    sort      "sort:dbca="     -> "abcd"   (length=4, alphabet="abcdef")
    add       "add:123+421="   -> "544"    (digits=3, max_digit=4: digit-wise (a_i + b_i) mod 10, and with digits
                                            0..4 no pair carries; carry=True: the ordinary sum, digits + 1 long)

    task = get_task("reverse", length=5)
    items = task.sample_prompts(8, random.Random(0))
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from r3rl.tasks.base import PromptItem, Task
from r3rl.tasks.guess import GuessTask
from r3rl.tasks.rewards import position_match

__all__ = ["ReverseTask", "SortTask", "AddTask", "BUILTIN_TASKS", "get_task"]

MAX_PROMPT_BYTES = 12
MAX_LABEL_BYTES = 8
_DIGITS = "0123456789"


class _PositionRewardTask:
    """Shared parts: partial-credit reward, the label as the supervised target, item bookkeeping."""

    name: str
    train_defaults: ClassVar[dict] = {"sft_stop_loss": 0.0, "sft_stop_exact": 0.4}
    """`r3rl train`'s warm-up for these tasks: until 40% of its targets are greedy-exact (r3rl.train.warmup), not a
    loss bound, which one seed of the embedded default met with an answer position still at chance."""

    def reward(self, response: str, label: str) -> float:
        return position_match(response, label)

    def sft_target(self, item: PromptItem) -> str:
        return item.label

    def _item(self, prompt: str, label: str) -> PromptItem:
        assert len(prompt.encode()) <= MAX_PROMPT_BYTES and len(label.encode()) <= MAX_LABEL_BYTES, (prompt, label)
        return PromptItem(prompt=prompt, label=label, metadata={"source": f"task:{self.name}"})


@dataclass(frozen=True, kw_only=True)
class ReverseTask(_PositionRewardTask):
    """Reverse a random string: "rev:abcd=" -> "dcba"."""

    length: int = 4
    """Characters per string (1..7: the prompt stays within 12 bytes)."""
    alphabet: str = "abcdef"
    """Characters drawn from (ASCII letters or digits)."""
    name: str = "reverse"

    def __post_init__(self) -> None:
        _check_size("reverse", "length", self.length, 1, MAX_PROMPT_BYTES - len("rev:="))
        _check_alphabet("reverse", self.alphabet)

    def sample_prompts(self, n: int, rng: random.Random) -> list[PromptItem]:
        out = []
        for _ in range(n):
            s = "".join(rng.choice(self.alphabet) for _ in range(self.length))
            out.append(self._item(f"rev:{s}=", s[::-1]))
        return out


@dataclass(frozen=True, kw_only=True)
class SortTask(_PositionRewardTask):
    """Sort a random string's characters: "sort:dbca=" -> "abcd"."""

    length: int = 4
    """Characters per string (1..6: the prompt stays within 12 bytes)."""
    alphabet: str = "abcdef"
    """Characters drawn from (ASCII letters or digits); sorted by code point."""
    name: str = "sort"

    def __post_init__(self) -> None:
        _check_size("sort", "length", self.length, 1, MAX_PROMPT_BYTES - len("sort:="))
        _check_alphabet("sort", self.alphabet)

    def sample_prompts(self, n: int, rng: random.Random) -> list[PromptItem]:
        out = []
        for _ in range(n):
            s = "".join(rng.choice(self.alphabet) for _ in range(self.length))
            out.append(self._item(f"sort:{s}=", "".join(sorted(s))))
        return out


@dataclass(frozen=True, kw_only=True)
class AddTask(_PositionRewardTask):
    """Digit-wise addition of two `digits`-digit numbers: label digit i is (a_i + b_i) mod 10, "add:123+421=" ->
    "544". By default operand digits are 0..4, so no digit pair carries and the label is also the ordinary sum.
    `carry=True`: the ordinary sum, zero-padded to digits + 1 ("add:123+459=" -> "0582").

    Why 0..4 by default: (a + b) mod 10 over all digits is uncorrelated with either digit alone, so a tiny model gets
    no gradient signal from one operand and plateaus at chance (measured: 800 SFT steps, 3 digits, reward 0.11);
    without the wrap-around each output digit grows with each input digit and it learns."""

    digits: int = 3
    """Digits per operand (1..3: the prompt stays within 12 bytes)."""
    max_digit: int = 4
    """Operand digits are drawn from 0..max_digit (1..9); <= 4 means no digit pair reaches 10."""
    carry: bool = False
    """False: label digit i is (a_i + b_i) mod 10; True: the ordinary sum with carries, digits + 1 long."""
    name: str = "add"

    def __post_init__(self) -> None:
        _check_size("add", "digits", self.digits, 1, (MAX_PROMPT_BYTES - len("add:+=")) // 2)
        _check_size("add", "max_digit", self.max_digit, 1, 9)

    def sample_prompts(self, n: int, rng: random.Random) -> list[PromptItem]:
        digits = _DIGITS[: self.max_digit + 1]
        out = []
        for _ in range(n):
            a = "".join(rng.choice(digits) for _ in range(self.digits))
            b = "".join(rng.choice(digits) for _ in range(self.digits))
            if self.carry:
                label = str(int(a) + int(b)).zfill(self.digits + 1)
            else:
                label = "".join(str((int(x) + int(y)) % 10) for x, y in zip(a, b, strict=True))
            out.append(self._item(f"add:{a}+{b}=", label))
        return out


BUILTIN_TASKS: dict[str, Callable[..., Task]] = {"reverse": ReverseTask, "sort": SortTask, "add": AddTask,
                                                  "guess": GuessTask}
"""Built-in tasks by name (`--task`); keyword arguments set the size (length/alphabet, digits/max_digit/carry).
`guess` is multi-turn: it has `make_env` (r3rl.episodes), and the trainer runs it as episodes."""


def get_task(name: str, **kwargs) -> Task:
    """The built-in task `name` built with `kwargs`; an unknown name or parameter is a ValueError."""
    if name not in BUILTIN_TASKS:
        raise ValueError(f"unknown task '{name}': choose one of {sorted(BUILTIN_TASKS)}")
    try:
        return BUILTIN_TASKS[name](**kwargs)
    except TypeError as e:  # unknown keyword
        raise ValueError(f"task '{name}': bad parameters {kwargs}: {e}") from e


# --- private -------------------------------------------------------------------------------------------------------
def _check_size(task: str, field: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"task '{task}': {field} must be an int in [{lo}, {hi}] (prompt <= {MAX_PROMPT_BYTES} "
                         f"bytes, label <= {MAX_LABEL_BYTES}): got {value!r}")


def _check_alphabet(task: str, alphabet: str) -> None:
    if len(alphabet) < 2 or len(set(alphabet)) != len(alphabet) or not (alphabet.isascii() and alphabet.isalnum()):
        raise ValueError(f"task '{task}': alphabet must be >= 2 distinct ASCII letters/digits: got {alphabet!r}")
