"""RewardPool: a --custom-rm-path plug-in runs in a real worker process; exits, exceptions, hangs, deaths and values
outside the contract are failures that name the prompt, and a start-up call catches contract mistakes."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from r3rl.tasks import PromptItem, make_prompt_source
from r3rl.tasks.reward_pool import RewardPool
from r3rl.tasks.rewards import RewardError, probe_reward

ITEM = PromptItem(prompt="upper:abc=", label="ABC", metadata={"source": "upper.jsonl:7"})

PLUGINS = '''
import os, sys, time

def upper(response, item):  # the README's worked example: per-character credit
    got, want = response.split("\\n", 1)[0].strip(), item.label
    if not got:
        return 0.0
    return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want))

def chatty(response, item):
    print("a plug-in that prints", flush=True)
    return 1.0

def whoami(response, item):
    with open(os.environ["R3RL_TEST_PID_FILE"], "w") as f:
        f.write(str(os.getpid()))
    return 1.0

def whoami_then_hang(response, item):
    whoami(response, item)
    time.sleep(3600)

def exits(response, item):
    sys.exit(0)

def interrupts(response, item):
    raise KeyboardInterrupt

def raises(response, item):
    raise ValueError("bad label " + item.label)

def dies(response, item):
    os._exit(3)

def hangs(response, item):
    time.sleep(3600)

def hangs_unless_label(response, item):
    if response == item.label:
        return 1.0
    time.sleep(3600)

def slow(response, item):
    time.sleep(0.05)
    return 0.5

def seven(response, item):
    return 7

def nan(response, item):
    return float("nan")

def none(response, item):
    return None

def boolean(response, item):
    return True

def verl_style(response, item):
    return float(response == item["label"])
'''


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    (d / "rms.py").write_text(PLUGINS)
    (d / "exits_at_import.py").write_text("import sys\nsys.exit(0)\ndef f(response, item):\n    return 1.0\n")
    (d / "hangs_at_import.py").write_text("import time\ntime.sleep(3600)\ndef f(response, item):\n    return 1.0\n")
    return d


def spec(plugins, name):
    return f"{plugins / 'rms.py'}:{name}"


def test_a_plugin_scores_a_batch_in_another_process(plugins, tmp_path, monkeypatch, capfd):
    pid_file = tmp_path / "pid"
    monkeypatch.setenv("R3RL_TEST_PID_FILE", str(pid_file))
    pool = RewardPool(spec(plugins, "upper"))
    assert pool.batch(["ABC", "ABx", "", "ABC\nrest"], [ITEM] * 4) == [1.0, 2 / 3, 0.0, 1.0]
    assert pool("AB", ITEM) == pytest.approx(2 / 3)
    pool.close()
    who = RewardPool(spec(plugins, "whoami"))
    assert who("x", ITEM) == 1.0
    assert int(pid_file.read_text()) != os.getpid()  # the plug-in did not run in this process
    who.close()
    chatty = RewardPool(spec(plugins, "chatty"))
    assert chatty.batch(["a", "b"], [ITEM, ITEM]) == [1.0, 1.0]  # its prints do not corrupt the protocol
    chatty.close()
    assert "a plug-in that prints" in capfd.readouterr().out


@pytest.mark.parametrize(("name", "message"), [
    ("exits", r"raised SystemExit\(0\) \(the plug-in called sys.exit\) at .*rms\.py:\d+"),
    ("interrupts", r"raised KeyboardInterrupt at .*rms\.py:\d+"),
    ("raises", r"raised ValueError: bad label ABC at .*rms\.py:\d+"),
    ("dies", r"the reward worker exited \(exit code 3\) while scoring it"),
    ("seven", r"returned 7\.0, outside \[0, 1\]"),
    ("nan", r"returned nan: expected a finite number"),
    ("none", r"returned None \(NoneType\)"),
    ("boolean", r"returned True \(bool\)"),
])
def test_every_plugin_failure_fails_naming_the_prompt(plugins, name, message):
    pool = RewardPool(spec(plugins, name))
    with pytest.raises(RewardError, match=r"on prompt 'upper:abc=' \(upper\.jsonl:7\): " + message):
        pool.batch(["ABC", "ABC"], [ITEM, ITEM])
    assert pool._proc.wait(timeout=10) is not None  # the worker is gone ...
    with pytest.raises(RewardError, match="the reward worker was stopped"):  # ... and the pool does not go on
        pool("ABC", ITEM)


def test_a_hung_call_is_killed_at_the_timeout_and_names_the_prompt(plugins):
    ok = RewardPool(spec(plugins, "slow"), timeout_s=5.0)  # negative control: a slow but finite call passes
    assert ok.batch(["a", "b"], [ITEM, ITEM]) == [0.5, 0.5]
    ok.close()
    pool = RewardPool(spec(plugins, "hangs"), timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"on prompt 'upper:abc=' \(upper\.jsonl:7\): took longer than "
                                          r"--reward-timeout 0\.5 s; the worker was killed"):
        pool("ABC", ITEM)
    assert time.monotonic() - t0 < 60  # bounded, not blocked forever
    assert pool._proc.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.parametrize(("file", "timeout", "message"), [
    ("exits_at_import.py", 60.0, r"loading it raised SystemExit\(0\)"),
    ("hangs_at_import.py", 0.5, r"loading it took longer than 2 s"),  # max(call timeout, load_timeout_s)
    ("nope.py", 60.0, r"file '.*nope\.py' not found"),
    ("rms.py", 60.0, r"has no attribute 'missing'"),
])
def test_a_plugin_that_cannot_load_is_a_one_line_error(plugins, file, timeout, message):
    name = "missing" if file == "rms.py" else "f"
    with pytest.raises(ValueError, match=message) as e:
        RewardPool(f"{plugins / file}:{name}", timeout_s=timeout, load_timeout_s=2.0)
    assert "\n" not in str(e.value)


def test_a_module_spec_is_found_through_the_trainers_sys_path(plugins, monkeypatch):
    monkeypatch.syspath_prepend(str(plugins))
    pool = RewardPool("rms:upper")
    assert pool("ABC", ITEM) == 1.0
    pool.close()


def test_the_worker_does_not_rerun_the_trainers_main_and_dies_with_it(plugins, tmp_path):
    """A trainer script read from stdin (multiprocessing's spawn re-runs __main__ and fails there), killed with -9
    while its plug-in hangs: the worker must not outlive it."""
    pid_file = tmp_path / "pid"
    script = textwrap.dedent(f"""
        import os, threading, time
        from r3rl.tasks import PromptItem
        from r3rl.tasks.reward_pool import RewardPool
        pool = RewardPool({spec(plugins, 'whoami_then_hang')!r})
        threading.Thread(target=pool, args=("x", PromptItem(prompt="p", label="l")), daemon=True).start()
        while not os.path.exists(os.environ["R3RL_TEST_PID_FILE"]):
            time.sleep(0.05)
        print("hung", flush=True)
        os.kill(os.getpid(), 9)
    """)
    env = os.environ | {"R3RL_TEST_PID_FILE": str(pid_file), "PYTHONPATH": os.pathsep.join(sys.path)}
    out = tmp_path / "out.txt"  # a file, not a pipe: a surviving worker would hold a pipe open
    with out.open("w") as f:
        subprocess.run([sys.executable, "-"], input=script, stdout=f, stderr=subprocess.STDOUT, text=True, env=env,
                       timeout=120)
    assert "hung" in out.read_text(), out.read_text()
    worker = int(pid_file.read_text())
    for _ in range(100):  # the worker polls its parent every second
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail(f"the reward worker {worker} outlived its trainer")


def test_the_startup_call_catches_a_verl_style_reward_and_keeps_the_cursor(plugins, tmp_path):
    data = tmp_path / "upper.jsonl"
    data.write_text("".join(f'{{"prompt": "upper:{w}=", "label": "{w.upper()}"}}\n' for w in ("abc", "xyz", "qq")))
    bad = make_prompt_source(prompt_data=str(data), custom_rm_path=spec(plugins, "verl_style"))
    with pytest.raises(ValueError, match=r"start-up call on the first prompt .*on prompt 'upper:.*=' \(.*upper\.jsonl:"
                                         r"\d\): raised TypeError: 'PromptItem' object is not subscriptable.*write "
                                         r"item\.label, not item\['label'\].*Contract: f\(response: str, item\)") as e:
        probe_reward(bad)
    assert "\n" not in str(e.value)
    good = make_prompt_source(prompt_data=str(data), custom_rm_path=spec(plugins, "upper"))
    untouched = make_prompt_source(prompt_data=str(data))
    probe_reward(good)  # the negative control: a reward that keeps the contract passes
    assert good.next_batch(3) == untouched.next_batch(3)  # and the probe did not move the cursor
    items = good.next_batch(2)
    assert good.rewards([it.label for it in items], items) == [1.0, 1.0]
