"""Built-in reward functions, the `--custom-rm-path` loader, and the reward contract.

    exact_match(response, label)          1.0 if the cleaned response equals the label, else 0.0
    position_match(response, label)       partial credit: fraction of positions equal (0 for an empty response)
    math_answer_reward(response, label)   1.0 if the final answer (last \\boxed{...}, else the last number) equals
                                          the label's, numerically when both parse as numbers
    load_reward_fn("module:function")     a custom reward f(response, item) -> float; "path/to/file.py:function" too

Responses are cleaned first (`clean_response`, see tasks/base.py): cut at the first "<eos>" and, except for the math
reward (answers span lines), at the first newline, then stripped.

The reward contract (`--custom-rm-path module:function` or `path/to/file.py:function`):

    def reward(response: str, item: PromptItem) -> float

  - `response` is the decoded completion (special tokens skipped), exactly as sampled: not cleaned, so cut it at
    the first newline yourself if your answers are one line (`r3rl.tasks.clean_response` does what the built-ins do).
  - `item` is a frozen dataclass `r3rl.tasks.PromptItem`, not a dict: `item.prompt` (str, the prompt text),
    `item.label` (str, the `--label-key` field), `item.metadata` (dict: "source" = "FILE:LINE" or "task:NAME", and
    "fields" = the row's other keys). A verl/OpenRLHF habit, `item["label"]`, is a TypeError.
  - The return value is a real number (int or float, not bool) in [0, 1]; 1.0 means solved (the `solved_frac` and
    `eval_solved_frac` metrics count rewards >= 1). Anything else (None, a bool, a string, NaN, inf, 1.5, -1) is an
    error that names the prompt, never a score: a mistaken return value cannot pass for a reward.
  - It runs in a separate worker process (spawned, so it cannot touch the trainer's state), one call at a time,
    each call bounded by `--reward-timeout` seconds (default 60). A call that raises, calls sys.exit(), raises
    KeyboardInterrupt, kills its process or runs past the timeout fails the run (exit 1) with the prompt named; the
    hung worker is killed. Module-level code runs once, in the worker, at start.
  - `r3rl train` calls it once at start, on the first prompt with its label as the response, before the warm-up
    and any rollout: a contract mistake stops the run there (exit 2, one line).

Example (a task "upper:abc=" -> "ABC", partial credit per character):

    def upper_reward(response, item):
        got, want = response.split("\\n", 1)[0].strip(), item.label
        if not got:
            return 0.0
        return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want))

    r3rl train --prompt-data upper.jsonl --custom-rm-path upper_rm.py:upper_reward
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from r3rl.tasks.base import PromptItem, clean_response

__all__ = ["exact_match", "position_match", "math_answer_reward", "extract_math_answer", "BUILTIN_REWARDS",
           "get_reward", "load_reward_fn", "RewardError", "REWARD_RANGE", "reward_value_problem", "describe_item",
           "probe_reward"]

RewardFn = Callable[[str, PromptItem], float]

REWARD_RANGE = (0.0, 1.0)
"""Allowed reward values, both ends included; 1.0 means solved."""


class RewardError(RuntimeError):
    """A reward plug-in failed during the run (raised, exited, hung, died, or returned a value outside the contract):
    the run fails (exit 1). The message names the plug-in and the prompt."""


def exact_match(response: str, label: str) -> float:
    return 1.0 if clean_response(response) == label.strip() else 0.0


def position_match(response: str, label: str) -> float:
    """Fraction of positions where the cleaned response and the label agree, over the longer of the two lengths
    (so extra or missing characters cost credit); 0.0 for an empty response, 1.0 exactly on an exact match."""
    got, want = clean_response(response), label.strip()
    if not got:
        return 0.0
    if got == want:
        return 1.0
    same = sum(a == b for a, b in zip(got, want, strict=False))
    return same / max(len(got), len(want))


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def extract_math_answer(text: str) -> str | None:
    """The content of the last \\boxed{...} (nested braces allowed), else the last number in `text`, else None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1 : j].strip()
        start = text.rfind("\\boxed{", 0, start)  # unclosed: try an earlier one
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def math_answer_reward(response: str, label: str) -> float:
    """1.0 when the response's final answer equals the label's final answer (the label itself when it holds no
    box and no number); numbers compare by value (`1,000` == `1000.0`, `1/2` == `0.5`), other answers as text with
    spaces and `$` removed."""
    got = extract_math_answer(clean_response(response, stop_at_newline=False))
    if got is None:
        return 0.0
    want = extract_math_answer(label)
    want = label.strip() if want is None else want
    a, b = _as_number(got), _as_number(want)
    if a is not None and b is not None:
        return 1.0 if a == b else 0.0
    return 1.0 if _normalize(got) == _normalize(want) else 0.0


BUILTIN_REWARDS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "position_match": position_match,
    "math": math_answer_reward,
}
"""Built-in rewards by name (`--reward-fn`), each called as f(response, label) -> float in [0, 1]."""


