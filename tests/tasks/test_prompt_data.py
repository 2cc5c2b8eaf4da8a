"""Prompt data files (.jsonl, .parquet): bad lines name file and line, resumable cursors, make_prompt_source."""

import json
import sys

import pytest

from r3rl.tasks import PromptDataset, PromptItem, PromptSource, TaskPromptSource, get_task, make_prompt_source
from r3rl.tasks.data import DataPart


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def jsonl(tmp_path):
    return _write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}=", "label": str(i), "extra": i} for i in range(7)])


def test_jsonl_loads_items_with_source(jsonl):
    ds = PromptDataset.from_file(jsonl)
    assert len(ds) == 7 and isinstance(ds, PromptSource)
    assert ds.items[2] == PromptItem(prompt="q2=", label="2", metadata={"source": f"{jsonl}:3", "fields": {"extra": 2}})


def test_custom_keys_and_blank_lines(tmp_path):
    path = _write_jsonl(tmp_path / "k.jsonl", [{"question": "a", "answer": "b"}, "", {"question": "c", "answer": "d"}])
    ds = PromptDataset.from_file(path, input_key="question", label_key="answer")
    assert [(it.prompt, it.label, it.metadata) for it in ds.items] == [
        ("a", "b", {"source": f"{path}:1"}), ("c", "d", {"source": f"{path}:3"})]


@pytest.mark.parametrize(("bad", "match"), [
    ("{not json", r"not valid JSON"),
    ('["a", "b"]', r"expected a JSON object, got list"),
    ({"prompt": "x"}, r"missing key 'label' \(--label-key\); keys present: \['prompt'\]"),
    ({"label": "x"}, r"missing key 'prompt' \(--input-key\)"),
    ({"prompt": "x", "label": 3}, r"'label' must be a string, got int 3"),
    ({"prompt": None, "label": "3"}, r"'prompt' must be a string, got NoneType"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad, match):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "label": "b"}, {"prompt": "c", "label": "d"}, bad])
    with pytest.raises(ValueError, match=match) as e:
        PromptDataset.from_file(path)
    assert str(e.value).startswith(f"{path}:3: ")


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match=r"file not found"):
        PromptDataset.from_file(tmp_path / "nope.jsonl")
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"expected a .jsonl or .parquet file, got '.csv'"):
        PromptDataset.from_file(tmp_path / "p.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"no prompts in the file"):
        PromptDataset.from_file(tmp_path / "empty.jsonl")


def test_parquet_roundtrip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "label": f"l{i}", "n": i} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    ds = PromptDataset.from_file(tmp_path / "p.parquet")
    assert [(it.prompt, it.label) for it in ds.items] == [(r["prompt"], r["label"]) for r in rows]
    assert ds.items[4].metadata["source"] == f"{tmp_path / 'p.parquet'}:5"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "label": "b"}, {"prompt": "c", "label": None}]),
                   tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet:2: 'label' must be a string, got NoneType"):
        PromptDataset.from_file(tmp_path / "bad.parquet")


def test_parquet_without_pyarrow_names_it(tmp_path, monkeypatch):
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"reading .parquet needs pyarrow \(pip install pyarrow\)"):
        PromptDataset.from_file(tmp_path / "p.parquet")


def test_dataset_epochs_cover_every_item_and_shuffle(jsonl):
    ds = PromptDataset.from_file(jsonl, seed=1)
    first, second = ds.next_batch(7), ds.next_batch(7)
    assert sorted(it.label for it in first) == sorted(it.label for it in second) == [str(i) for i in range(7)]
    assert [it.label for it in first] != [it.label for it in second]  # each epoch its own shuffle
    assert [it.label for it in PromptDataset.from_file(jsonl, seed=1).next_batch(7)] == [it.label for it in first]
    assert [it.label for it in PromptDataset.from_file(jsonl, seed=2).next_batch(7)] != [it.label for it in first]


def _labels(items):
    return [(it.prompt, it.label) for it in items]


@pytest.mark.parametrize("make", [
    lambda p: PromptDataset.from_file(p, seed=5),
    lambda p: TaskPromptSource(get_task("reverse"), seed=5),
])
def test_resume_continues_exactly(jsonl, make):
    """Resuming from a saved state (mid-epoch, across an epoch boundary) equals the uninterrupted stream."""
    ref = make(jsonl)
    uninterrupted = [_labels(ref.next_batch(n)) for n in (3, 5, 4, 6, 2)]
    src = make(jsonl)
    got = [_labels(src.next_batch(n)) for n in (3, 5)]
    state = json.loads(json.dumps(src.state_dict()))  # plain data: survives JSON (and torch.save)
    resumed = make(jsonl)
    resumed.next_batch(1)  # a fresh source that already moved: load_state_dict must overwrite its cursor
    resumed.load_state_dict(state)
    got += [_labels(resumed.next_batch(n)) for n in (4, 6, 2)]
    assert got == uninterrupted


def test_task_stream_independent_of_batch_sizes():
    a = TaskPromptSource(get_task("sort"), seed=0)
    b = TaskPromptSource(get_task("sort"), seed=0)
    assert _labels(a.next_batch(10)) == _labels(b.next_batch(3) + b.next_batch(7))
    fresh = TaskPromptSource(get_task("sort"), seed=0).next_batch(10)
    assert _labels(TaskPromptSource(get_task("sort"), seed=1).next_batch(10)) != _labels(fresh)  # seed matters


