"""EnvPool: `--env-path` environments created and stepped in a spawned worker process, every call bounded and every
value that comes back checked; the trainer holds `RemoteEnv` proxies that implement the `Environment` protocol.

    pool = EnvPool("my_envs.py:Calculator", tokenizer=tok, vocab_size=V, timeout_s=60.0)  # ValueError if it can't load
    envs = [pool(item) for item in items]      # proxies (the factory signature); the factory runs at the first reset()
    samples = run_episodes(backend, envs, sampling, max_turns=4)   # EnvError names the episode, turn, call and prompt
    pool.close()                               # also on garbage collection and at exit

The worker (r3rl.plugin_worker, shared with `--custom-rm-path` rewards) loads the module, unpickles a copy of the
trainer's tokenizer, and keeps the environment objects, keyed by an id; the factory is still called as
`factory(item, tokenizer)` and the environment's `reset()` / `step(response_ids)` are the user's, unchanged. Each
call is one round trip bounded by `timeout_s` (`--env-timeout`): the factory call, `reset()`, `step()`. A call that
raises (SystemExit and KeyboardInterrupt included), runs past the timeout (the worker is killed), or whose worker dies
fails the run with a one-line EnvError: "episode 3 turn 1: --env-path 'my_envs.py:Calculator' step() on prompt
'2+3=' (data.jsonl:4): took longer than --env-timeout 60 s; the worker was killed".

What crosses back is plain data (JSON: lists of ints, a bool, a float, a dict), checked in the worker (for a clear
message: numpy/torch integers become ints there) and again here, strictly, before anything reaches the episode or
torch: prompt and observation ids a list of ints in [0, vocab_size), `done` a bool, `reward` a finite number, `info`
a dict of JSON data. The worker never sees the trainer's model, optimizer or metrics.

Why 60 s by default (`DEFAULT_ENV_TIMEOUT_S`), and its own flag rather than `--reward-timeout`: a step is a tool
call (a calculator: microseconds; a sandboxed code run or a search: seconds), the same scale as a reward; a minute
leaves room for those while a hang still ends the run within a minute. It is a separate flag because the two are
different code with different costs (a code-executing environment beside an exact-match reward), and the error names
the flag to raise. Built-in task environments (`--task guess`) are r3rl's own code and run in the trainer's process.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import pickle
import weakref

from r3rl.episodes import EnvError, EnvStep, load_env_factory
from r3rl.plugin_worker import LOAD_TIMEOUT_S, PluginWorker, WorkerFailure, check_timeout
from r3rl.tasks.base import PromptItem
from r3rl.tasks.rewards import describe_item

__all__ = ["EnvPool", "RemoteEnv", "DEFAULT_ENV_TIMEOUT_S", "ids_problem", "step_problem"]

DEFAULT_ENV_TIMEOUT_S = 60.0
"""Seconds one environment call (factory, reset, step) may take; see the module docstring for why."""

STEP_FIELDS = ("observation_ids", "done", "reward", "context_ids", "info")


class EnvPool:
    """`spec` ("module:Class" or "path/to/file.py:factory") loaded in one worker; calling the pool with a prompt item
    gives a `RemoteEnv` (the factory signature `(item, tokenizer)`: the tokenizer argument is ignored, the worker
    has its own copy of the one given here)."""

    def __init__(self, spec: str, *, tokenizer=None, vocab_size: int | None = None,
                 timeout_s: float = DEFAULT_ENV_TIMEOUT_S, load_timeout_s: float = LOAD_TIMEOUT_S) -> None:
        self.spec, self.timeout_s = spec, check_timeout(timeout_s, "--env-timeout")
        self.vocab_size = vocab_size
        try:
            tok = None if tokenizer is None else pickle.dumps(tokenizer)
        except Exception as e:
            raise ValueError(f"--env-path {spec!r}: the tokenizer cannot be sent to the environment worker "
                             f"({type(e).__name__}: {e})") from None
        self._worker = PluginWorker("r3rl.env_pool:serve_envs", spec, flag="--env-path", name="environment",
                                    setup={"tokenizer": tok, "vocab_size": vocab_size}, call_timeout_s=self.timeout_s,
                                    load_timeout_s=load_timeout_s)
        self._proc, self.load_s = self._worker.proc, self._worker.load_s
        self._next_id = 0
        self._dropped: list[int] = []  # ids of proxies gone: the worker forgets them with the next request

    def __call__(self, item: PromptItem, tokenizer=None) -> RemoteEnv:
        env = RemoteEnv(self, self._next_id, item)
        weakref.finalize(env, self._dropped.append, self._next_id).atexit = False
        self._next_id += 1
        return env

    def close(self) -> None:
        self._worker.close()

    # --- private ----------------------------------------------------------------------------------------------------
    def _call(self, env: RemoteEnv, op: str, arg, call: str):
        if self._worker.closed:
            raise EnvError(f"--env-path {self.spec!r}: the environment worker was stopped (after an earlier failure, "
                           "or closed)")
        drop, self._dropped[:] = self._dropped[:], []
        try:
            self._worker.send((op, env.env_id, arg, drop))
            return self._worker.receive(self.timeout_s, timeout_flag="--env-timeout", doing=f"in {call}")
        except WorkerFailure as e:
            self._fail(env, call, str(e))

    def _fail(self, env: RemoteEnv, call: str, problem: str):
        self.close()
        raise EnvError(f"--env-path {self.spec!r} {call} on {describe_item(env.item)}: {problem}") from None


class RemoteEnv:
    """One environment living in an EnvPool's worker (the `Environment` protocol); each call bounded and checked."""

    def __init__(self, pool: EnvPool, env_id: int, item: PromptItem) -> None:
        self._pool, self.env_id, self.item = pool, env_id, item
        self._made = False

    def reset(self) -> list[int]:
        if not self._made:  # the factory runs here: its failure is then named with the episode (run_episodes)
            self._pool._call(self, "make", self.item, "the factory call")
            self._made = True
        ids = self._pool._call(self, "reset", None, "reset()")
        problem = ids_problem(ids, "reset()'s prompt ids", self._pool.vocab_size, nonempty=True)
        if problem is not None:
            self._pool._fail(self, "reset()", problem)
        return ids

    def step(self, response_ids: list[int]) -> EnvStep:
        if not self._made:  # the caller's mistake, not the environment's: the worker goes on
            raise EnvError(f"--env-path {self._pool.spec!r} step() on {describe_item(self.item)}: called before "
                           "reset()")
        fields = self._pool._call(self, "step", [int(t) for t in response_ids], "step()")
        problem = step_problem(fields, self._pool.vocab_size)
        if problem is not None:
            self._pool._fail(self, "step()", problem)
        return EnvStep(**fields)


