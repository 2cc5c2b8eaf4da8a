"""EngineWorker: the one thread that owns a RolloutEngine inside `r3rl serve`.

    worker = EngineWorker(engine); worker.start()
    out = await worker.submit(request)                     # from the event loop: an EngineOutput, or raises
    version = await worker.call(lambda e: e.update_weights(tensors, strict=True))   # between two steps

The engine is not thread-safe, so only this thread touches it. It loops: take what the event loop queued (new
requests, commands such as a weight update, cancellations of requests whose client went away) -> `engine.step()` ->
resolve the futures (via `loop.call_soon_threadsafe`), sleeping on a condition when idle. A command runs between two
steps, never concurrently with one.

Failures, and how the HTTP layer answers them:
- `EngineUnavailable` (503 ServiceUnavailable): the request never reached the engine (stopping, failed, aborted
  before admission). Safe to resend.
- `EngineStepFailed` (503 EngineStepFailed): the engine step running the request failed. The worker drops what was
  running, resets the engine and serves the next requests; after MAX_STEP_FAILURES failed steps in a row it gives up
  (the worker is dead, `/health` answers 503). Requests the engine lost are failed the same way.
- `RequestAborted` (503 RequestAborted): a weight update with `abort_all_requests`, or a second stop signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from r3rl.rollout.engine import RolloutEngine
from r3rl.rollout.protocol import EngineOutput, EngineRequest

__all__ = ["MAX_STEP_FAILURES", "EngineWorker", "EngineUnavailable", "EngineStepFailed", "RequestAborted"]

logger = logging.getLogger("r3rl.rollout.server")

MAX_STEP_FAILURES = 3  # consecutive failed engine steps before the worker gives up (a persistent fault)


class EngineUnavailable(RuntimeError):
    """The engine worker is stopping or has failed; the request was not run (HTTP 503 ServiceUnavailable)."""


class EngineStepFailed(RuntimeError):
    """The engine step running the request failed, or the engine lost it (HTTP 503 EngineStepFailed)."""


class RequestAborted(RuntimeError):
    """The request was aborted while in the engine: weight update with abort_all_requests, or a forced stop."""


class EngineWorker:
    """Owns the engine and the one thread that touches it. `submit`, `call` and `cancel` are called from the event
    loop; `stop` and `abort_now` from any thread."""

    def __init__(self, engine: RolloutEngine, *, stats_every_s: float = 30.0) -> None:
        self.engine = engine
        self.error: BaseException | None = None
        self.num_running = 0  # requests inside the engine after the last step (read by /server_info)
        self._cond = threading.Condition()
        self._pending: deque[tuple[EngineRequest, asyncio.Future]] = deque()
        self._commands: deque[tuple[Callable[[RolloutEngine], Any], asyncio.Future]] = deque()
        self._cancels: list[str] = []
        self._inflight: dict[str, asyncio.Future] = {}  # touched by the worker thread only
        self._stopping = False
        self._abort_reason: str | None = None
        self._stats_every_s = stats_every_s
        self._thread = threading.Thread(target=self._run, name="r3rl-engine", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def weight_version(self) -> int:
        return int(self.engine.weight_version)  # an int attribute read: safe from any thread

    def start(self) -> None:
        self._thread.start()

    def submit(self, req: EngineRequest) -> asyncio.Future[EngineOutput]:
        return self._enqueue(self._pending, req)

    def submit_all(self, reqs: list[EngineRequest]) -> list[asyncio.Future[EngineOutput]]:
        """Queue a batch atomically: every request, or none (raises EngineUnavailable having queued nothing)."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in reqs]
        with self._cond:
            self._check_accepting()
            self._pending.extend(zip(reqs, futures, strict=True))
            self._cond.notify()
        return futures

    def call(self, fn: Callable[[RolloutEngine], Any]) -> asyncio.Future:
        """Run `fn(engine)` on the worker thread between two engine steps; the future gets its result."""
        return self._enqueue(self._commands, fn)

    def cancel(self, request_ids: list[str]) -> None:
        """Abort these requests (their client went away): the engine drops them and frees their slots."""
        with self._cond:
            self._cancels += request_ids
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then end the thread (waits at most `timeout` seconds)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("engine worker still running after %.1fs; exiting without it", timeout or 0.0)

    def abort_now(self, reason: str) -> None:
        """Fail everything queued or running with `RequestAborted` after the current step, and end the thread."""
        with self._cond:
            self._stopping = True
            self._abort_reason = reason
            self._cond.notify()

    # --- worker thread ------------------------------------------------------------------------------------------
    def _enqueue(self, queue: deque, item) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        with self._cond:
            self._check_accepting()
            queue.append((item, fut))
            self._cond.notify()
        return fut

    def _check_accepting(self) -> None:
        if self._stopping or self.error is not None:
            raise EngineUnavailable(f"engine is not accepting requests: stopping={self._stopping}, "
                                    f"error={self.error!r}")

    def _run(self) -> None:
        steps = tokens = failures = 0
        last_log = time.monotonic()
        while True:
            with self._cond:
                while not (self._pending or self._commands or self._cancels or self._inflight or self._stopping):
                    self._cond.wait()
                if self._abort_reason is not None:
                    self._abort_everything(self._abort_reason)
                    return
                if self._stopping and not (self._pending or self._commands or self._inflight):
                    return
                new, self._pending = list(self._pending), deque()
                commands, self._commands = list(self._commands), deque()
                cancels, self._cancels = self._cancels, []
            for fn, fut in commands:
                try:
                    _resolve(fut, result=fn(self.engine))
                except Exception as e:  # the command's own error goes to its caller
                    _resolve(fut, error=e)
            for req, fut in new:
                try:
                    self.engine.add_request(req)
                except Exception as e:  # engine validation (ValueError naming the field) -> that request only
                    _resolve(fut, error=e)
                    continue
                self._inflight[req.request_id] = fut
            if cancels:
                dropped = self.engine.abort(cancels)
                for rid in dropped:
                    _resolve(self._inflight.pop(rid), error=RequestAborted("client disconnected"))
                logger.info("cancelled %d requests whose client went away", len(dropped))
            if not self._inflight:
                self.num_running = 0
                continue
            try:
                outs = self.engine.step()
                failures = 0
            except Exception as e:
                # Fail what was running, reset the engine and go on: one poisoned step must not take the server
                # down. A fault that persists (MAX_STEP_FAILURES steps in a row) marks the engine dead.
                failures += 1
                logger.exception("engine step failed (%d in a row); failing %d in-flight requests", failures,
                                 len(self._inflight))
                if failures >= MAX_STEP_FAILURES:
                    self._fail_all(e)
                    return
                self.engine.abort_all()
                for fut in self._inflight.values():
                    _resolve(fut, error=EngineStepFailed(f"engine step failed: {e!r}"))
                self._inflight.clear()
                continue
            steps += 1
            for out in outs:
                fut = self._inflight.pop(out.request_id, None)
                if fut is None:
                    logger.error("engine returned an unknown request_id=%s (not in flight)", out.request_id)
                    continue
                tokens += len(out.output_ids)
                _resolve(fut, result=out)
            self.num_running = len(self._inflight)
            if self._inflight and not self.engine.has_work():
                self._fail_all(RuntimeError(
                    f"engine has no work but {len(self._inflight)} requests are in flight (lost by the engine)"))
                return
            if time.monotonic() - last_log > self._stats_every_s:
                logger.info("engine steps=%d generated_tokens=%d running=%d", steps, tokens, len(self._inflight))
                last_log = time.monotonic()

    def _fail_all(self, error: BaseException) -> None:
        """The engine is dead: running requests failed in it, queued ones never reached it."""
        with self._cond:
            self.error = error
            pending, self._pending = list(self._pending), deque()
            commands, self._commands = list(self._commands), deque()
        for fut in self._inflight.values():
            _resolve(fut, error=EngineStepFailed(f"engine failed: {error!r}"))
        for _, fut in [*pending, *commands]:
            _resolve(fut, error=EngineUnavailable(f"engine failed: {error!r}"))
        self._inflight.clear()
        self.num_running = 0

    def _abort_everything(self, reason: str) -> None:
        """Called with the lock held."""
        pending, self._pending = list(self._pending), deque()
        commands, self._commands = list(self._commands), deque()
        for _, fut in [*pending, *commands]:
            _resolve(fut, error=EngineUnavailable(f"server is stopping: {reason}"))
        for fut in self._inflight.values():
            _resolve(fut, error=RequestAborted(f"server is stopping: {reason}"))
        self._inflight.clear()
        self.engine.abort_all()
        self.num_running = 0

    def abort_inflight(self, reason: str) -> int:
        """Worker thread only (from a command): fail every running request with `RequestAborted`."""
        n = len(self._inflight)
        for fut in self._inflight.values():
            _resolve(fut, error=RequestAborted(reason))
        self._inflight.clear()
        self.engine.abort_all()
        return n


def _resolve(fut: asyncio.Future, *, result=None, error: BaseException | None = None) -> None:
    """Complete `fut` on its own event loop, from any thread; a cancelled future (client gone) is skipped."""

    def done() -> None:
        if not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        fut.get_loop().call_soon_threadsafe(done)
