"""Built-in tasks: labels computed by hand, size limits, rewards with partial credit, byte-tokenizer round trip."""

import random

import pytest

from r3rl.models.presets import EOS_ID, make_tokenizer
from r3rl.tasks import BUILTIN_TASKS, AddTask, PromptItem, ReverseTask, SortTask, Task, get_task


def _solve(prompt: str) -> str:
    """Independent reference solutions, parsed from the prompt text."""
    op, arg = prompt[:-1].split(":")
    if op == "rev":
        return arg[::-1]
    if op == "sort":
        return "".join(sorted(arg))
    a, b = arg.split("+")
    return "".join(str((int(x) + int(y)) % 10) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", sorted(set(BUILTIN_TASKS) - {"guess"}))  # guess: one prompt, episodes (test_guess)
def test_task_items_are_short_correct_and_seeded(name):
    task = get_task(name)
    assert isinstance(task, Task) and task.name == name
    items = task.sample_prompts(200, random.Random(3))
    assert items == task.sample_prompts(200, random.Random(3))  # seeded
    assert len({it.prompt for it in items}) > 100  # not degenerate
    for it in items:
        assert len(it.prompt.encode()) <= 12 and len(it.label.encode()) <= 8
        assert it.label == _solve(it.prompt) == task.sft_target(it)
        assert task.reward(it.label, it.label) == 1.0
        assert it.metadata["source"] == f"task:{name}"


def test_hand_computed_labels():
    class FixedRng:  # picks characters in order, to pin the labels down
        def __init__(self, chars):
            self.chars = iter(chars)

        def choice(self, _):
            return next(self.chars)

    assert ReverseTask().sample_prompts(1, FixedRng("abce"))[0] == PromptItem(
        prompt="rev:abce=", label="ecba", metadata={"source": "task:reverse"})
    assert SortTask().sample_prompts(1, FixedRng("dbca"))[0].label == "abcd"
    assert AddTask().sample_prompts(1, FixedRng("123459"))[0].prompt == "add:123+459="
    assert AddTask().sample_prompts(1, FixedRng("123459"))[0].label == "572"  # 1+4, 2+5, (3+9) mod 10
    assert AddTask(carry=True).sample_prompts(1, FixedRng("123459"))[0].label == "0582"
    assert ReverseTask(length=2, alphabet="xy").sample_prompts(1, FixedRng("xy"))[0].label == "yx"
    assert AddTask(digits=2, max_digit=9).sample_prompts(1, FixedRng("7968"))[0].label == "37"  # (7+6)%10, (9+8)%10


def test_add_default_digits_never_carry():
    """Default operand digits are 0..4: the digit-wise sum is the ordinary sum (no wrap-around to learn)."""
    items = AddTask().sample_prompts(300, random.Random(0))
    assert {c for it in items for c in it.prompt[4:-1]} == set("01234+")
    for it in items:
        a, b = it.prompt[4:-1].split("+")
        assert int(it.label) == int(a) + int(b)
    assert {c for it in AddTask(max_digit=9).sample_prompts(300, random.Random(0)) for c in it.prompt} >= set("9")


def test_partial_credit_reward():
    task = get_task("reverse")
    assert task.reward("dcba", "dcba") == 1.0
    assert task.reward("dcbx<eos>", "dcba") == 0.75
    assert task.reward("dcb", "dcba") == 0.75
    assert task.reward("", "dcba") == 0.0
    assert get_task("add").reward("579\n", "579") == 1.0


@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("reverse", {"length": 8}, r"length must be an int in \[1, 7\]"),
    ("reverse", {"length": 0}, r"length must be an int in \[1, 7\]"),
    ("sort", {"length": 7}, r"length must be an int in \[1, 6\]"),
    ("add", {"digits": 4}, r"digits must be an int in \[1, 3\]"),
    ("add", {"max_digit": 10}, r"max_digit must be an int in \[1, 9\]"),
    ("reverse", {"alphabet": "aa"}, r"alphabet must be >= 2 distinct"),
    ("reverse", {"alphabet": "a=b"}, r"alphabet must be >= 2 distinct"),
    ("reverse", {"size": 3}, r"task 'reverse': bad parameters"),
])
def test_bad_task_parameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_task(name, **kwargs)


def test_unknown_task_lists_choices():
    with pytest.raises(ValueError, match=r"unknown task 'copy': choose one of \['add', 'guess', 'reverse', 'sort'\]"):
        get_task("copy")


def test_byte_tokenizer_round_trip():
    """The trainer encodes prompt + label with the presets' byte tokenizer: one token per byte, decoded back."""
    tok = make_tokenizer()
    for name in BUILTIN_TASKS:
        for it in get_task(name).sample_prompts(20, random.Random(0)):
            ids = tok.encode(it.prompt + it.label, add_special_tokens=False)
            assert ids == list((it.prompt + it.label).encode())
            text = tok.decode(ids[len(it.prompt):] + [EOS_ID], skip_special_tokens=True)
            assert get_task(name).reward(text, it.label) == 1.0
            assert get_task(name).reward(tok.decode(ids[len(it.prompt):] + [EOS_ID]), it.label) == 1.0
