"""EnvPool: `--env-path` environments run in a real worker process; hangs, exceptions, exits, deaths and values
outside the contract fail naming the episode, the turn, the call and the prompt, and a well-behaved environment gives
exactly the samples it gives in-process.

    pytest tests/test_env_pool.py -q

Each guard has its negative control: a slow but finite step passes the timeout; boundary values (the last token id,
reward 0, done False) pass the checks; the forged pickle that the JSON channel refuses does run code when unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import time

import numpy as np
import pytest

from r3rl.env_pool import DEFAULT_ENV_TIMEOUT_S, EnvPool, RemoteEnv, ids_problem, step_problem
from r3rl.episodes import EnvError, load_env_factory, run_episodes
from r3rl.models.presets import make_model, make_tokenizer
from r3rl.rollout import EngineBackend, SamplingParams
from r3rl.tasks import PromptItem

TOK = make_tokenizer()
VOCAB = 259  # the tiny preset's embedding rows (= len(TOK))
SAMPLING = SamplingParams(max_new_tokens=3, stop_token_ids=[TOK.eos_token_id], seed=11)
ITEMS = [PromptItem(prompt=f"calc:{a}+{b}=", label=str(a + b), metadata={"source": f"calc.jsonl:{a}"})
         for a, b in ((1, 2), (3, 4), (5, 1))]

ENVS = '''
import os, pickle, struct, sys, time
from pathlib import Path

import numpy as np

from r3rl.episodes import EnvStep


class Calc:
    """Replies with the length of the model's response as text, up to 3 turns; reward on the label's digit."""

    def __init__(self, item, tokenizer):
        self.item, self.tok, self.turn = item, tokenizer, 0
        if "R3RL_TEST_PID_FILE" in os.environ:
            with open(os.environ["R3RL_TEST_PID_FILE"], "a") as f:
                f.write(f"{os.getpid()}\\n")

    def reset(self):
        return self.tok.encode(self.item.prompt, add_special_tokens=False)

    def step(self, response_ids):
        self.turn += 1
        text = self.tok.decode(response_ids, skip_special_tokens=True)
        reward = float(self.item.label in text) / self.turn
        return EnvStep(observation_ids=self.tok.encode(f"[{len(response_ids)}]", add_special_tokens=False),
                       done=self.turn >= 3, reward=reward, info={"turn": self.turn, "text": text})


class Misbehaves(Calc):
    """Misbehaves in step() on the prompt whose label is $R3RL_TEST_BAD (the episode named in the error)."""

    def step(self, response_ids):
        if self.item.label != os.environ.get("R3RL_TEST_BAD"):
            return super().step(response_ids)
        how = os.environ["R3RL_TEST_HOW"]
        if how == "hang":
            time.sleep(3600)
        if how == "slow":
            time.sleep(0.2)
            return super().step(response_ids)
        if how == "raise":
            raise ValueError("no tool for " + self.item.prompt)
        if how == "exit":
            sys.exit(0)
        if how == "interrupt":
            raise KeyboardInterrupt
        if how == "die":
            os._exit(3)
        if how == "dict":
            return {"observation_ids": [1], "done": True, "reward": 1.0}
        if how == "done_int":
            return EnvStep(observation_ids=[1], done=1, reward=0.0)
        if how == "reward_nan":
            return EnvStep(observation_ids=[1], done=False, reward=float("nan"))
        if how == "obs_str":
            return EnvStep(observation_ids=[1, "2"], done=False)
        if how == "obs_vocab":
            return EnvStep(observation_ids=[1, 259], done=False)
        if how == "boundary":  # the negative control of the checks: every value at its edge, numpy types included
            return EnvStep(observation_ids=np.array([0, 258]), done=np.bool_(False), reward=np.float32(0.0))
        if how == "forge_json":  # bypasses the worker's check: bytes written straight onto the socket
            _write(b'["ok", {"observation_ids": [999999], "done": false, "reward": 0.0, "context_ids": null, '
                   b'"info": {}}]')
            return super().step(response_ids)
        if how == "forge_huge":  # a header announcing 1 GiB: refused before anything is read or allocated
            os.write(int(sys.argv[1]), struct.pack("!i", 1 << 30))
            return super().step(response_ids)
        if how == "forge_pickle":
            _write(pickle.dumps(("ok", Touch(os.environ["R3RL_TEST_MARKER"]))))
            return super().step(response_ids)
        raise AssertionError(how)


class Touch:
    """Unpickling it creates a file: what a pickle from the worker could do in the trainer."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _write(data):
    os.write(int(sys.argv[1]), struct.pack("!i", len(data)) + data)  # multiprocessing.Connection's framing


