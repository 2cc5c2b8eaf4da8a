"""The nouns of prompt data: `PromptItem` (one prompt and its label), the `Task` protocol (procedural prompts with a
verifiable reward) and the `PromptSource` protocol (what the trainer draws prompts from, with a resumable cursor).

Response rule (every built-in reward): a response is compared after `clean_response`, which cuts it at the first
EOS marker (the byte tokenizer's "<eos>" text, when a decode kept special tokens) and, for short-answer rewards, at
the first newline, then strips surrounding whitespace. So "dcba<eos>junk" and "dcba\\nmore" both read as "dcba".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["PromptItem", "Task", "PromptSource", "clean_response", "EOS_TEXT"]

EOS_TEXT = "<eos>"
"""The byte tokenizer's EOS token as text (r3rl.models.presets.make_tokenizer)."""


@dataclass(frozen=True, kw_only=True)
class PromptItem:
    """One prompt of a task or a data file."""

    prompt: str
    """The text the model continues (the trainer tokenizes it with the model's tokenizer)."""
    label: str
    """The reference answer the reward compares against (and the supervised warm-up target)."""
    metadata: dict = field(default_factory=dict)
    """Where the item came from: {"source": "file.jsonl:LINE", "fields": {other keys of the row}} or
    {"source": "task:NAME", "index": I}."""


@runtime_checkable
class Task(Protocol):
    """A procedural task: prompts drawn from an rng, a partial-credit reward in [0, 1], a supervised target."""

    name: str

    def sample_prompts(self, n: int, rng) -> list[PromptItem]: ...

    def reward(self, response: str, label: str) -> float: ...

    def sft_target(self, item: PromptItem) -> str: ...


@runtime_checkable
class PromptSource(Protocol):
    """What the trainer draws prompts from: a built-in task (`TaskPromptSource`) or a data file (`PromptDataset`).

    `state_dict()` is plain ints and strings; `load_state_dict(state)` continues exactly where the saved cursor was.
    """

    def next_batch(self, n: int) -> list[PromptItem]: ...

    def reward(self, response: str, item: PromptItem) -> float: ...

    def rewards(self, responses: list[str], items: list[PromptItem]) -> list[float]: ...

    def sft_target(self, item: PromptItem) -> str: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def clean_response(response: str, *, stop_at_newline: bool = True) -> str:
    """`response` cut at the first "<eos>" (and the first newline unless `stop_at_newline` is False), stripped."""
    cut = response.split(EOS_TEXT, 1)[0]
    if stop_at_newline:
        cut = cut.split("\n", 1)[0]
    return cut.strip()