def ids_problem(value, name: str, vocab_size: int | None, *, nonempty: bool = False) -> str | None:
    """None when `value` is a list of ints in [0, vocab_size) (non-empty if asked), else what is wrong with it."""
    if type(value) is not list:
        return f"{name} = {_short(value)} ({type(value).__name__}): expected a list of int token ids"
    if nonempty and not value:
        return f"{name} is empty: expected at least one token id"
    for k, t in enumerate(value):
        if type(t) is not int:
            return f"{name}[{k}] = {_short(t)} ({type(t).__name__}): expected an int token id"
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            return f"{name}[{k}] = {t}: outside the vocabulary [0, {vocab_size})"
    return None


def step_problem(fields, vocab_size: int | None) -> str | None:
    """None when `fields` are an EnvStep's, as plain data within the contract, else what is wrong with them."""
    if type(fields) is not dict or set(fields) != set(STEP_FIELDS):
        return f"sent {_short(fields)}: expected an EnvStep's fields {STEP_FIELDS}"
    problem = ids_problem(fields["observation_ids"], "EnvStep.observation_ids", vocab_size)
    if problem is None and fields["context_ids"] is not None:
        problem = ids_problem(fields["context_ids"], "EnvStep.context_ids", vocab_size)
    if problem is not None:
        return problem
    done, reward, info = fields["done"], fields["reward"], fields["info"]
    if type(done) is not bool:
        return f"EnvStep.done = {_short(done)} ({type(done).__name__}): expected a bool"
    if type(reward) not in (int, float) or not math.isfinite(reward):
        return f"EnvStep.reward = {_short(reward)} ({type(reward).__name__}): expected a finite number"
    if type(info) is not dict:
        return f"EnvStep.info = {_short(info)} ({type(info).__name__}): expected a dict"
    return None


