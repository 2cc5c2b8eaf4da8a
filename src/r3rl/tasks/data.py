"""Prompt sources with a resumable cursor: `PromptDataset` (a .jsonl or .parquet file) and `TaskPromptSource` (a
built-in task), so the trainer draws prompts, rewards and supervised targets from both alike.

    source = make_prompt_source(task="reverse", seed=0)                       # built-in task
    source = make_prompt_source(prompt_data="p.jsonl", reward_fn="math", seed=0)
    items = source.next_batch(16); r = source.reward(text, items[0]); rs = source.rewards(texts, items)
    state = source.state_dict()   # plain ints/strings; load_state_dict(state) continues exactly there

Held-out evaluation (`part`): with `eval_data` the "eval" part is that file. Without it, `holdout` > 0 splits
`prompt_data` once by a seeded permutation (`split_seed`): "eval" is `holdout` items, "train" the rest, disjoint, the
same split in every call with the same seed (training, warm-up and evaluation sources alike).

    train = make_prompt_source(prompt_data="p.jsonl", part=DataPart.TRAIN, holdout=40, seed=0)
    held = make_prompt_source(prompt_data="p.jsonl", part=DataPart.EVAL, holdout=40, seed=1)

Order: a dataset is read in epochs, each a shuffle seeded by (seed, epoch); a batch may span an epoch boundary. A
task draws item i from an rng seeded by (seed, i), so the stream does not depend on batch sizes.
"""

from __future__ import annotations

import enum
import json
import random
from collections.abc import Callable
from pathlib import Path

from r3rl.tasks.base import PromptItem, Task
from r3rl.tasks.builtin import get_task
from r3rl.tasks.rewards import get_reward

__all__ = ["PromptDataset", "TaskPromptSource", "DataPart", "make_prompt_source", "split_holdout", "default_holdout"]

RewardFn = Callable[[str, PromptItem], float]


class DataPart(enum.StrEnum):
    """Which prompts of the data a source hands out."""

    ALL = "all"  # the whole prompt file (no evaluation split)
    TRAIN = "train"  # the prompt file without its held-out prompts
    EVAL = "eval"  # the evaluation file, else the held-out prompts of the prompt file


