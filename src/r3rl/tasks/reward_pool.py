"""RewardPool: a user reward plug-in (`--custom-rm-path`) run in a spawned worker process, every call bounded.

    pool = RewardPool("my_rm.py:reward", timeout_s=60.0)   # loads the plug-in in the worker (ValueError if it can't)
    pool.batch(responses, items) -> list[float]            # RewardError names the prompt on any failure
    pool(response, item) -> float
    pool.close()                                           # also on garbage collection and at exit

The worker and why it is one: r3rl.plugin_worker (shared with `--env-path` environments, r3rl.env_pool). A call that
raises (SystemExit and KeyboardInterrupt included), runs past `timeout_s` (the worker is killed), kills its process,
or returns a value outside the contract (rewards.py) fails the run naming the prompt; the value is checked in the
worker and again in the trainer, and only a plain float crosses back. After a failure the pool is closed: the run
fails (exit 1), it does not go on with a half-dead reward.

One worker scores a batch in order, one call at a time (the timeout is per call, so it names the prompt and does not
depend on the batch size), with one message out per batch and one back per call.
"""

from __future__ import annotations

from collections.abc import Sequence

from r3rl.plugin_worker import LOAD_TIMEOUT_S, PluginWorker, WorkerFailure, check_timeout
from r3rl.tasks.base import PromptItem
from r3rl.tasks.rewards import RewardError, describe_item, load_reward_fn, reward_value_problem

__all__ = ["RewardPool", "DEFAULT_REWARD_TIMEOUT_S"]

DEFAULT_REWARD_TIMEOUT_S = 60.0
"""Per call. Built-in rewards take microseconds and a math verifier milliseconds; a minute leaves room for a
sandboxed code run or a slow remote judge while a hang still ends the run within a minute of it starting."""


class RewardPool:
    """`spec` ("module:function" or "path/to/file.py:function") loaded and called in one spawned worker process."""

    def __init__(self, spec: str, *, timeout_s: float = DEFAULT_REWARD_TIMEOUT_S,
                 load_timeout_s: float = LOAD_TIMEOUT_S) -> None:
        self.spec, self.timeout_s = spec, check_timeout(timeout_s, "--reward-timeout")
        self._worker = PluginWorker("r3rl.tasks.reward_pool:serve_reward", spec, flag="--custom-rm-path",
                                    name="reward", call_timeout_s=self.timeout_s, load_timeout_s=load_timeout_s)
        self._proc, self.load_s = self._worker.proc, self._worker.load_s

    def __call__(self, response: str, item: PromptItem) -> float:
        return self.batch([response], [item])[0]

    def batch(self, responses: Sequence[str], items: Sequence[PromptItem]) -> list[float]:
        """The rewards of (responses[i], items[i]), in order; RewardError (naming the prompt) on any failure."""
        if len(responses) != len(items):
            raise ValueError(f"reward batch: {len(responses)} responses for {len(items)} items")
        if self._worker.closed:
            raise RewardError(f"--custom-rm-path {self.spec!r}: the reward worker was stopped (after an earlier "
                              "failure, or closed)")
        if not items:
            return []
        out: list[float] = []
        try:
            self._worker.send(("batch", list(responses), list(items)))
            while len(out) < len(items):
                value = self._worker.receive(self.timeout_s, timeout_flag="--reward-timeout", doing="scoring it")
                problem = reward_value_problem(value)  # the worker checked it; a plain float is all we accept
                if problem is not None or type(value) is not float:
                    raise WorkerFailure(problem or f"sent a {type(value).__name__}, not a float")
                out.append(value)
        except WorkerFailure as e:  # the item being scored: the first one not scored
            self.close()
            raise RewardError(f"--custom-rm-path {self.spec!r} on {describe_item(items[len(out)])}: {e}") from None
        return out

    def close(self) -> None:
        self._worker.close()


# --- the worker process --------------------------------------------------------------------------------------------
def serve_reward(spec: str, setup: None):
    """In the worker: load the plug-in; return the handler that scores a batch, one reply per call."""
    fn = load_reward_fn(spec).fn

    def handle(request):
        _, responses, items = request
        for response, item in zip(responses, items, strict=True):
            value = fn(response, item)
            problem = reward_value_problem(value)
            yield ("bad", problem) if problem is not None else ("ok", float(value))

    return handle
