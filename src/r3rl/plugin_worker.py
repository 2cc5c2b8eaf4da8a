"""PluginWorker: user code (a `--custom-rm-path` reward, an `--env-path` environment) loaded and called in a spawned
worker process, every wait bounded; shared by r3rl.tasks.reward_pool and r3rl.env_pool, which say what they send and
how they check what comes back.

    worker = PluginWorker("r3rl.env_pool:serve_envs", "my_envs.py:Calc", flag="--env-path", name="environment",
                          setup={...}, call_timeout_s=60.0)   # loads the plug-in in the worker (ValueError if it can't)
    worker.send(request)                                       # trainer -> worker: any picklable value
    payload = worker.receive(60.0, timeout_flag="--env-timeout", doing="in step()")   # WorkerFailure on any failure
    worker.close()                                             # also on garbage collection and at exit

Why a process, as the field does it (verl's process-pool reward managers, OpenRLHF's remote reward models): a
plug-in is arbitrary code. Called in the trainer's process, a `sys.exit(0)` in it ended the run as a success after
0 steps, and a hang blocked the run forever without a word. In the worker:
  - every exception is a failure, SystemExit and KeyboardInterrupt included (the worker ignores SIGINT, so a Ctrl-C
    belongs to the trainer, which then ends the worker);
  - a call that runs past its timeout gets the worker killed (SIGKILL), and the caller's error names what it waited
    for;
  - a worker that dies (os._exit, a crash, the OOM killer) is a failure naming the call it was in;
  - what comes back is JSON, decoded with `json.loads`: lists, numbers, strings, bools, None and dicts, which the
    caller then checks against its contract. Unpickling can run code and hand over any object; JSON can do neither,
    so nothing the worker sends (even bytes a plug-in writes onto the socket itself) reaches the trainer's objects.
After a failure the worker is killed and stays closed: the run fails, it does not go on with a half-dead plug-in.

The worker is a fresh interpreter (`python -c`, as multiprocessing's "spawn" starts one, but without re-running the
trainer's `__main__`, which spawn does and which breaks for `python - <script` or an unguarded script; not forked: no
copy of the trainer's CUDA context or threads). It gets the trainer's sys.path and working directory, imports this
module and the handler's, talks over a socketpair (the plug-in's prints go to the trainer's stdout/stderr, not into
the protocol), and exits when the trainer closes the socket or stops running. The handler (`module:function`,
called in the worker as `function(spec, setup)`) loads the plug-in and returns `handle(request)`, which yields one
reply per bounded call: ("ok", JSON data) or ("bad", "what is wrong with the value"). This isolates mistakes; it is
not a sandbox against a hostile plug-in (the plug-in runs as the user, as the flags always did).
"""

from __future__ import annotations

import contextlib
import importlib
import json
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
from multiprocessing.connection import Connection

__all__ = ["PluginWorker", "WorkerFailure", "LOAD_TIMEOUT_S", "check_timeout", "describe_exception"]

LOAD_TIMEOUT_S = 60.0
"""Starting the worker and loading the plug-in, at least: starting Python and importing torch/transformers and the
plug-in is not the plug-in's call, and on a loaded machine it can take seconds more than a short per-call timeout."""

MAX_MESSAGE_BYTES = 1 << 26
"""A reply larger than this (64 MiB) is refused: no observation or score is that large."""

_WORKER = "import sys; from r3rl.plugin_worker import _worker_main; _worker_main(int(sys.argv[1]))"
_R3RL_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class WorkerFailure(RuntimeError):
    """One call failed (the one-line problem: timed out, exited, raised, sent a bad value); the worker is closed.
    Callers add where (the flag, the prompt, the episode) and raise their own error type."""