def test_load_state_mismatch_is_an_error(jsonl, tmp_path):
    ds = PromptDataset.from_file(jsonl)
    small = PromptDataset.from_file(_write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "label": "b"}]))
    with pytest.raises(ValueError, match=r"saved cursor is for 1 prompts .* this file has 7"):
        ds.load_state_dict(small.state_dict())
    task_state = TaskPromptSource(get_task("reverse")).state_dict()
    with pytest.raises(ValueError, match=r"is a 'task' source, not a dataset"):
        ds.load_state_dict(task_state)
    with pytest.raises(ValueError, match=r"task 'sort': the saved prompt cursor is for 'task' 'reverse'"):
        TaskPromptSource(get_task("sort")).load_state_dict(task_state)


def test_make_prompt_source_rewards(jsonl, tmp_path):
    task_src = make_prompt_source(task="reverse", seed=0)
    (it,) = task_src.next_batch(1)
    assert task_src.reward(it.label, it) == 1.0 and task_src.sft_target(it) == it.label
    assert 0 < task_src.reward(it.label[:-1], it) < 1  # the task's partial credit

    ds = make_prompt_source(prompt_data=str(jsonl), reward_fn="exact_match")
    (it,) = ds.next_batch(1)
    assert ds.reward(it.label + "<eos>", it) == 1.0 and ds.reward("x" + it.label, it) == 0.0

    math_src = make_prompt_source(prompt_data=str(jsonl), reward_fn="math")
    assert math_src.reward(f"so the answer is {it.label}", it) == 1.0

    (tmp_path / "rm.py").write_text("def rm(response, item):\n    return 0.25 if item.prompt in response else 0.0\n")
    custom = make_prompt_source(task="add", custom_rm_path=f"{tmp_path / 'rm.py'}:rm")
    (it,) = custom.next_batch(1)
    assert custom.reward(it.prompt, it) == 0.25 and custom.reward(it.label, it) == 0.0

    with pytest.raises(ValueError, match=r"unknown reward function 'f1'"):
        make_prompt_source(prompt_data=str(jsonl), reward_fn="f1")
    with pytest.raises(ValueError, match=r"unknown task 'nope'"):
        make_prompt_source(task="nope")
    assert make_prompt_source(task="reverse", task_kwargs={"length": 6}).next_batch(1)[0].prompt.startswith("rev:")


def test_negative_batch_size_is_an_error(jsonl):
    for source in (PromptDataset.from_file(jsonl), TaskPromptSource(get_task("add"))):
        with pytest.raises(ValueError, match=r"n must be an int >= 0, got -1"):
            source.next_batch(-1)
        assert source.next_batch(0) == []


def _rows(n, dup=()):
    return [{"prompt": f"w{i}=", "label": f"W{i}"} for i in range(n)] + [{"prompt": f"w{i}=", "label": "dup"}
                                                                          for i in dup]


def test_held_out_split_is_disjoint_seeded_and_covers_the_file(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", _rows(50, dup=(3, 7, 11, 20)))  # repeated prompts: one side only
    train = make_prompt_source(prompt_data=str(path), part=DataPart.TRAIN, holdout=10, split_seed=0, seed=1)
    held = make_prompt_source(prompt_data=str(path), part=DataPart.EVAL, holdout=10, split_seed=0, seed=2)
    train_prompts, held_prompts = {it.prompt for it in train.items}, {it.prompt for it in held.items}
    assert len(held_prompts) == 10 and not train_prompts & held_prompts
    assert len(train.items) + len(held.items) == 54 and train_prompts | held_prompts == {f"w{i}=" for i in range(50)}
    # the training source's cursor never reaches a held-out prompt, over several epochs
    assert not {it.prompt for it in train.next_batch(200)} & held_prompts
    again = make_prompt_source(prompt_data=str(path), part=DataPart.EVAL, holdout=10, split_seed=0, seed=9)
    assert {it.prompt for it in again.items} == held_prompts  # the split depends on split_seed only
    other = make_prompt_source(prompt_data=str(path), part=DataPart.EVAL, holdout=10, split_seed=1)
    assert {it.prompt for it in other.items} != held_prompts
    assert len(make_prompt_source(prompt_data=str(path), part=DataPart.ALL, holdout=10).items) == 54


def test_eval_file_is_the_eval_part_and_training_keeps_the_whole_file(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", _rows(20))
    evals = _write_jsonl(tmp_path / "e.jsonl", [{"prompt": "new=", "label": "NEW"}])
    held = make_prompt_source(prompt_data=str(path), eval_data=str(evals), part=DataPart.EVAL, holdout=4)
    assert [(it.prompt, it.label) for it in held.items] == [("new=", "NEW")] and held.reward("NEW", held.items[0]) == 1
    train = make_prompt_source(prompt_data=str(path), eval_data=str(evals), part=DataPart.TRAIN, holdout=4)
    assert len(train.items) == 20  # an eval file: nothing is split off the training data


def test_holdout_sizes_and_errors(tmp_path):
    from r3rl.tasks import default_holdout, split_holdout

    assert [default_holdout(n, 64) for n in (2, 9, 10, 200, 1000)] == [1, 1, 2, 40, 64]
    assert default_holdout(200, 16) == 16
    one = PromptDataset.from_file(_write_jsonl(tmp_path / "one.jsonl", _rows(1, dup=(0,))))
    with pytest.raises(ValueError, match=r"one.jsonl: cannot hold out 1 of 1 distinct prompts .*--eval-interval 0"):
        split_holdout(one.items, 1, name="one.jsonl")
    with pytest.raises(ValueError, match=r"part must be 'all', 'train' or 'eval': got 'test'"):
        make_prompt_source(task="reverse", part="test")
