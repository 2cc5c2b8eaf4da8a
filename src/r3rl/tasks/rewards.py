"""Built-in reward functions and the `--custom-rm-path` loader.

    exact_match(response, label)          1.0 if the cleaned response equals the label, else 0.0
    position_match(response, label)       partial credit: fraction of positions equal (0 for an empty response)
    math_answer_reward(response, label)   1.0 if the final answer (last \\boxed{...}, else the last number) equals
                                          the label's, numerically when both parse as numbers
    load_reward_fn("module:function")     a custom reward f(response, item) -> float; "path/to/file.py:function" too

Responses are cleaned first (`clean_response`, see tasks/base.py): cut at the first "<eos>" and, except for the math
reward (answers span lines), at the first newline, then stripped.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from r3rl.tasks.base import PromptItem, clean_response

__all__ = ["exact_match", "position_match", "math_answer_reward", "extract_math_answer", "BUILTIN_REWARDS",
           "get_reward", "load_reward_fn"]

RewardFn = Callable[[str, PromptItem], float]


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


class _CheckedReward:
    """Calls a custom reward and checks that it returned a finite number (a bool or None is a mistake)."""

    def __init__(self, fn: Callable, spec: str) -> None:
        self.fn, self.spec = fn, spec

    def __call__(self, response: str, item: PromptItem) -> float:
        value = self.fn(response, item)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"--custom-rm-path {self.spec!r} returned {value!r} for prompt {item.prompt!r} "
                             f"({item.metadata.get('source', '?')}): expected a finite number")
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


def _as_number(text: str) -> Fraction | None:
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _normalize(text: str) -> str:
    return text.replace("$", "").replace(" ", "").strip()