# --- the worker process --------------------------------------------------------------------------------------------
def serve_envs(spec: str, setup: dict):
    """In the worker: load the factory and the tokenizer; return the handler of make/reset/step requests (one reply
    each), the environments kept here by id."""
    factory = load_env_factory(spec)
    tokenizer = None if setup["tokenizer"] is None else pickle.loads(setup["tokenizer"])
    vocab_size, envs = setup["vocab_size"], {}

    def handle(request):
        op, env_id, arg, drop = request
        for gone in drop:
            envs.pop(gone, None)
        if op == "make":
            env = factory(arg, tokenizer)
            if not (callable(getattr(env, "reset", None)) and callable(getattr(env, "step", None))):
                yield "bad", (f"the factory returned {_short(env)} ({type(env).__name__}), which has no callable "
                              "reset() and step() (the Environment protocol, r3rl.episodes)")
                return
            envs[env_id] = env
            yield "ok", None
        elif op == "reset":
            ids = _plain_ids(envs[env_id].reset())
            problem = ids_problem(ids, "reset()'s prompt ids", vocab_size, nonempty=True)
            yield ("bad", problem) if problem is not None else ("ok", ids)
        elif op == "step":
            step = envs[env_id].step(arg)
            if not isinstance(step, EnvStep):
                yield "bad", f"step() returned {_short(step)} ({type(step).__name__}): expected an EnvStep"
                return
            fields = _plain_step(step)
            problem = step_problem(fields, vocab_size) or _json_problem(fields["info"])
            yield ("bad", problem) if problem is not None else ("ok", fields)
        else:
            raise ValueError(f"unknown request {op!r}")

    return handle


def _plain_ids(value):
    """Token ids as a list of Python ints where each is an integer (numpy/torch integers too, not bools); anything
    else is left as it is, for `ids_problem` to name."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        return value
    return [_index(t) for t in value]


def _index(t):
    if isinstance(t, bool):
        return t
    try:
        return operator.index(t)
    except TypeError:  # a float, a string, a float tensor ...: named by ids_problem
        return t


def _plain_step(step: EnvStep) -> dict:
    """The step's fields with numpy/torch scalars made Python ones (a done computed as `guess == secret` on numpy
    ints is a numpy bool); values that are no ids, bool or number stay as they are, for `step_problem` to name."""
    done, reward = step.done, step.reward
    if not isinstance(done, bool) and getattr(done, "shape", None) == () and str(getattr(done, "dtype", "")) in (
            "bool", "torch.bool"):
        done = bool(done)
    if isinstance(reward, numbers.Real) and not isinstance(reward, bool):
        reward = float(reward)
    return {"observation_ids": _plain_ids(step.observation_ids), "done": done, "reward": reward,
            "context_ids": None if step.context_ids is None else _plain_ids(step.context_ids), "info": step.info}


def _json_problem(info: dict) -> str | None:
    try:
        json.dumps(info, allow_nan=False)
    except (TypeError, ValueError) as e:
        return f"EnvStep.info is not JSON data ({type(e).__name__}: {e})"
    return None


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
