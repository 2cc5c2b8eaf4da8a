"""`r3rl train` through the real command: checkpoints load without running code, reward plug-ins cannot end or wedge
the run, two trainers cannot share a directory, and bad inputs are one-line errors with exit 2."""

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r3rl.cli import main
from r3rl.train.lock import LOCK_NAME, DirLock

TINY = ["train", "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "4",
        "--num-rollout", "2", "--sft-steps", "0", "--eval-interval", "0", "--no-progress", "--device", "cpu"]

PLUGINS = '''
import sys, time

def exit_unless_label(response, item):
    if response == item.label:  # the start-up call passes; the first rollout's responses do not
        return 1.0
    sys.exit(0)

def hang_unless_label(response, item):
    if response == item.label:
        return 1.0
    time.sleep(3600)

def verl_style(response, item):
    return float(response == item["label"])

def ok(response, item):
    return 0.5
'''


def r3rl(*args) -> int:
    """`r3rl ARGS` in this process: the exit code (argparse's errors exit 2 through SystemExit)."""
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture(scope="module")
def rms(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    (d / "rms.py").write_text(PLUGINS)
    return d / "rms.py"


# --- reward plug-ins --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("plugin", "extra", "message"), [
    ("exit_unless_label", [], r"raised SystemExit\(0\) \(the plug-in called sys.exit\)"),
    ("hang_unless_label", ["--reward-timeout", "1"], r"took longer than --reward-timeout 1 s; the worker was killed"),
])
def test_a_reward_that_exits_or_hangs_fails_the_run_naming_the_prompt(tmp_path, capsys, rms, plugin, extra, message):
    run_dir = tmp_path / "run"
    code = r3rl(*TINY, "--run-dir", run_dir, "--custom-rm-path", f"{rms}:{plugin}", *extra)
    out = capsys.readouterr().out
    assert code == 1  # was 0 after 0 steps with "error": null (exit), or blocked forever (hang)
    result = json.loads(out[out.index("{"):])
    assert result["verdict"] == "fail" and re.search(r"on prompt 'rev:\w+=' \(task:reverse\): " + message,
                                                     result["error"]), result
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["error"] == result["error"] and summary["steps"] == 0


def test_a_verl_style_reward_fails_at_start_before_any_work(tmp_path, capsys, rms):
    run_dir = tmp_path / "run"
    code = r3rl(*TINY, "--sft-steps", "50", "--run-dir", run_dir, "--custom-rm-path", f"{rms}:verl_style")
    err = capsys.readouterr().err
    assert code == 2
    assert "'PromptItem' object is not subscriptable" in err and "write item.label, not item['label']" in err
    assert "sft warm-up" not in err and "rollout engine" not in err  # before the warm-up and the engine
    assert not (run_dir / "metrics.jsonl").exists()


def test_reward_fn_help_lists_every_builtin(capsys):
    from r3rl.tasks.rewards import BUILTIN_REWARDS

    assert r3rl("train", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in BUILTIN_REWARDS:
        assert name in text[text.index("--reward-fn"):]
    assert r3rl(*TINY, "--reward-fn", "nope") == 2


# --- checkpoints ------------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file when unpickled


def test_a_malicious_trainer_state_is_refused_and_does_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"step": 1, "scheduler": {}, "rng": _Payload(str(marker)), "prompts": {}}, ckpt / "trainer_state.pt")
    code = r3rl(*TINY, "--run-dir", tmp_path / "run", "--load", ckpt)
    assert code == 2
    assert f"{ckpt / 'trainer_state.pt'}: refused to load" in last_error(capsys)
    assert not marker.exists()
    torch.load(ckpt / "trainer_state.pt", weights_only=False)  # the negative control: the old load ran it
    assert marker.exists()


@pytest.mark.parametrize(("damage", "message"), [
    ("truncated", "cannot be read as a trainer state, the checkpoint is damaged or incomplete"),
    ("empty", "cannot be read as a trainer state, the checkpoint is damaged or incomplete"),
    ("text", "refused to load: it is not tensors and plain data, as a trainer state is (damaged, "),
])
def test_a_damaged_trainer_state_is_a_one_line_error(tmp_path, capsys, damage, message):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    state = ckpt / "trainer_state.pt"
    torch.save({"step": 1, "scheduler": {}, "rng": {"torch": torch.get_rng_state()}, "prompts": {}}, state)
    data = state.read_bytes()
    state.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"not a checkpoint\n"}[damage])
    assert r3rl(*TINY, "--run-dir", tmp_path / "run", "--load", ckpt) == 2
    assert f"{state}: {message}" in last_error(capsys)


def test_a_sharded_checkpoint_loads_and_its_malicious_metadata_or_item_does_not_run(tmp_path):
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from r3rl.train.checkpoint import _safe_dcp_planner, load_optimizer_state

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.123)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path / "step" / "dcp"))
    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.5)
    load_optimizer_state(tmp_path / "step", other, other_opt, {})  # the negative control: a real one loads
    assert torch.equal(other.weight, model.weight) and other_opt.param_groups[0]["lr"] == 0.123

    marker = tmp_path / "pwned"
    meta = tmp_path / "step" / "dcp" / ".metadata"
    meta.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ValueError, match=rf"{meta}: refused to load: it names io.open, which"):
        load_optimizer_state(tmp_path / "step", other, other_opt, {})
    assert not marker.exists()

    buf = io.BytesIO()
    torch.save(_Payload(str(marker)), buf)
    item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex("optim.x"), dest_offsets=torch.Size([0]),
                    storage_index=MetadataIndex("optim.x"), storage_offsets=torch.Size([0]), lengths=torch.Size([0]))
    with pytest.raises(ValueError, match=r"sharded checkpoint item optim.x: refused to load"):
        _safe_dcp_planner().load_bytes(item, io.BytesIO(buf.getvalue()))
    assert not marker.exists()