def get_reward(name: str) -> Callable[[str, str], float]:
    if name not in BUILTIN_REWARDS:
        raise ValueError(f"unknown reward function '{name}': choose one of {sorted(BUILTIN_REWARDS)} "
                         "(or give --custom-rm-path module:function)")
    return BUILTIN_REWARDS[name]


def load_reward_fn(spec: str) -> RewardFn:
    """Load `module:function` (an importable module) or `path/to/file.py:function`; the function is called as
    f(response_text, prompt_item) and must return a finite number. Errors name the spec and what failed."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise ValueError(f"--custom-rm-path {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        module = _load_file(spec, Path(module_part))
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as e:
            if e.name and (module_part == e.name or module_part.startswith(e.name + ".")):
                raise ValueError(f"--custom-rm-path {spec!r}: module '{module_part}' not found") from e
            raise ValueError(f"--custom-rm-path {spec!r}: importing '{module_part}' failed: {e}") from e
        except Exception as e:
            raise ValueError(f"--custom-rm-path {spec!r}: importing '{module_part}' failed: "
                             f"{type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        raise ValueError(f"--custom-rm-path {spec!r}: module '{module_part}' has no attribute '{attr}'")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"--custom-rm-path {spec!r}: '{attr}' is a {type(fn).__name__}, not callable")
    try:
        inspect.signature(fn).bind("response", PromptItem(prompt="", label=""))
    except TypeError as e:
        raise ValueError(f"--custom-rm-path {spec!r}: '{attr}' must accept (response: str, item: PromptItem): "
                         f"{e}") from e
    except ValueError:  # no signature (some builtins): checked at call time
        pass
    return _CheckedReward(fn, spec)


def reward_value_problem(value) -> str | None:
    """None when `value` keeps the contract (a real number, not bool, finite, within REWARD_RANGE), else what is
    wrong with it."""
    lo, hi = REWARD_RANGE
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"returned {_short_repr(value)} ({type(value).__name__}): expected a real number in [{lo:g}, {hi:g}]"
    try:
        x = float(value)
    except Exception as e:  # a Real subclass whose __float__ fails
        return f"returned {_short_repr(value)}, which float() refuses ({type(e).__name__}: {e})"
    if not math.isfinite(x):
        return f"returned {x!r}: expected a finite number in [{lo:g}, {hi:g}]"
    if not lo <= x <= hi:
        return f"returned {x!r}, outside [{lo:g}, {hi:g}] (1.0 = solved; rescale the reward)"
    return None


def describe_item(item: PromptItem) -> str:
    """"prompt 'rev:abcd=' (file.jsonl:3)": how error messages name an item."""
    source = item.metadata.get("source", "?") if isinstance(item.metadata, dict) else "?"
    return f"prompt {_short_repr(item.prompt)} ({source})"


def probe_reward(source) -> None:
    """Call `source`'s reward once on its next prompt, with the prompt's label as the response, and leave the cursor
    where it was: a reward that breaks the contract (`item["label"]`, a None return, ...) fails here, before the
    warm-up and any rollout, as a one-line ValueError (`r3rl train` exits 2)."""
    state = source.state_dict()
    (item,) = source.next_batch(1)
    source.load_state_dict(state)
    try:
        source.rewards([item.label], [item])
    except RewardError as e:
        hint = (" (item is a frozen dataclass, not a dict: write item.label, not item['label'])"
                if "subscriptable" in str(e) else "")
        raise ValueError(f"the reward failed its start-up call on the first prompt (response = its label): {e}{hint}."
                         f" Contract: f(response: str, item) with item.prompt, item.label, item.metadata, returning "
                         f"a number in [{REWARD_RANGE[0]:g}, {REWARD_RANGE[1]:g}] (see r3rl/tasks/rewards.py)"
                         ) from None


class _CheckedReward:
    """Calls a custom reward in this process and checks its value against the contract (RewardError otherwise)."""

    def __init__(self, fn: Callable, spec: str) -> None:
        self.fn, self.spec = fn, spec

    def __call__(self, response: str, item: PromptItem) -> float:
        value = self.fn(response, item)
        problem = reward_value_problem(value)
        if problem is not None:
            raise RewardError(f"--custom-rm-path {self.spec!r} on {describe_item(item)}: {problem}")
        return float(value)


# --- private -----------------------------------------------------------------------------------------------------
def _load_file(spec: str, path: Path):
    if not path.is_file():
        raise ValueError(f"--custom-rm-path {spec!r}: file '{path}' not found")
    name = f"_r3rl_custom_rm_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"--custom-rm-path {spec!r}: '{path}' cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"--custom-rm-path {spec!r}: running '{path}' failed: {type(e).__name__}: {e}") from e
    return module


def _short_repr(value, limit: int = 80) -> str:
    try:
        text = repr(value)
    except Exception:  # a repr that raises is the plug-in's, not ours
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_number(text: str) -> Fraction | None:
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _normalize(text: str) -> str:
    return text.replace("$", "").replace(" ", "").strip()
