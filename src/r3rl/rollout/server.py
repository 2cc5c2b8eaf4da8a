"""`r3rl serve`: the rollout engine behind SGLang's `/generate` protocol (FastAPI + uvicorn).

    r3rl serve --model /tmp/tiny --port 30000                       # the CLI calls serve_main()
    python -m r3rl.rollout.server --model /tmp/tiny --port 30000    # same, without the CLI (tests use this)
    curl -s localhost:30000/generate -d '{"input_ids": [72, 105], "sampling_params": {"max_new_tokens": 4}}'

Endpoints: `POST /generate` (messages in `r3rl.rollout.protocol`, docs in docs/protocol.md), `GET /health`,
`GET /model_info` (also at SGLang's `/get_model_info`).

Threading: the engine is not thread-safe, so one `EngineWorker` thread owns it and loops
`add pending requests -> step() -> resolve futures` (via `loop.call_soon_threadsafe`), sleeping on a condition when
idle. HTTP handlers only validate, submit and await. Continuous batching happens inside `engine.step()`.

Errors: a bad request is a 400 `{"error": {"message", "field", "type", "code"}}` naming the field; the server stays
up. Shutdown on SIGTERM/SIGINT: uvicorn stops accepting, waits for in-flight requests (the worker keeps stepping
them), then the lifespan stops the worker and the process exits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import signal
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from r3rl.rollout.engine import EngineOutput, EngineRequest, RolloutEngine, SamplingParams
from r3rl.rollout.protocol import (
    ErrorBody,
    ErrorResponse,
    FinishReason,
    GenerateBatch,
    GenerateItem,
    GenerateResponse,
    MetaInfo,
    ModelInfo,
    ProtocolError,
    RoutedExpertsFormat,
    parse_generate_request,
)

__all__ = ["ServerConfig", "EngineWorker", "EngineUnavailable", "create_app", "serve", "serve_main"]

logger = logging.getLogger("r3rl.rollout.server")  # not __name__: also "python -m"

_SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "seed")
MAX_STEP_FAILURES = 3  # consecutive failed engine steps before the worker gives up (a persistent fault)


@dataclass(kw_only=True)
class ServerConfig:
    model: str
    """Local HF checkpoint directory (see `r3rl init-model`)."""
    host: str = "127.0.0.1"
    """Interface to bind; 0.0.0.0 exposes the server to the network."""
    port: int = 30000
    """TCP port (SGLang's default)."""
    max_slots: int = 64
    """Sequences decoded together by the engine (continuous batching)."""
    max_seq_len: int = 1024
    """Prompt + completion tokens per sequence at most."""
    device: str | None = None
    """Engine device; None lets the engine choose (cuda if available)."""
    dtype: str | None = None
    """Engine dtype name ('bfloat16', 'float32'); None lets the engine choose."""
    drain_timeout_s: float = 120.0
    """On SIGTERM/SIGINT, seconds to wait for in-flight requests before exiting anyway."""
    log_level: str = "info"
    """Python/uvicorn log level."""


class EngineUnavailable(RuntimeError):
    """The engine worker is stopping or has failed; the request was not run (HTTP 503)."""


class EngineWorker:
    """Owns the engine and the one thread that touches it. `submit` is called from the event loop."""

    def __init__(self, engine: RolloutEngine, *, stats_every_s: float = 30.0) -> None:
        self.engine = engine
        self.error: BaseException | None = None
        self.weight_version = int(engine.weight_version)
        self._cond = threading.Condition()
        self._pending: deque[tuple[EngineRequest, asyncio.Future]] = deque()
        self._inflight: dict[str, asyncio.Future] = {}  # touched by the worker thread only
        self._stopping = False
        self._stats_every_s = stats_every_s
        self._thread = threading.Thread(target=self._run, name="r3rl-engine", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def start(self) -> None:
        self._thread.start()

    def submit(self, req: EngineRequest) -> asyncio.Future[EngineOutput]:
        fut = asyncio.get_running_loop().create_future()
        with self._cond:
            if self._stopping or self.error is not None:
                raise EngineUnavailable(f"engine is not accepting requests: stopping={self._stopping}, "
                                        f"error={self.error!r}")
            self._pending.append((req, fut))
            self._cond.notify()
        return fut

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then end the thread (waits at most `timeout` seconds)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("engine worker still running after %.1fs; exiting without it", timeout or 0.0)

    # --- worker thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        steps = tokens = failures = 0
        last_log = time.monotonic()
        while True:
            with self._cond:
                while not self._pending and not self._inflight and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending and not self._inflight:
                    return
                new, self._pending = list(self._pending), deque()
            for req, fut in new:
                try:
                    self.engine.add_request(req)
                except Exception as e:  # engine validation (ValueError naming the field) -> that request only
                    _resolve(fut, error=e)
                    continue
                self._inflight[req.request_id] = fut
            if not self._inflight:
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
                    _resolve(fut, error=EngineUnavailable(f"engine step failed: {e!r}"))
                self._inflight.clear()
                continue
            steps += 1
            for out in outs:
                fut = self._inflight.pop(out.request_id, None)
                if fut is None:
                    logger.error("engine returned an unknown request_id=%s (not in flight)", out.request_id)
                    continue
                self.weight_version = int(out.weight_version)
                tokens += len(out.output_ids)
                _resolve(fut, result=out)
            if self._inflight and not self.engine.has_work():
                self._fail_all(RuntimeError(
                    f"engine has no work but {len(self._inflight)} requests are in flight (lost by the engine)"))
                return
            if time.monotonic() - last_log > self._stats_every_s:
                logger.info("engine steps=%d generated_tokens=%d running=%d", steps, tokens, len(self._inflight))
                last_log = time.monotonic()

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            self.error = error
            pending, self._pending = list(self._pending), deque()
        for fut in [*self._inflight.values(), *(f for _, f in pending)]:
            _resolve(fut, error=EngineUnavailable(f"engine failed: {error!r}"))
        self._inflight.clear()


@dataclass(kw_only=True)
class _ServerState:
    config: ServerConfig
    worker: EngineWorker
    tokenizer: object | None
    info: ModelInfo


def create_app(config: ServerConfig, engine: RolloutEngine, tokenizer=None) -> FastAPI:
    """The FastAPI app serving `engine`. The worker thread starts and stops with the app's lifespan."""
    device, dtype = str(engine.device), str(engine.dtype)
    info = ModelInfo(
        model_path=str(config.model), num_layers=engine.num_layers, top_k=engine.top_k,
        num_experts=engine.num_experts, vocab_size=engine.vocab_size, max_seq_len=engine.max_seq_len,
        weight_version=engine.weight_version, dtype=dtype, device=device,
    )
    state = _ServerState(config=config, worker=EngineWorker(engine), tokenizer=tokenizer, info=info)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        logger.info("serving %s: layers=%d top_k=%d experts=%d vocab=%d max_seq_len=%d device=%s dtype=%s",
                    info.model_path, info.num_layers, info.top_k, info.num_experts, info.vocab_size,
                    info.max_seq_len, device, dtype)
        yield
        logger.info("shutting down: in-flight HTTP requests are drained, stopping the engine worker")
        await asyncio.to_thread(state.worker.stop, config.drain_timeout_s)

    app = FastAPI(title="r3rl rollout server", lifespan=lifespan)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not state.worker.alive:
            return _error(503, f"engine worker is down: {state.worker.error!r}", None, "ServiceUnavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info() -> ModelInfo:
        return info.model_copy(update={"weight_version": state.worker.weight_version})

    @app.post("/generate")
    async def generate(request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError; so is
            # an integer literal over Python's digit limit
            raise ProtocolError(f"request body must be valid JSON: {e}", "body") from None
        batch = parse_generate_request(body)
        reqs = [_engine_request(state, batch, item) for item in batch.items]  # all validated before any runs
        results = await asyncio.gather(*(state.worker.submit(r) for r in reqs), return_exceptions=True)
        for item, res in zip(batch.items, results, strict=True):
            if isinstance(res, ValueError):  # engine-side validation: name the field it mentions
                raise ProtocolError(str(res), _guess_field(str(res), item)) from res
            if isinstance(res, BaseException):
                raise res
        latency = time.perf_counter() - start
        out = [_response(state, batch, item, res, latency).model_dump(exclude_none=True)
               for item, res in zip(batch.items, results, strict=True)]
        return JSONResponse(out if batch.is_batch else out[0])

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, e: ProtocolError) -> JSONResponse:
        logger.info("400 %s: field=%s %s", request.url.path, e.field, e.message)
        return _error(400, e.message, e.field)

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(request: Request, e: EngineUnavailable) -> JSONResponse:
        return _error(503, str(e), None, "ServiceUnavailable")

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), None, "HTTPError")

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return _error(500, f"{type(e).__name__}: {e}", None, "InternalServerError")

    return app


def serve(config: ServerConfig) -> None:
    """Load the engine and tokenizer, then serve until SIGTERM/SIGINT (graceful: in-flight requests finish)."""
    import uvicorn

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = RolloutEngine.from_pretrained(config.model, max_slots=config.max_slots, max_seq_len=config.max_seq_len,
                                           device=config.device, dtype=config.dtype)
    app = create_app(config, engine, _load_tokenizer(config.model))
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level, access_log=False,
                        timeout_graceful_shutdown=config.drain_timeout_s)
    with _quiet_signals_after_drain():
        uvicorn.Server(uv).run()  # its own SIGTERM/SIGINT handlers: first = drain and exit, second SIGINT = now
    logger.info("server stopped")


