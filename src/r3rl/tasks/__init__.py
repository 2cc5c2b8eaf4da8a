"""Built-in verifiable tasks, reward functions and prompt data loading (see base.py for the response rule)."""

from r3rl.tasks.base import EOS_TEXT, PromptItem, PromptSource, Task, clean_response
from r3rl.tasks.builtin import BUILTIN_TASKS, AddTask, ReverseTask, SortTask, get_task
from r3rl.tasks.data import PromptDataset, TaskPromptSource, default_holdout, make_prompt_source, split_holdout
from r3rl.tasks.rewards import (
    BUILTIN_REWARDS,
    exact_match,
    extract_math_answer,
    get_reward,
    load_reward_fn,
    math_answer_reward,
    position_match,
)

__all__ = [
    "EOS_TEXT", "PromptItem", "PromptSource", "Task", "clean_response", "BUILTIN_TASKS", "AddTask", "ReverseTask",
    "SortTask", "get_task", "PromptDataset", "TaskPromptSource", "make_prompt_source", "split_holdout",
    "default_holdout", "BUILTIN_REWARDS",
    "exact_match", "extract_math_answer", "get_reward", "load_reward_fn", "math_answer_reward", "position_match",
]