class PromptDataset:
    """Prompts and labels from a file, iterated in seeded shuffled epochs with a resumable cursor."""

    def __init__(self, items: list[PromptItem], *, reward_fn: RewardFn | None = None, seed: int = 0,
                 name: str = "prompts") -> None:
        if not items:
            raise ValueError(f"{name}: no prompts")
        self.items, self.name, self.seed = items, name, seed
        self.reward_fn = reward_fn or _label_reward(get_reward("exact_match"))
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order(0)

    @classmethod
    def from_file(cls, path: str | Path, *, input_key: str = "prompt", label_key: str = "label",
                  reward_fn: RewardFn | None = None, seed: int = 0) -> PromptDataset:
        """Read a .jsonl (one JSON object a line; blank lines skipped) or .parquet file. A bad line (not JSON, not an
        object, a missing key, a non-string value) is a ValueError naming the file and the line (parquet: row + 1).
        Each item's metadata holds "source" (FILE:LINE) and, when the row has other keys, "fields" (those keys), which
        a custom reward can read."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"prompt data {path}: file not found")
        if path.suffix == ".jsonl":
            rows = _read_jsonl(path)
        elif path.suffix == ".parquet":
            rows = _read_parquet(path)
        else:
            raise ValueError(f"prompt data {path}: expected a .jsonl or .parquet file, got '{path.suffix}'")
        items = []
        for line, row in rows:
            where = f"{path}:{line}"
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            values = []
            for key, flag in ((input_key, "--input-key"), (label_key, "--label-key")):
                if key not in row:
                    raise ValueError(f"{where}: missing key '{key}' ({flag}); keys present: {sorted(row)}")
                if not isinstance(row[key], str):
                    raise ValueError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__} "
                                     f"{row[key]!r}")
                values.append(row[key])
            extra = {k: v for k, v in row.items() if k not in (input_key, label_key)}
            metadata = {"source": where} | ({"fields": extra} if extra else {})  # for custom rewards
            items.append(PromptItem(prompt=values[0], label=values[1], metadata=metadata))
        if not items:
            raise ValueError(f"prompt data {path}: no prompts in the file")
        return cls(items, reward_fn=reward_fn, seed=seed, name=str(path))

    def __len__(self) -> int:
        return len(self.items)

    def next_batch(self, n: int) -> list[PromptItem]:
        _check_batch(n)
        out = []
        for _ in range(n):
            if self.pos == len(self.items):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            out.append(self.items[self._order[self.pos]])
            self.pos += 1
        return out

    def reward(self, response: str, item: PromptItem) -> float:
        return self.reward_fn(response, item)

    def rewards(self, responses: list[str], items: list[PromptItem]) -> list[float]:
        return _rewards(self.reward_fn, self.reward, responses, items)

    def sft_target(self, item: PromptItem) -> str:
        return item.label

    def state_dict(self) -> dict:
        return {"kind": "dataset", "name": self.name, "num_items": len(self.items), "seed": self.seed,
                "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "dataset":
            raise ValueError(f"{self.name}: the saved prompt cursor is a {state.get('kind')!r} source, not a dataset")
        if state["num_items"] != len(self.items):
            raise ValueError(f"{self.name}: the saved cursor is for {state['num_items']} prompts "
                             f"({state.get('name')}), this file has {len(self.items)}")
        if not 0 <= state["pos"] <= len(self.items):
            raise ValueError(f"{self.name}: saved cursor position {state['pos']} outside [0, {len(self.items)}]")
        self.seed, self.epoch, self.pos = int(state["seed"]), int(state["epoch"]), int(state["pos"])
        self._order = self._epoch_order(self.epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(f"r3rl-prompts/{self.seed}/{epoch}").shuffle(order)
        return order


class TaskPromptSource:
    """A built-in task behind the `PromptSource` cursor interface: item i comes from an rng seeded by (seed, i)."""

    def __init__(self, task: Task, *, seed: int = 0, reward_fn: RewardFn | None = None) -> None:
        self.task, self.seed, self.cursor = task, seed, 0
        self.reward_fn = reward_fn

    def next_batch(self, n: int) -> list[PromptItem]:
        _check_batch(n)
        out = []
        for i in range(self.cursor, self.cursor + n):
            (item,) = self.task.sample_prompts(1, random.Random(f"r3rl-task/{self.task.name}/{self.seed}/{i}"))
            out.append(PromptItem(prompt=item.prompt, label=item.label, metadata={**item.metadata, "index": i}))
        self.cursor += n
        return out

    def reward(self, response: str, item: PromptItem) -> float:
        if self.reward_fn is not None:
            return self.reward_fn(response, item)
        return self.task.reward(response, item.label)

    def rewards(self, responses: list[str], items: list[PromptItem]) -> list[float]:
        return _rewards(self.reward_fn, self.reward, responses, items)

    def sft_target(self, item: PromptItem) -> str:
        return self.task.sft_target(item)

    def state_dict(self) -> dict:
        return {"kind": "task", "task": self.task.name, "seed": self.seed, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "task" or state.get("task") != self.task.name:
            raise ValueError(f"task '{self.task.name}': the saved prompt cursor is for "
                             f"{state.get('kind')!r} {state.get('task', state.get('name'))!r}")
        if state["cursor"] < 0:
            raise ValueError(f"task '{self.task.name}': saved cursor {state['cursor']} is negative")
        self.seed, self.cursor = int(state["seed"]), int(state["cursor"])


def make_prompt_source(*, task: str = "reverse", prompt_data: str | None = None, input_key: str = "prompt",
                       label_key: str = "label", custom_rm_path: str | None = None, reward_fn: str = "exact_match",
                       seed: int = 0, task_kwargs: dict | None = None, part: DataPart | str = DataPart.ALL,
                       eval_data: str | None = None, holdout: int = 0, split_seed: int = 0,
                       reward_timeout_s: float = 60.0, custom_reward: RewardFn | None = None):
    """The trainer's prompt source: `prompt_data` when given (rewarded by `custom_rm_path`, else the built-in
    `reward_fn` against the label), else the built-in `task` (rewarded by `custom_rm_path`, else its own reward).
    A `custom_rm_path` plug-in runs in a worker process (`RewardPool`, each call bounded by `reward_timeout_s`);
    `custom_reward` passes one already started (the trainer shares one between its prompt sources).

    `part` picks what of the data: "all", "train" (without the held-out items) or "eval" (the `eval_data` file, else
    the `holdout` items split off `prompt_data` by `split_seed`; see the module docstring). A task has no split."""
    from r3rl.tasks.reward_pool import RewardPool

    if part not in set(DataPart):
        raise ValueError(f"part must be 'all', 'train' or 'eval': got {part!r}")
    part = DataPart(part)
    custom = custom_reward or (RewardPool(custom_rm_path, timeout_s=reward_timeout_s) if custom_rm_path else None)
    if prompt_data is not None or (part is DataPart.EVAL and eval_data is not None):
        reward = custom or _label_reward(get_reward(reward_fn))
    if part is DataPart.EVAL and eval_data is not None:
        return PromptDataset.from_file(eval_data, input_key=input_key, label_key=label_key, reward_fn=reward,
                                       seed=seed)
    if prompt_data is not None:
        data = PromptDataset.from_file(prompt_data, input_key=input_key, label_key=label_key, reward_fn=reward,
                                       seed=seed)
        if part is DataPart.ALL or eval_data is not None or holdout == 0:
            return data
        train, held = split_holdout(data.items, holdout, seed=split_seed, name=data.name)
        return PromptDataset(train if part is DataPart.TRAIN else held, reward_fn=reward, seed=seed, name=data.name)
    return TaskPromptSource(get_task(task, **(task_kwargs or {})), seed=seed, reward_fn=custom)


def default_holdout(n_prompts: int, eval_prompts: int) -> int:
    """How many of `n_prompts` distinct prompts to hold out for evaluation when no eval file is given: a fifth, at
    most `eval_prompts`, at least 1."""
    return max(1, min(eval_prompts, n_prompts // 5))


def split_holdout(items: list[PromptItem], n: int, *, seed: int = 0,
                  name: str = "prompts") -> tuple[list[PromptItem], list[PromptItem]]:
    """(train, held_out), both in file order: `n` distinct prompt texts drawn by a permutation seeded by `seed` are
    held out with every row that carries them, so no held-out prompt is trained on, not even a repeated row. At
    least one prompt stays on each side."""
    prompts = list(dict.fromkeys(it.prompt for it in items))  # distinct, in first-seen order
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < len(prompts):
        raise ValueError(f"{name}: cannot hold out {n} of {len(prompts)} distinct prompts for evaluation (at least "
                         f"one must stay to train on): give an evaluation file (--eval-data) or turn evaluation off "
                         f"(--eval-interval 0)")
    order = list(range(len(prompts)))
    random.Random(f"r3rl-holdout/{seed}").shuffle(order)
    held = {prompts[i] for i in order[:n]}
    return [it for it in items if it.prompt not in held], [it for it in items if it.prompt in held]


# --- private -------------------------------------------------------------------------------------------------------
def _check_batch(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"next_batch: n must be an int >= 0, got {n!r}")


def _rewards(fn, one, responses: list[str], items: list[PromptItem]) -> list[float]:
    """A batch of rewards: one round trip when `fn` batches (a RewardPool), else `one` call by call."""
    if len(responses) != len(items):
        raise ValueError(f"rewards: {len(responses)} responses for {len(items)} items")
    batch = getattr(fn, "batch", None)
    if batch is not None:
        return batch(list(responses), list(items))
    return [one(r, it) for r, it in zip(responses, items, strict=True)]


def _label_reward(fn: Callable[[str, str], float]) -> RewardFn:
    return lambda response, item: fn(response, item.label)


def _read_jsonl(path: Path):
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1}): a .jsonl prompt file is UTF-8 JSON, one object a line") from None
            if "\x00" in line:
                raise ValueError(f"{path}:{line_no}: a NUL byte at column {line.index(chr(0)) + 1}: a binary file, "
                                 "not UTF-8 JSON lines") from None
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None


def _read_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"prompt data {path}: reading .parquet needs pyarrow (pip install pyarrow), which is not "
                         f"installed ({e})") from e
    return list(enumerate(pq.read_table(path).to_pylist(), 1))