class NoStep:
    def __init__(self, item, tokenizer):
        pass

    def reset(self):
        return [1]


class EmptyReset(Calc):
    def reset(self):
        return []


def factory_raises(item, tokenizer):
    raise RuntimeError("no calculator for " + item.label)
'''


@pytest.fixture(scope="module")
def envs_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("envs")
    (d / "envs.py").write_text(ENVS)
    (d / "hangs_at_import.py").write_text("import time\ntime.sleep(3600)\n")
    (d / "exits_at_import.py").write_text("import sys\nsys.exit(0)\n")
    return d / "envs.py"


@pytest.fixture(scope="module")
def backend():
    b = EngineBackend(make_model("tiny-qwen3-moe", seed=1), max_slots=8, max_seq_len=128)
    yield b
    b.close()


def pool_for(envs_file, name, monkeypatch, *, how=None, bad="7", **kw) -> EnvPool:
    if how is not None:
        monkeypatch.setenv("R3RL_TEST_HOW", how)
        monkeypatch.setenv("R3RL_TEST_BAD", bad)
    return EnvPool(f"{envs_file}:{name}", tokenizer=TOK, vocab_size=VOCAB, **kw)


def test_a_well_behaved_env_gives_exactly_the_in_process_samples(envs_file, backend, tmp_path, monkeypatch):
    factory = load_env_factory(f"{envs_file}:Calc")
    local = run_episodes(backend, [factory(it, TOK) for it in ITEMS], SAMPLING, max_turns=3)
    pid_file = tmp_path / "pids"
    monkeypatch.setenv("R3RL_TEST_PID_FILE", str(pid_file))
    pool = pool_for(envs_file, "Calc", monkeypatch)
    envs = [pool(it, TOK) for it in ITEMS]
    assert all(isinstance(e, RemoteEnv) for e in envs)
    remote = run_episodes(backend, envs, SAMPLING, max_turns=3)
    assert {int(p) for p in pid_file.read_text().split()} == {pool._proc.pid} != {os.getpid()}  # made in the worker
    assert sum(s.metadata["turns"] for s in local) > len(ITEMS)  # several turns: observations crossed back
    for a, b in zip(local, remote, strict=True):
        assert (a.prompt_ids, a.response_ids, a.loss_mask, a.rollout_logprobs) == (
            b.prompt_ids, b.response_ids, b.loss_mask, b.rollout_logprobs)
        assert a.reward == b.reward and a.metadata == b.metadata and a.finish_reason == b.finish_reason
        assert np.array_equal(a.trace.expert_ids, b.trace.expert_ids)
    del envs, remote  # the worker forgets environments whose proxies are gone, with the next request
    assert len(pool._dropped) == len(ITEMS)
    more = pool(ITEMS[0])
    with pytest.raises(EnvError, match=r"step\(\) on prompt 'calc:1\+2=' \(calc\.jsonl:1\): called before reset\(\)"):
        more.step([1])
    more.reset()
    assert pool._dropped == []
    pool.close()
    with pytest.raises(EnvError, match="the environment worker was stopped"):
        more.step([1])


def test_a_hung_step_is_killed_at_the_timeout_naming_episode_turn_and_prompt(envs_file, backend, monkeypatch):
    ok = pool_for(envs_file, "Misbehaves", monkeypatch, how="slow", timeout_s=5.0)  # negative control: slow, finite
    assert len(run_episodes(backend, [ok(it) for it in ITEMS], SAMPLING, max_turns=2)) == len(ITEMS)
    ok.close()
    pool = pool_for(envs_file, "Misbehaves", monkeypatch, how="hang", timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(EnvError, match=r"^episode 1 turn 0: --env-path '.*envs\.py:Misbehaves' step\(\) on prompt "
                                       r"'calc:3\+4=' \(calc\.jsonl:3\): took longer than --env-timeout 0\.5 s; the "
                                       r"worker was killed$"):
        run_episodes(backend, [pool(it) for it in ITEMS], SAMPLING, max_turns=3)
    assert time.monotonic() - t0 < 30  # bounded, not blocked forever
    assert pool._proc.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.parametrize(("how", "message"), [
    ("raise", r"raised ValueError: no tool for calc:3\+4= at .*envs\.py:\d+"),
    ("exit", r"raised SystemExit\(0\) \(the plug-in called sys\.exit\) at .*envs\.py:\d+"),
    ("interrupt", r"raised KeyboardInterrupt at .*envs\.py:\d+"),
    ("die", r"the environment worker exited \(exit code 3\) while in step\(\)"),
    ("dict", r"step\(\) returned \{'observation_ids': \[1\].* \(dict\): expected an EnvStep"),
    ("obs_vocab", r"EnvStep\.observation_ids\[1\] = 259: outside the vocabulary \[0, 259\)"),
    ("forge_json", r"EnvStep\.observation_ids\[0\] = 999999: outside the vocabulary"),  # the trainer's own check
    ("forge_huge", r"the environment worker sent a reply over 67108864 bytes$"),
])
def test_every_step_failure_fails_naming_the_episode(envs_file, backend, monkeypatch, how, message):
    pool = pool_for(envs_file, "Misbehaves", monkeypatch, how=how)
    with pytest.raises(EnvError, match=r"^episode 1 turn 0: --env-path '.*envs\.py:Misbehaves' step\(\) on prompt "
                                       r"'calc:3\+4=' \(calc\.jsonl:3\): " + message) as e:
        run_episodes(backend, [pool(it) for it in ITEMS], SAMPLING, max_turns=3)
    assert "\n" not in str(e.value)
    assert pool._proc.wait(timeout=10) is not None  # the worker is gone and the pool does not go on
    with pytest.raises(EnvError, match="the environment worker was stopped"):
        pool(ITEMS[0]).reset()


def test_boundary_values_pass_the_checks(envs_file, backend, monkeypatch):
    """The negative control of the value checks, through the worker: id vocab-1 and 0, reward 0, done False, as
    numpy types (made plain ints, bool and float in the worker)."""
    pool = pool_for(envs_file, "Misbehaves", monkeypatch, how="boundary")
    samples = run_episodes(backend, [pool(it) for it in ITEMS], SAMPLING, max_turns=2)
    s = samples[1]
    turn0 = s.metadata["turn_spans"][0][1] - len(s.prompt_ids)
    assert s.response_ids[turn0:turn0 + 2] == [0, 258] and s.loss_mask[turn0:turn0 + 2] == [0, 0]
    pool.close()


def test_a_worker_killed_between_turns_fails_the_next_call(envs_file, backend, monkeypatch):
    pool = pool_for(envs_file, "Calc", monkeypatch)
    kill = lambda turn: os.kill(pool._proc.pid, signal.SIGKILL) if turn == 1 else None  # noqa: E731
    with pytest.raises(EnvError, match=r"^episode 0 turn 1: --env-path .* step\(\) on prompt 'calc:1\+2=' "
                                       r"\(calc\.jsonl:1\): the environment worker (exited \(exit code -9\) while in "
                                       r"step\(\)|is gone \(exit code -9\))$"):
        run_episodes(backend, [pool(it) for it in ITEMS], SAMPLING, max_turns=3, between_turns=kill)


def test_a_forged_pickle_from_the_worker_runs_nothing_in_the_trainer(envs_file, backend, monkeypatch, tmp_path):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("R3RL_TEST_MARKER", str(marker))
    pool = pool_for(envs_file, "Misbehaves", monkeypatch, how="forge_pickle")
    with pytest.raises(EnvError, match=r"episode 1 turn 0: .* the worker sent a reply that is not JSON .*only "
                                       r"plain data crosses back"):
        run_episodes(backend, [pool(it) for it in ITEMS], SAMPLING, max_turns=3)
    assert not marker.exists()
    ns: dict = {}
    exec(compile(ENVS, "envs", "exec"), ns)  # negative control: the same bytes, unpickled, do run code
    pickle.loads(pickle.dumps(("ok", ns["Touch"](str(marker)))))
    assert marker.exists()


@pytest.mark.parametrize(("name", "message"), [
    ("NoStep", r"the factory call on prompt 'calc:1\+2=' \(calc\.jsonl:1\): the factory returned <.*NoStep object.* "
               r"\(NoStep\), which has no callable reset\(\) and step\(\)"),
    ("factory_raises", r"the factory call on prompt 'calc:1\+2=' \(calc\.jsonl:1\): raised RuntimeError: no "
                       r"calculator for 3 at .*envs\.py:\d+"),
    ("EmptyReset", r"reset\(\) on prompt 'calc:1\+2=' \(calc\.jsonl:1\): reset\(\)'s prompt ids is empty"),
])
def test_factory_and_reset_failures_name_the_episode(envs_file, backend, monkeypatch, name, message):
    pool = pool_for(envs_file, name, monkeypatch)
    with pytest.raises(EnvError, match=rf"^episode 0 reset: --env-path '.*envs\.py:{name}' " + message):
        run_episodes(backend, [pool(it) for it in ITEMS], SAMPLING, max_turns=3)


@pytest.mark.parametrize(("file", "load_timeout", "message"), [
    ("exits_at_import.py", 60.0, r"loading it raised SystemExit\(0\)"),
    ("hangs_at_import.py", 3.0, r"loading it took longer than 3 s .*the worker was killed"),  # max(call, load)
    ("envs.py", 60.0, r"has no attribute 'Missing'"),
])
def test_an_env_that_cannot_load_is_a_one_line_error(envs_file, file, load_timeout, message):
    with pytest.raises(ValueError, match=r"^--env-path '.*" + message) as e:
        EnvPool(f"{envs_file.parent / file}:{'Missing' if file == 'envs.py' else 'E'}", timeout_s=0.5,
                load_timeout_s=load_timeout)
    assert "\n" not in str(e.value)


def test_the_value_checks_refuse_each_bad_value_and_pass_the_edges():
    good = {"observation_ids": [0, VOCAB - 1], "done": False, "reward": 0, "context_ids": None, "info": {}}
    assert step_problem(good, VOCAB) is None and ids_problem([5], "ids", None, nonempty=True) is None
    assert step_problem(good | {"context_ids": [1, 2], "done": True, "reward": -2.5}, VOCAB) is None
    bad = [("observation_ids", [-1], "EnvStep.observation_ids[0] = -1: outside the vocabulary [0, 259)"),
           ("observation_ids", [1, VOCAB], "EnvStep.observation_ids[1] = 259: outside the vocabulary [0, 259)"),
           ("observation_ids", [1, "2"], "EnvStep.observation_ids[1] = '2' (str): expected an int token id"),
           ("observation_ids", [True], "EnvStep.observation_ids[0] = True (bool): expected an int token id"),
           ("done", 1, "EnvStep.done = 1 (int): expected a bool"), ("done", None, "expected a bool"),
           ("reward", float("nan"), "EnvStep.reward = nan (float): expected a finite number"),
           ("reward", float("inf"), "expected a finite number"), ("reward", True, "expected a finite number"),
           ("reward", "1", "EnvStep.reward = '1' (str): expected a finite number"),
           ("context_ids", [1, 2.0], "EnvStep.context_ids[1] = 2.0 (float): expected an int token id"),
           ("info", [], "EnvStep.info = [] (list): expected a dict")]
    for name, value, message in bad:
        assert message in (step_problem(good | {name: value}, VOCAB) or ""), (name, value)
    assert "expected an EnvStep's fields" in step_problem({"observation_ids": []}, VOCAB)
    assert "expected a list of int token ids" in ids_problem((1, 2), "ids", VOCAB)
    assert "is empty" in ids_problem([], "ids", VOCAB, nonempty=True)


def test_the_timeout_flag_reaches_the_pool_and_its_default_agrees():
    import r3rl.cli
    from r3rl.cli import build_parser, train_config_from_args

    def cfg(*argv):
        return train_config_from_args(build_parser().parse_args(["train", *argv]))

    assert r3rl.cli_common.ENV_TIMEOUT_S == DEFAULT_ENV_TIMEOUT_S == cfg().env_timeout_s
    assert cfg("--env-timeout", "2.5").env_timeout_s == 2.5
    for bad in ("0", "nan"):
        with pytest.raises(ValueError, match="env_timeout_s must be a finite number > 0"):
            cfg("--env-timeout", bad)
    with pytest.raises(ValueError, match=r"--env-timeout must be a finite number of seconds > 0: got -1"):
        EnvPool("x.py:E", timeout_s=-1)


def test_train_with_env_path_runs_episodes_in_the_worker_and_a_hang_fails_the_run(envs_file, tmp_path, monkeypatch,
                                                                                   caplog):
    """`r3rl train --task guess --env-path ...`: the guess environment as a user plug-in passes with R3 verified;
    the same run with an environment that hangs ends with exit 1 and a one-line error naming the episode; one that
    cannot load fails at start, before the warm-up."""
    from r3rl.cli_train import run_train
    from r3rl.config import ReplayConfig
    from r3rl.train.config import TrainConfig

    guess = envs_file.parent / "guess_env.py"
    guess.write_text("import os\nfrom r3rl.tasks.guess import GuessEnv\n\n\ndef Guess(item, tokenizer):\n"
                     "    assert os.getpid() != int(os.environ['R3RL_TEST_TRAINER_PID'])\n"
                     "    return GuessEnv(secret=int(item.label), tokenizer=tokenizer)\n\n\n"
                     "class Hangs:\n    def __init__(self, item, tokenizer):\n"
                     "        self.env = Guess(item, tokenizer)\n"
                     "    def reset(self):\n        return self.env.reset()\n"
                     "    def step(self, response_ids):\n        import time\n        time.sleep(3600)\n")
    monkeypatch.setenv("R3RL_TEST_TRAINER_PID", str(os.getpid()))

    def cfg(name, run_dir, **kw):
        return TrainConfig(**{"task": "guess", "env_path": f"{guess}:{name}", "num_rollout": 1,
                              "rollout_batch_size": 2, "n_samples_per_prompt": 2, "rollout_max_response_len": 2,
                              "sft_steps": 0, "eval_interval": 1, "eval_prompts": 2, "run_dir": str(run_dir),
                              "progress": False, "plots": False,
                              "replay": ReplayConfig(use_rollout_routing_replay=True,
                                                     enable_r3_correctness_check=True)} | kw)

    assert run_train(cfg("Guess", tmp_path / "ok")) == 0
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["verdict"] == "pass" and summary["tokens_checked"]["replay_forward"] > 0
    rows = [json.loads(line) for line in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["turns_mean"] >= 1.0 and "eval_turns_mean" in rows[0]
    assert run_train(cfg("Hangs", tmp_path / "hang", env_timeout_s=1.0)) == 1
    error = json.loads((tmp_path / "hang" / "summary.json").read_text())["error"]
    assert error.startswith("episode 0 turn 0: --env-path ") and "took longer than --env-timeout 1 s" in error
    assert "\n" not in error
    from r3rl.train.trainer import Trainer

    with caplog.at_level("INFO"), pytest.raises(ValueError, match=r"--env-path '.*guess_env\.py:Missing': module .* "
                                                                 r"has no attribute 'Missing'"):
        Trainer(cfg("Missing", tmp_path / "missing", sft_steps=50))
    assert not any("warm-up" in m for m in caplog.messages)  # before the warm-up and any rollout