def serve_main(model: str, host: str, port: int, max_slots: int, max_seq_len: int, device: str | None,
               dtype: str | None) -> None:
    """Entry point of `r3rl serve` (the CLI maps its flags onto these arguments)."""
    serve(ServerConfig(model=model, host=host, port=port, max_slots=max_slots, max_seq_len=max_seq_len,
                       device=device, dtype=dtype))


# --- private helpers ------------------------------------------------------------------------------------------------
def _engine_request(state: _ServerState, batch: GenerateBatch, item: GenerateItem) -> EngineRequest:
    """Tokenize and check one item against the model; raise ProtocolError naming the field."""
    info, sp = state.info, item.sampling
    if item.input_ids is not None:
        ids = item.input_ids
    elif state.tokenizer is None:
        raise ProtocolError(f"this checkpoint has no tokenizer ({info.model_path}): send input_ids", item.prompt_field)
    else:
        ids = list(state.tokenizer.encode(item.text))
    if not ids:
        raise ProtocolError("prompt must have at least one token: got 0", item.prompt_field)
    bad = next((j for j, t in enumerate(ids) if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        field = f"{item.prompt_field}[{bad}]" if item.input_ids is not None else item.prompt_field
        raise ProtocolError(f"token id must be in [0, vocab_size={info.vocab_size}): got {ids[bad]}", field)
    if len(ids) >= info.max_seq_len:
        raise ProtocolError(f"prompt must be shorter than the context (max_seq_len) to leave room for a generated "
                            f"token: got prompt_tokens={len(ids)}, max_seq_len={info.max_seq_len}", item.prompt_field)
    if len(ids) + sp.max_new_tokens > info.max_seq_len:
        raise ProtocolError(f"prompt_tokens + max_new_tokens must be <= max_seq_len: got {len(ids)} + "
                            f"{sp.max_new_tokens} = {len(ids) + sp.max_new_tokens}, expected <= {info.max_seq_len}",
                            f"{item.sampling_field}.max_new_tokens")
    bad = next((j for j, t in enumerate(sp.stop_token_ids) if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        raise ProtocolError(f"stop token id must be in [0, vocab_size={info.vocab_size}): got "
                            f"{sp.stop_token_ids[bad]}", f"{item.sampling_field}.stop_token_ids[{bad}]")
    sampling = SamplingParams(max_new_tokens=sp.max_new_tokens, temperature=sp.temperature, top_p=sp.top_p,
                              top_k=sp.top_k, stop_token_ids=list(sp.stop_token_ids), seed=item.seed)
    try:
        sampling.validate(info.vocab_size)
    except ValueError as e:
        raise ProtocolError(str(e), _guess_field(str(e), item)) from None
    return EngineRequest(request_id=uuid.uuid4().hex, input_ids=list(ids), sampling=sampling,
                         return_routed_experts=batch.return_routed_experts)


def _response(state: _ServerState, batch: GenerateBatch, item: GenerateItem, out: EngineOutput,
              latency: float) -> GenerateResponse:
    info = state.info
    n_prompt, n_out = len(out.prompt_ids), len(out.output_ids)
    if out.finish_reason == "stop":
        finish = FinishReason(type="stop", matched=out.output_ids[-1])
    else:
        finish = FinishReason(type=out.finish_reason, length=n_out)
    meta = MetaInfo(id=item.rid or out.request_id, prompt_tokens=n_prompt, completion_tokens=n_out,
                    finish_reason=finish, weight_version=out.weight_version, e2e_latency=round(latency, 6))
    if batch.return_logprob:
        if len(out.output_logprobs) != n_out:
            raise RuntimeError(f"engine must return one logprob per output token: got {len(out.output_logprobs)}, "
                               f"expected {n_out}")
        meta.output_token_logprobs = [(float(lp), int(t), None) for lp, t in zip(out.output_logprobs, out.output_ids,
                                                                                 strict=True)]
    if batch.return_routed_experts:
        if out.trace is None:
            raise RuntimeError("engine returned no routing trace for a request with return_routed_experts")
        trace = out.trace.validate(num_tokens=n_prompt + n_out, num_layers=info.num_layers, top_k=info.top_k,
                                   num_experts=info.num_experts, sample=meta.id)
        if batch.routed_experts_format is RoutedExpertsFormat.COMPACT:
            meta.routed_experts = base64.b64encode(trace.to_bytes()).decode("ascii")
        else:
            meta.routed_experts = trace.to_sglang()
        meta.routed_experts_format = batch.routed_experts_format
    text = state.tokenizer.decode(out.output_ids, skip_special_tokens=True) if state.tokenizer is not None else ""
    return GenerateResponse(text=text, output_ids=list(out.output_ids), meta_info=meta)


def _resolve(fut: asyncio.Future, *, result=None, error: BaseException | None = None) -> None:
    """Complete `fut` on its own event loop, from any thread; a cancelled future (client gone) is skipped."""

    def done() -> None:
        if not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        fut.get_loop().call_soon_threadsafe(done)


def _guess_field(message: str, item: GenerateItem) -> str:
    for name in _SAMPLING_FIELDS:
        if name in message:
            return f"{item.sampling_field}.{name}"
    return item.prompt_field if "input_ids" in message or "prompt" in message else item.sampling_field


def _error(status: int, message: str, field: str | None, kind: str = "BadRequestError") -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, field=field, type=kind, code=status))
    return JSONResponse(body.model_dump(), status_code=status)


def _load_tokenizer(path: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # a checkpoint without a tokenizer still serves input_ids
        logger.warning("no tokenizer loaded from %s (%s): text input is rejected, text output is empty", path, e)
        return None


@contextlib.contextmanager
def _quiet_signals_after_drain():
    """uvicorn re-raises the stop signal after its graceful shutdown, into the handlers it found. Let it find
    no-op handlers, so a drained server logs its last line and exits 0 instead of dying by the signal."""
    if threading.current_thread() is not threading.main_thread():  # uvicorn handles no signals there either
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m r3rl.rollout.server", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--max-slots", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--drain-timeout-s", type=float, default=120.0)
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    serve(ServerConfig(model=a.model, host=a.host, port=a.port, max_slots=a.max_slots, max_seq_len=a.max_seq_len,
                       device=a.device, dtype=a.dtype, drain_timeout_s=a.drain_timeout_s, log_level=a.log_level))


if __name__ == "__main__":
    _main()
