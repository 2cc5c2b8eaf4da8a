"""RewardPool: a user reward plug-in (`--custom-rm-path`) run in a spawned worker process, every call bounded.

    pool = RewardPool("my_rm.py:reward", timeout_s=60.0)   # loads the plug-in in the worker (ValueError if it can't)
    pool.batch(responses, items) -> list[float]            # RewardError names the prompt on any failure
    pool(response, item) -> float
    pool.close()                                           # also on garbage collection and at exit

Why a process, as the field does it (verl's process-pool reward managers, OpenRLHF's remote reward models): a
plug-in is arbitrary code. Called in the trainer's process, a `sys.exit(0)` in it ended the run as a success after
0 steps, and a hang blocked the run forever without a word. In the worker:
  - every exception is a failure, SystemExit and KeyboardInterrupt included (the worker ignores SIGINT, so a Ctrl-C
    belongs to the trainer, which then ends the worker);
  - a call that runs past `timeout_s` gets the worker killed (SIGKILL), and the run fails naming the prompt;
  - a worker that dies (os._exit, a crash, the OOM killer) fails the run naming the prompt it was scoring;
  - a return value is checked against the contract (rewards.py) in the worker and again in the trainer; only a plain
    float crosses back.
After a failure the pool is closed: the run fails (exit 1), it does not go on with a half-dead reward.

The worker is a fresh interpreter (`python -c`, as multiprocessing's "spawn" starts one, but without re-running the
trainer's `__main__`, which spawn does and which breaks for `python - <script` or an unguarded script; not forked: no
copy of the trainer's CUDA context or threads). It gets the trainer's sys.path and working directory, imports only
`r3rl.tasks`, talks over a socketpair (the plug-in's prints go to the trainer's stdout/stderr, not into the
protocol), and exits when the trainer closes the socket or stops running. One worker scores a batch in order, one
call at a time (the timeout is per call, so it names the prompt and does not depend on the batch size), with one
message out per batch and one back per call. This isolates mistakes; it is not a sandbox against a hostile plug-in (the
plug-in runs as the user, as `--custom-rm-path` always did).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Sequence
from multiprocessing.connection import Connection

from r3rl.tasks.base import PromptItem
from r3rl.tasks.rewards import RewardError, describe_item, load_reward_fn, reward_value_problem

__all__ = ["RewardPool", "DEFAULT_REWARD_TIMEOUT_S"]

DEFAULT_REWARD_TIMEOUT_S = 60.0
LOAD_TIMEOUT_S = 60.0  # starting the worker and importing the plug-in, at least (see __init__)
"""Per call. Built-in rewards take microseconds and a math verifier milliseconds; a minute leaves room for a
sandboxed code run or a slow remote judge while a hang still ends the run within a minute of it starting."""

_WORKER = "import sys; from r3rl.tasks.reward_pool import _worker_main; _worker_main(int(sys.argv[1]))"


class RewardPool:
    """`spec` ("module:function" or "path/to/file.py:function") loaded and called in one spawned worker process."""

    def __init__(self, spec: str, *, timeout_s: float = DEFAULT_REWARD_TIMEOUT_S,
                 load_timeout_s: float = LOAD_TIMEOUT_S) -> None:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not (
                math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"--reward-timeout must be a finite number of seconds > 0: got {timeout_s!r}")
        self.spec, self.timeout_s = spec, float(timeout_s)
        mine, theirs = socket.socketpair()
        env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what spawn passes on
        with theirs:
            self._proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(theirs.fileno())],
                                          pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        self._conn = Connection(mine.detach())
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._conn)
        t0 = time.monotonic()
        self._conn.send((spec, os.getpid()))
        # starting Python and importing the plug-in is not the plug-in's call: on a loaded machine it can take seconds
        # more than a short per-call timeout, so loading gets at least LOAD_TIMEOUT_S
        load_timeout_s = max(self.timeout_s, load_timeout_s)
        if not self._conn.poll(load_timeout_s):
            self.close()
            raise ValueError(f"--custom-rm-path {spec!r}: loading it took longer than {load_timeout_s:g} s "
                             f"(module-level code that never returns?); the worker was killed")
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            code = self._exitcode()
            self.close()
            raise ValueError(f"--custom-rm-path {spec!r}: the reward worker exited (exit code {code}) while "
                             "loading it") from None
        if msg[0] != "ready":
            self.close()
            raise ValueError(msg[1])
        self.load_s = time.monotonic() - t0

    def __call__(self, response: str, item: PromptItem) -> float:
        return self.batch([response], [item])[0]

    def batch(self, responses: Sequence[str], items: Sequence[PromptItem]) -> list[float]:
        """The rewards of (responses[i], items[i]), in order; RewardError (naming the prompt) on any failure."""
        if len(responses) != len(items):
            raise ValueError(f"reward batch: {len(responses)} responses for {len(items)} items")
        if self._closed:
            raise RewardError(f"--custom-rm-path {self.spec!r}: the reward worker was stopped (after an earlier "
                              "failure, or closed)")
        if not items:
            return []
        try:
            self._conn.send(("batch", list(responses), list(items)))
        except (OSError, EOFError, ValueError):
            self._fail(items[0], f"the reward worker is gone (exit code {self._exitcode()})")
        out = []
        for item in items:
            if not self._conn.poll(self.timeout_s):
                self._fail(item, f"took longer than --reward-timeout {self.timeout_s:g} s; the worker was killed")
            try:
                kind, payload = self._conn.recv()
            except (EOFError, OSError):
                self._fail(item, f"the reward worker exited (exit code {self._exitcode()}) while scoring it")
            if kind == "ok":
                problem = reward_value_problem(payload)  # the worker checked it; a plain float is all we accept
                if problem is not None or type(payload) is not float:
                    self._fail(item, problem or f"sent a {type(payload).__name__}, not a float")
                out.append(payload)
            else:  # "bad" (a value outside the contract) or "error" (an exception, SystemExit included)
                self._fail(item, payload)
        return out

    def close(self) -> None:
        self._closed = True
        self._finalizer()

    # --- private ----------------------------------------------------------------------------------------------------
    def _fail(self, item: PromptItem, problem: str):
        self.close()
        raise RewardError(f"--custom-rm-path {self.spec!r} on {describe_item(item)}: {problem}")

    def _exitcode(self):
        try:
            return self._proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return None


def _stop(proc: subprocess.Popen, conn: Connection) -> None:
    """Kill the worker (it may be hung in the plug-in) and close the socket; safe to call twice."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)
    conn.close()


