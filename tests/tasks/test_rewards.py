"""Built-in rewards against hand-computed values, and the --custom-rm-path loader (good spec and each bad one)."""

import sys
from fractions import Fraction

import pytest

from r3rl.tasks import (
    BUILTIN_REWARDS,
    PromptItem,
    clean_response,
    exact_match,
    extract_math_answer,
    get_reward,
    load_reward_fn,
    math_answer_reward,
    position_match,
)
from r3rl.tasks.rewards import RewardError, reward_value_problem

ITEM = PromptItem(prompt="rev:abcd=", label="dcba", metadata={"source": "test"})


def test_clean_response_cuts_at_eos_and_newline():
    assert clean_response("dcba<eos>xx") == "dcba"
    assert clean_response(" dcba\nmore<eos>") == "dcba"
    assert clean_response("line1\nline2<eos>x", stop_at_newline=False) == "line1\nline2"


@pytest.mark.parametrize(("response", "label", "want"), [
    ("dcba", "dcba", 1.0), ("dcba<eos>junk", "dcba", 1.0), ("dcba\nx", "dcba", 1.0), ("dcb", "dcba", 0.0),
    ("dcbaa", "dcba", 0.0), ("", "dcba", 0.0),
])
def test_exact_match(response, label, want):
    assert exact_match(response, label) == want


@pytest.mark.parametrize(("response", "label", "want"), [
    ("dcba", "dcba", 1.0),
    ("dcbx", "dcba", 3 / 4),  # 3 of 4 positions
    ("xcxa", "dcba", 2 / 4),
    ("dc", "dcba", 2 / 4),  # missing characters cost credit
    ("dcbaxx", "dcba", 4 / 6),  # extra characters cost credit
    ("abcd", "dcba", 0.0),
    ("", "dcba", 0.0),  # empty: 0
    ("<eos>dcba", "dcba", 0.0),  # nothing before the EOS
    ("dcbx<eos>dcba", "dcba", 3 / 4),
])
def test_position_match_partial_credit(response, label, want):
    assert position_match(response, label) == pytest.approx(want)


@pytest.mark.parametrize(("text", "want"), [
    ("so x = 3 and then 42.", "42"),
    (r"hence \boxed{7} or maybe 9", "7"),
    (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    ("total 1,000 apples", "1,000"),
    ("half is 1/2", "1/2"),
    ("minus -3.5", "-3.5"),
    ("no answer here", None),
    (r"\boxed{12", "12"),  # unclosed box: fall back to the last number
])
def test_extract_math_answer(text, want):
    assert extract_math_answer(text) == want


@pytest.mark.parametrize(("response", "label", "want"), [
    ("The answer is 42.", "42", 1.0),
    ("The answer is 41.", "42", 0.0),
    ("It costs 1,000 dollars", "1000", 1.0),
    ("x = 0.5", "1/2", 1.0),
    (r"steps\n...\n\boxed{3} and 17 tries", "3", 1.0),  # the box beats the later number
    ("work\nmore work\n= 12", "#### 12", 1.0),  # spans lines; label's own last number
    (r"\boxed{x+1}", r"\boxed{x + 1}", 1.0),  # non-numeric: compared without spaces
    ("nothing", "5", 0.0),
    ("5<eos>6", "6", 0.0),  # cut at EOS
])
def test_math_answer_reward(response, label, want):
    assert math_answer_reward(response, label) == want


def test_builtin_rewards_registry():
    assert set(BUILTIN_REWARDS) >= {"exact_match", "math"}
    assert get_reward("math") is math_answer_reward
    with pytest.raises(ValueError, match=r"unknown reward function 'nope'.*exact_match"):
        get_reward("nope")


# --- --custom-rm-path ---------------------------------------------------------------------------------------------
@pytest.fixture
def rm_module(tmp_path, monkeypatch):
    (tmp_path / "my_rm.py").write_text(
        "NOT_CALLABLE = 3\n"
        "def length_rm(response, item):\n    return len(response) / 10\n"
        "def one_arg(response):\n    return 1.0\n"
        "def returns_none(response, item):\n    return None\n"
    )
    (tmp_path / "broken_rm.py").write_text("import a_module_that_does_not_exist_r3rl\n")
    (tmp_path / "raises_rm.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("my_rm", "broken_rm", "raises_rm"):
        sys.modules.pop(name, None)


def test_custom_rm_module_spec(rm_module):
    fn = load_reward_fn("my_rm:length_rm")
    assert fn("abcd", ITEM) == pytest.approx(0.4)


def test_custom_rm_file_spec(rm_module):
    fn = load_reward_fn(f"{rm_module / 'my_rm.py'}:length_rm")
    assert fn("abcdef", ITEM) == pytest.approx(0.6)


@pytest.mark.parametrize(("spec", "match"), [
    ("no_colon_here", r"expected 'module:function'"),
    ("my_rm:", r"expected 'module:function'"),
    ("r3rl_no_such_module_xyz:f", r"module 'r3rl_no_such_module_xyz' not found"),
    ("my_rm:missing", r"module 'my_rm' has no attribute 'missing'"),
    ("my_rm:NOT_CALLABLE", r"'NOT_CALLABLE' is a int, not callable"),
    ("my_rm:one_arg", r"'one_arg' must accept \(response: str, item: PromptItem\)"),
    ("broken_rm:f", r"importing 'broken_rm' failed.*a_module_that_does_not_exist_r3rl"),
    ("raises_rm:f", r"importing 'raises_rm' failed: RuntimeError: boom at import"),
])
def test_custom_rm_bad_module_specs(rm_module, spec, match):
    with pytest.raises(ValueError, match=match) as e:
        load_reward_fn(spec)
    assert repr(spec) in str(e.value)  # every error names the spec


def test_custom_rm_bad_file_specs(rm_module):
    with pytest.raises(ValueError, match=r"file '.*nope\.py' not found"):
        load_reward_fn(f"{rm_module / 'nope.py'}:f")
    with pytest.raises(ValueError, match=r"has no attribute 'missing'"):
        load_reward_fn(f"{rm_module / 'my_rm.py'}:missing")
    with pytest.raises(ValueError, match=r"running '.*raises_rm\.py' failed: RuntimeError: boom"):
        load_reward_fn(f"{rm_module / 'raises_rm.py'}:f")


def test_custom_rm_bad_return_value(rm_module):
    fn = load_reward_fn("my_rm:returns_none")
    with pytest.raises(RewardError, match=r"on prompt 'rev:abcd=' \(test\): returned None \(NoneType\): expected a "
                                          r"real number in \[0, 1\]"):
        fn("x", ITEM)


@pytest.mark.parametrize(("value", "problem"), [
    (None, "returned None"), (True, "returned True (bool)"), ("1.0", "returned '1.0' (str)"), ([1.0], "(list)"),
    (float("nan"), "returned nan: expected a finite"), (float("inf"), "returned inf"), (1.5, "1.5, outside [0, 1]"),
    (-0.1, "-0.1, outside"), (10**400, "float() refuses"),
])
def test_the_contract_refuses_values_that_are_not_a_reward(value, problem):
    assert problem in reward_value_problem(value)


@pytest.mark.parametrize("value", [0, 1, 0.0, 0.25, 1.0, Fraction(1, 2)])
def test_the_contract_accepts_real_numbers_in_range(value):
    assert reward_value_problem(value) is None  # the negative control of the test above