def check_timeout(value, flag: str) -> float:
    """`value` as seconds: a finite number > 0, else a ValueError naming `flag`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{flag} must be a finite number of seconds > 0: got {value!r}")
    return float(value)


class PluginWorker:
    """One spawned worker process that loads `spec` with `handler` and answers requests one at a time."""

    def __init__(self, handler: str, spec: str, *, flag: str, name: str, setup=None, call_timeout_s: float,
                 load_timeout_s: float = LOAD_TIMEOUT_S) -> None:
        self.spec, self.flag, self.name = spec, flag, name
        mine, theirs = socket.socketpair()
        env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what spawn passes on
        with theirs:
            self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(theirs.fileno())],
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        self._conn = Connection(mine.detach())
        self.closed = False
        self._finalizer = weakref.finalize(self, _stop, self.proc, self._conn)
        t0 = time.monotonic()
        load_timeout_s = max(call_timeout_s, load_timeout_s)
        try:
            self._conn.send((handler, spec, flag, setup, os.getpid()))
        except (OSError, EOFError, ValueError):
            self._load_failed(f"the {name} worker exited (exit code {self.exitcode()}) before loading it")
        if not self._conn.poll(load_timeout_s):
            self._load_failed(f"loading it took longer than {load_timeout_s:g} s (module-level code that never "
                              "returns?); the worker was killed")
        try:
            kind, payload = _decode(self._conn.recv_bytes(MAX_MESSAGE_BYTES))
        except (EOFError, OSError):
            self._load_failed(f"the {name} worker exited (exit code {self.exitcode()}) while loading it")
        except WorkerFailure as e:
            self._load_failed(str(e))
        if kind != "ready":
            self.close()
            raise ValueError(str(payload))  # the loader's one-line error, which names the flag and spec
        self.load_s = time.monotonic() - t0

    def send(self, request) -> None:
        """Send one request (pickled: this side is trusted); WorkerFailure when the worker is gone."""
        try:
            self._conn.send(request)
        except (OSError, EOFError, ValueError):
            problem = f"the {self.name} worker is gone (exit code {self.exitcode()})"
            self.close()
            raise WorkerFailure(problem) from None

    def receive(self, timeout_s: float, *, timeout_flag: str, doing: str):
        """The next reply's payload, waiting at most `timeout_s`; WorkerFailure (and the worker killed) when it
        timed out, the worker exited, the plug-in raised, or it sent a value its handler refused ("bad")."""
        if not self._conn.poll(timeout_s):
            self.close()
            raise WorkerFailure(f"took longer than {timeout_flag} {timeout_s:g} s; the worker was killed")
        try:
            kind, payload = _decode(self._conn.recv_bytes(MAX_MESSAGE_BYTES))
        except (EOFError, OSError) as e:  # the worker is gone (EOF, connection reset), or the length was refused
            code = self.exitcode()
            self.close()
            if code is None and "bad message length" in str(e):  # multiprocessing.connection's words for it
                raise WorkerFailure(f"the {self.name} worker sent a reply over {MAX_MESSAGE_BYTES} bytes") from None
            raise WorkerFailure(f"the {self.name} worker exited (exit code {code}) while {doing}") from None
        except WorkerFailure:
            self.close()
            raise
        if kind == "ok":
            return payload
        self.close()
        raise WorkerFailure(payload if isinstance(payload, str) else f"the {self.name} worker sent {kind!r}")

    def exitcode(self):
        try:
            return self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        self.closed = True
        self._finalizer()

    # --- private ----------------------------------------------------------------------------------------------------
    def _load_failed(self, problem: str):
        self.close()
        raise ValueError(f"{self.flag} {self.spec!r}: {problem}") from None


def describe_exception(e: BaseException) -> str:
    """"ValueError: bad label at my_rm.py:12": the exception and the last frame outside r3rl (the plug-in's)."""
    if isinstance(e, SystemExit):
        what = f"SystemExit({e.code!r}) (the plug-in called sys.exit)"
    else:
        text = str(e).strip().splitlines()
        what = f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
    frames = traceback.extract_tb(e.__traceback__)
    user = [f for f in frames if not os.path.abspath(f.filename).startswith(_R3RL_DIR)]
    where = (user or frames)[-1] if frames else None
    return what + (f" at {where.filename}:{where.lineno}" if where is not None else "")


def _decode(data: bytes) -> tuple[str, object]:
    """A reply as (kind, payload); WorkerFailure unless it is JSON of the shape [str, value]."""
    try:
        msg = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise WorkerFailure(f"the worker sent a reply that is not JSON ({len(data)} bytes starting "
                            f"{bytes(data[:16])!r}); only plain data crosses back") from None
    if not (isinstance(msg, list) and len(msg) == 2 and isinstance(msg[0], str)):
        raise WorkerFailure(f"the worker sent a malformed reply: {str(msg)[:80]}")
    return msg[0], msg[1]


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
        handler, spec, flag, setup, parent_pid = conn.recv()
    except (EOFError, OSError):
        return
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        module, _, fn = handler.partition(":")
        handle = getattr(importlib.import_module(module), fn)(spec, setup)
    except ValueError as e:  # the loader's one-line errors (module not found, not callable, wrong signature, ...)
        _send(conn, ("load_error", str(e)))
        return
    except BaseException as e:  # module-level code that exits or raises something the loader does not catch
        _send(conn, ("load_error", f"{flag} {spec!r}: loading it raised {describe_exception(e)}"))
        return
    _send(conn, ("ready", None))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the trainer closed the socket
            return
        try:
            for reply in handle(request):
                _send(conn, reply)
        except BaseException as e:  # SystemExit and KeyboardInterrupt too: from user code, they are failures
            _send(conn, ("error", f"raised {describe_exception(e)}"))
            return


def _send(conn: Connection, reply: tuple[str, object]) -> None:
    conn.send_bytes(json.dumps(reply).encode())


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)  # the trainer is gone (even kill -9): do not outlive it, even inside a hung call