# --- the worker process --------------------------------------------------------------------------------------------
def _worker_main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's; it ends this worker
    conn = Connection(fd)
    try:
        spec, parent_pid = conn.recv()
    except (EOFError, OSError):
        return
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        fn = load_reward_fn(spec).fn
    except ValueError as e:  # the loader's one-line errors (module not found, not callable, wrong signature, ...)
        conn.send(("load_error", str(e)))
        return
    except BaseException as e:  # module-level code that exits or raises something the loader does not catch
        conn.send(("load_error", f"--custom-rm-path {spec!r}: loading it raised {_describe(e)}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            _, responses, items = conn.recv()
        except (EOFError, OSError):  # the trainer closed the pipe
            return
        for response, item in zip(responses, items, strict=True):
            try:
                value = fn(response, item)
            except BaseException as e:  # SystemExit and KeyboardInterrupt too: from user code, they are failures
                conn.send(("error", f"raised {_describe(e)}"))
                return
            problem = reward_value_problem(value)
            conn.send(("bad", problem) if problem is not None else ("ok", float(value)))


def _describe(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        what = f"SystemExit({e.code!r}) (the plug-in called sys.exit)"
    else:
        text = str(e).strip().splitlines()
        what = f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
    frames = traceback.extract_tb(e.__traceback__)
    user = [f for f in frames if "/r3rl/tasks/" not in f.filename.replace("\\", "/")]
    where = (user or frames)[-1] if frames else None
    return what + (f" at {where.filename}:{where.lineno}" if where is not None else "")


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)  # the trainer is gone (even kill -9): do not outlive it, even inside a hung call