def test_the_trainer_state_holds_only_what_weights_only_loads(tmp_path):
    import random

    import numpy as np

    from r3rl.train.checkpoint import capture_rng, restore_rng

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save({"rng": capture_rng()}, tmp_path / "s.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


# --- one trainer per directory ----------------------------------------------------------------------------------
def test_a_second_trainer_on_the_same_run_dir_or_save_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path,
                                                                                                     capsys):
    run_dir, save = tmp_path / "run", tmp_path / "ckpt"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen([sys.executable, "-m", "r3rl.cli", *TINY, "--num-rollout", "100000", "--run-dir",
                              str(run_dir), "--save", str(save), "--save-interval", "100000"],
                             stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        for _ in range(1200):  # the lock is the trainer's first write, before the model loads
            if (save / LOCK_NAME).is_file() and str(first.pid) in (save / LOCK_NAME).read_text():
                break
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.1)
        else:
            pytest.fail("the first trainer never took its locks")
        assert r3rl(*TINY, "--run-dir", run_dir) == 2
        err = last_error(capsys)
        assert f"--run-dir {run_dir} is in use by another trainer (pid {first.pid} on " in err
        assert r3rl(*TINY, "--run-dir", tmp_path / "other", "--save", save) == 2
        assert f"--save {save} is in use by another trainer (pid {first.pid} on " in last_error(capsys)
        assert not (tmp_path / "other" / "metrics.jsonl").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        log.close()
    lock = DirLock.acquire(run_dir, flag="--run-dir")  # the dead trainer's lock is stale: taken over
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert (run_dir / LOCK_NAME).read_text() == ""  # a clean release leaves no stale holder


def test_a_stale_lock_is_reported_with_its_dead_holder(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp_path.joinpath(LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                        "started": "then", "command": "r3rl train"}) + "\n")
    with caplog.at_level("WARNING"):
        lock = DirLock.acquire(tmp_path, flag="--run-dir")
    assert f"taking over a stale lock of pid {dead.pid}" in caplog.text and "which no longer runs" in caplog.text
    again = None
    try:  # the negative control: while held, the same directory is refused, in this process too
        with pytest.raises(ValueError, match=rf"is in use by another trainer \(pid {os.getpid()} on "):
            again = DirLock.acquire(tmp_path, flag="--run-dir")
    finally:
        lock.release()
        if again is not None:
            again.release()


def _unwritable_dir(tmp_path):
    """A directory that refuses writes: a mode-0555 one, or (root ignores modes) sysfs, which refuses even root."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    for candidate in (d, Path("/sys")):
        try:
            (candidate / ".r3rl-probe").touch()
        except OSError:
            return candidate
        (candidate / ".r3rl-probe").unlink()
    pytest.skip("no directory here refuses writes")


def test_a_read_only_run_dir_is_a_one_line_error(tmp_path, capsys):
    ro = _unwritable_dir(tmp_path)
    assert r3rl(*TINY, "--run-dir", ro) == 2
    assert f"--run-dir {ro} is not writable" in last_error(capsys)
    assert r3rl(*TINY, "--run-dir", f"{ro}/new-run") == 2
    assert f"--run-dir {ro}/new-run: cannot create the directory" in last_error(capsys)


# --- bad inputs -------------------------------------------------------------------------------------------------
def test_a_binary_prompt_file_names_the_file(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_bytes(b'{"prompt": "a", "label": "b"}\n' + bytes(range(256)))
    assert r3rl(*TINY, "--run-dir", tmp_path / "run", "--prompt-data", data) == 2
    assert f"{data}:2: " in last_error(capsys)
    data.write_bytes(b'{"prompt": "a", "label": "b"}\n\x00\x00{"prompt": "c", "label": "d"}\n')
    assert r3rl(*TINY, "--run-dir", tmp_path / "run", "--prompt-data", data) == 2
    assert f"{data}:2: a NUL byte at column 1" in last_error(capsys)


@pytest.mark.parametrize("flag", ["--max-tokens-per-mb", "--log-probs-max-tokens-per-mb"])
def test_a_token_budget_below_one_is_a_one_line_error(tmp_path, capsys, flag):
    assert r3rl(*TINY, "--run-dir", tmp_path / "run", flag, "0") == 2
    assert f"{flag.lstrip('-').replace('-', '_')} must be >= 1 (a token budget): got 0" in last_error(capsys)


def test_a_sample_above_the_log_probs_budget_names_that_flag(tmp_path, capsys):
    assert r3rl(*TINY, "--run-dir", tmp_path / "run", "--log-probs-max-tokens-per-mb", "3") != 0
    assert "more than the micro-batch token budget --log-probs-max-tokens-per-mb=3" in last_error(capsys)
