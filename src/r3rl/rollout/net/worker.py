"""EngineWorker: the one thread that owns a RolloutEngine inside `r3rl serve`.

    worker = EngineWorker(engine); worker.start()
    out = await worker.submit(request)                     # from the event loop: an EngineOutput, or raises
    version = await worker.call(lambda e: e.update_weights(tensors, strict=True))   # between two steps

The engine is not thread-safe, so only this thread touches it. It loops: take what the event loop queued (new
requests, commands such as a weight update, cancellations of requests whose client went away) -> `engine.step()` ->
resolve the step's futures (one `loop.call_soon_threadsafe` per step, not per request), sleeping on a condition when
idle. A command runs between two steps, never concurrently with one.

Admission (`AdmissionConfig`): every engine step that admits requests runs a prefill before its decode, and on CUDA
that prefill is eager (no graph), a fixed cost per step. When requests trickle in one or two per step while hundreds
run, that cost lands on nearly every step. With `max_hold_steps` > 0 the worker holds new requests while the engine
is busy, until they are `min_batch_fraction` of the running ones or have waited that many steps, so prefills come in
batches. `stats()` counts steps, prefill steps, the mean decode batch and step times (served at `/server_info`).

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
from dataclasses import dataclass
from typing import Any

from r3rl.rollout.engine.engine import RolloutEngine
from r3rl.rollout.engine.messages import EngineOutput, EngineRequest

__all__ = ["MAX_STEP_FAILURES", "AdmissionConfig", "EngineWorker", "EngineUnavailable", "EngineStepFailed",
           "RequestAborted"]

logger = logging.getLogger("r3rl.rollout.server")

MAX_STEP_FAILURES = 3  # consecutive failed engine steps before the worker gives up (a persistent fault)


class EngineUnavailable(RuntimeError):
    """The engine worker is stopping or has failed; the request was not run (HTTP 503 ServiceUnavailable)."""


class EngineStepFailed(RuntimeError):
    """The engine step running the request failed, or the engine lost it (HTTP 503 EngineStepFailed)."""


class RequestAborted(RuntimeError):
    """The request was aborted while in the engine: weight update with abort_all_requests, or a forced stop."""


@dataclass(kw_only=True, frozen=True)
class AdmissionConfig:
    """When the worker hands new requests to the engine (see the module docstring)."""

    max_hold_steps: int = 0
    """Engine steps a new request may be held back while others run, so that admissions (prefills) come in batches;
    0 = hand every request over at once. Nothing is held while the engine is idle or the worker is stopping."""
    min_batch_fraction: float = 0.125
    """Held requests are admitted as soon as they number this fraction of the requests in the engine (at least 1)."""

    def __post_init__(self) -> None:
        if self.max_hold_steps < 0:
            raise ValueError(f"AdmissionConfig.max_hold_steps must be >= 0: got {self.max_hold_steps}")
        if not 0 <= self.min_batch_fraction <= 1:
            raise ValueError(f"AdmissionConfig.min_batch_fraction must be in [0, 1]: got {self.min_batch_fraction}")


@dataclass(kw_only=True)
class _Stats:
    """Counters of the worker thread (plain numbers: read without a lock, a snapshot may be a step stale)."""

    steps: int = 0
    prefill_steps: int = 0  # steps that admitted requests (a prefill ran before the decode)
    admitted: int = 0
    generated_tokens: int = 0
    finished: int = 0
    decoded_rows: int = 0  # sum over steps of the requests decoded in it
    step_s: float = 0.0
    prefill_step_s: float = 0.0  # time of the steps that admitted requests
    idle_s: float = 0.0  # waiting for work
    held: int = 0  # requests that were held back at least one step


class EngineWorker:
    """Owns the engine and the one thread that touches it. `submit`, `call` and `cancel` are called from the event
    loop; `stop` and `abort_now` from any thread."""

    def __init__(self, engine: RolloutEngine, *, stats_every_s: float = 30.0,
                 admission: AdmissionConfig | None = None) -> None:
        self.engine = engine
        self.admission = admission or AdmissionConfig()
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
        self._stats = _Stats()
        self._held_steps = 0  # steps the oldest pending request has been held
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="r3rl-engine", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def weight_version(self) -> int:
        return int(self.engine.weight_version)  # an int attribute read: safe from any thread

    def start(self) -> None:
        self._thread.start()

    def stats(self) -> dict[str, Any]:
        """Counters since start: steps, prefill steps, admitted and finished requests, generated tokens, the mean
        decode batch and step times (decode-only steps vs steps that also prefilled), busy and idle seconds, and the
        totals behind those means (decoded rows, seconds in steps that prefilled), so a client can difference two
        snapshots exactly."""
        st = _Stats(**vars(self._stats))  # a copy: the worker thread keeps counting
        decode_only = st.steps - st.prefill_steps
        return {
            "steps": st.steps, "prefill_steps": st.prefill_steps, "admitted": st.admitted, "finished": st.finished,
            "generated_tokens": st.generated_tokens, "held_requests": st.held,
            "mean_batch": st.decoded_rows / st.steps if st.steps else 0.0,
            "mean_step_ms": 1e3 * st.step_s / st.steps if st.steps else 0.0,
            "mean_decode_only_step_ms": 1e3 * (st.step_s - st.prefill_step_s) / decode_only if decode_only else 0.0,
            "mean_prefill_step_ms": 1e3 * st.prefill_step_s / st.prefill_steps if st.prefill_steps else 0.0,
            "step_s": st.step_s, "prefill_step_s": st.prefill_step_s, "decoded_rows": st.decoded_rows,
            "idle_s": st.idle_s, "uptime_s": time.monotonic() - self._started,
            "max_hold_steps": self.admission.max_hold_steps,
        }

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
        st, failures = self._stats, 0
        last_log = time.monotonic()
        while True:
            with self._cond:
                while not (self._pending or self._commands or self._cancels or self._inflight or self._stopping):
                    t0 = time.perf_counter()
                    self._cond.wait()
                    st.idle_s += time.perf_counter() - t0
                if self._abort_reason is not None:
                    self._abort_everything(self._abort_reason)
                    return
                if self._stopping and not (self._pending or self._commands or self._inflight):
                    return
                commands, self._commands = list(self._commands), deque()
                cancels, self._cancels = self._cancels, []
                dropped_pending = self._drop_pending(cancels) if cancels else []
                new = self._take_admissions()
            for fn, fut in commands:
                try:
                    _resolve(fut, result=fn(self.engine))
                except Exception as e:  # the command's own error goes to its caller
                    _resolve(fut, error=e)
            done: list[tuple[asyncio.Future, Any, BaseException | None]] = []
            for req, fut in new:
                try:
                    self.engine.add_request(req)
                except Exception as e:  # engine validation (ValueError naming the field) -> that request only
                    done.append((fut, None, e))
                    continue
                self._inflight[req.request_id] = fut
            if cancels:
                dropped = self.engine.abort(cancels)
                aborted = RequestAborted("client disconnected")
                done += [(self._inflight.pop(rid), None, aborted) for rid in dropped]
                done += [(fut, None, aborted) for fut in dropped_pending]
                logger.info("cancelled %d requests whose client went away", len(dropped) + len(dropped_pending))
            if not self._inflight:
                _resolve_many(done)
                self.num_running = 0
                continue
            waiting = self.engine.num_waiting
            t0 = time.perf_counter()
            try:
                outs = self.engine.step()
                failures = 0
            except Exception as e:
                # Fail what was running, reset the engine and go on: one poisoned step must not take the server
                # down. A fault that persists (MAX_STEP_FAILURES steps in a row) marks the engine dead.
                _resolve_many(done)
                failures += 1
                logger.exception("engine step failed (%d in a row); failing %d in-flight requests", failures,
                                 len(self._inflight))
                if failures >= MAX_STEP_FAILURES:
                    self._fail_all(e)
                    return
                self.engine.abort_all()
                _resolve_many([(fut, None, EngineStepFailed(f"engine step failed: {e!r}"))
                               for fut in self._inflight.values()])
                self._inflight.clear()
                continue
            elapsed = time.perf_counter() - t0
            admitted = max(0, waiting - self.engine.num_waiting)
            st.steps += 1
            st.step_s += elapsed
            if admitted:
                st.prefill_steps += 1
                st.admitted += admitted
                st.prefill_step_s += elapsed
            st.decoded_rows += self.engine.num_running + len(outs)
            for out in outs:
                fut = self._inflight.pop(out.request_id, None)
                if fut is None:
                    logger.error("engine returned an unknown request_id=%s (not in flight)", out.request_id)
                    continue
                st.generated_tokens += len(out.output_ids)
                st.finished += 1
                done.append((fut, out, None))
            _resolve_many(done)
            self.num_running = len(self._inflight)
            if self._inflight and not self.engine.has_work():
                self._fail_all(RuntimeError(
                    f"engine has no work but {len(self._inflight)} requests are in flight (lost by the engine)"))
                return
            if time.monotonic() - last_log > self._stats_every_s:
                logger.info("engine %s", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in self.stats().items()))
                last_log = time.monotonic()

    def _take_admissions(self) -> list[tuple[EngineRequest, asyncio.Future]]:
        """The pending requests to hand to the engine now (all, or none while they are held). Lock held."""
        if not self._pending:  # (a hold whose requests were all cancelled ends here too)
            self._held_steps = 0
            return []
        cfg, running = self.admission, len(self._inflight)
        if (cfg.max_hold_steps and running and not self._stopping and self._held_steps < cfg.max_hold_steps
                and len(self._pending) < max(1.0, cfg.min_batch_fraction * running)):
            if self._held_steps == 0:
                self._stats.held += len(self._pending)
            self._held_steps += 1
            return []
        self._held_steps = 0
        new, self._pending = list(self._pending), deque()
        return new

    def _drop_pending(self, request_ids: list[str]) -> list[asyncio.Future]:
        """Remove cancelled requests that are still held in the queue; returns their futures. Lock held."""
        ids = set(request_ids)
        gone = [fut for req, fut in self._pending if req.request_id in ids]
        if gone:
            self._pending = deque((req, fut) for req, fut in self._pending if req.request_id not in ids)
        return gone

    def _fail_all(self, error: BaseException) -> None:
        """The engine is dead: running requests failed in it, queued ones never reached it."""
        with self._cond:
            self.error = error
            pending, self._pending = list(self._pending), deque()
            commands, self._commands = list(self._commands), deque()
        msg = f"engine failed: {error!r}"  # one exception per future: a raised instance carries its traceback
        _resolve_many([(fut, None, EngineStepFailed(msg)) for fut in self._inflight.values()]
                      + [(fut, None, EngineUnavailable(msg)) for _, fut in [*pending, *commands]])
        self._inflight.clear()
        self.num_running = 0

    def _abort_everything(self, reason: str) -> None:
        """Called with the lock held."""
        pending, self._pending = list(self._pending), deque()
        commands, self._commands = list(self._commands), deque()
        msg = f"server is stopping: {reason}"
        _resolve_many([(fut, None, EngineUnavailable(msg)) for _, fut in [*pending, *commands]]
                      + [(fut, None, RequestAborted(msg)) for fut in self._inflight.values()])
        self._inflight.clear()
        self.engine.abort_all()
        self.num_running = 0

    def abort_inflight(self, reason: str) -> int:
        """Worker thread only (from a command): fail every running request with `RequestAborted`."""
        n = len(self._inflight)
        _resolve_many([(fut, None, RequestAborted(reason)) for fut in self._inflight.values()])
        self._inflight.clear()
        self.engine.abort_all()
        return n


def _resolve_many(items: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    """Complete many futures (fut, result, error) with one `call_soon_threadsafe` per event loop: a wake-up of the
    loop costs a syscall and a GIL hand-over, so a step's outputs go together."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for item in items:
        by_loop.setdefault(item[0].get_loop(), []).append(item)

    def done(batch: list) -> None:
        for fut, result, error in batch:
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(result)

    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(done, batch)


def _resolve(fut: asyncio.Future, *, result=None, error: BaseException | None = None) -> None:
    """Complete `fut` on its own event loop, from any thread; a cancelled future (client gone) is skipped."""
    _resolve_many([(fut, result, error)])
