"""RolloutClient: async HTTP client for `r3rl serve` or a real SGLang server; returns `Sample`s with their traces.

    async with RolloutClient("http://127.0.0.1:30000") as client:
        samples = await client.generate([[72, 105], [33]], {"max_new_tokens": 16, "temperature": 1.0, "seed": 0})
    samples = generate_sync("http://127.0.0.1:30000", [[72, 105]], {"max_new_tokens": 16})   # from sync code

Against a real SGLang server (`--enable-return-routed-experts`), whose model info has no MoE shape, pass the local
policy's: `RolloutClient(url, model_shape=ModelShape.of_model(policy))` (layers, top-k, experts, and which decoder
layers are MoE: SGLang's trace has a column per decoder layer). `r3rl serve` reports its shape; a given one must
agree with it.

Both servers' responses go through ONE decode path, `decode_generate_output` (decode.py, with `ModelShape` and the
error types; re-exported here): output ids, `output_token_logprobs` (SGLang layout, checked against the ids),
`routed_experts` (base64 int32, or r3rl's compact encoding) decoded and validated into a `RoutingTrace` of
`len(prompt) + len(output) - 1` rows, finish reason and weight version.

Retries (`max_retries` times, exponential backoff `backoff * 2**i` seconds): a request is resent only when it
provably did not run: it never left (connect errors, pool timeout) or the server answered 503 ServiceUnavailable
(not admitted to the engine). GETs are read-only and are also resent after other transport errors and 5xx. A 4xx
is the caller's bug (`RolloutRequestError` at once); a timeout is never resent (the server may still be working).
Idle pooled connections expire after `KEEPALIVE_EXPIRY_S`, well before the server closes them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import httpx
from pydantic import ValidationError

from r3rl.rollout.engine.messages import GREEDY_TEMPERATURE, SamplingParams
from r3rl.rollout.net.decode import (
    ModelShape,
    RolloutHTTPError,
    RolloutRequestError,
    RolloutServerError,
    decode_generate_output,
    weight_version_int,
)
from r3rl.rollout.net.protocol import ModelInfo, RoutedExpertsFormat
from r3rl.rollout.net.wire import validation_error
from r3rl.sample import Sample

__all__ = [
    "ModelShape",
    "RolloutClient",
    "RolloutHTTPError",
    "RolloutRequestError",
    "RolloutServerError",
    "decode_generate_output",
    "weight_version_int",
    "generate_sync",
    "wait_until_healthy",
]

logger = logging.getLogger(__name__)

_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # the request provably did not leave
_SGLANG_NAMES = {"seed": "sampling_seed"}  # r3rl name -> SGLang name, so one payload fits both servers
KEEPALIVE_EXPIRY_S = 2.0
"""Idle pooled connections are dropped after this; well below the server's keep-alive (r3rl serve: 75 s, uvicorn's
default: 5 s), so the client never reuses a connection the server is closing."""
NOT_RUN_ERROR = "ServiceUnavailable"
"""Error `type` of a 503 whose request never reached the engine: the only server error a POST is resent after."""

SamplingLike = SamplingParams | dict


class RolloutClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 600.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        model_shape: ModelShape | None = None,
        routed_experts_format: RoutedExpertsFormat | str = RoutedExpertsFormat.BASE64_INT32,
        logprobs_at_temperature: bool = False,
        max_connections: int = 512,
        keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
        transport: httpx.AsyncBaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        """`timeout` bounds one HTTP attempt (a long generation needs a long one); `max_retries` counts retries
        after the first attempt. `model_shape`: the local model's (`ModelShape.of_model`), used when the server's
        `/model_info` has no MoE shape (SGLang) and checked against it when it has (r3rl serve). `transport` is for
        tests (httpx.MockTransport). `api_key` (default: $R3RL_API_KEY) is sent as `Authorization: Bearer` (the
        server's `--api-key`)."""
        if max_retries < 0 or backoff < 0:
            raise ValueError(f"max_retries and backoff must be >= 0: got {max_retries}, {backoff}")
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff = backoff
        self.routed_experts_format = RoutedExpertsFormat(routed_experts_format)
        self.logprobs_at_temperature = logprobs_at_temperature
        self._local_shape = model_shape
        self._shape: ModelShape | None = None
        self._is_r3rl: bool | None = None
        api_key = api_key if api_key is not None else os.environ.get("R3RL_API_KEY")
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, transport=transport,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                                keepalive_expiry=keepalive_expiry_s),
        )

    async def __aenter__(self) -> RolloutClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- endpoints ----------------------------------------------------------------------------------------------
    async def health(self) -> bool:
        """True when the server answers `/health` with 200 (one attempt, no retries)."""
        try:
            return (await self._http.get("/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def model_info(self) -> dict[str, Any]:
        """r3rl's `/model_info` (SGLang has `/get_model_info`, without the MoE shape)."""
        return await self._request("GET", "/model_info")

    async def model_shape(self) -> ModelShape:
        """The shape traces are decoded against: the server's (r3rl serve), else the local one given (SGLang)."""
        if self._shape is None:
            try:
                raw = await self.model_info()
            except RolloutRequestError as e:  # 4xx: a server without /model_info
                raw, why = None, str(e)
            served = None
            if isinstance(raw, dict) and "num_experts" in raw:
                try:
                    info = ModelInfo.model_validate(raw)
                except ValidationError as e:
                    raise RolloutRequestError(f"{self.base_url}/model_info breaks the protocol: "
                                              f"{validation_error(e).message}") from None
                served = ModelShape(num_layers=info.num_layers, top_k=info.top_k, num_experts=info.num_experts)
            elif raw is not None:
                why = f"fields {sorted(raw) if isinstance(raw, dict) else type(raw).__name__}"
            local = self._local_shape
            if served is None and local is None:
                raise RolloutRequestError(
                    f"{self.base_url}/model_info has no MoE shape ({why}), as SGLang's: pass the local policy's "
                    "(RolloutClient(..., model_shape=ModelShape.of_model(model)))")
            if served is not None and local is not None and served.moe_shape() != local.moe_shape():
                raise RolloutRequestError(
                    f"{self.base_url} serves a model of MoE shape (layers, top_k, experts)={served.moe_shape()}, "
                    f"the local policy's is {local.moe_shape()}: not the same model")
            self._shape = served or local
        return self._shape

    async def get_model_info(self) -> dict[str, Any]:
        """`GET /get_model_info`, which both servers have (SGLang's carries `weight_version`, a string)."""
        return await self._request("GET", "/get_model_info")

    async def is_r3rl_server(self) -> bool:
        """True for `r3rl serve` (its model info has the MoE shape), False for SGLang. Asked once, then cached."""
        if self._is_r3rl is None:
            try:
                self._is_r3rl = "num_experts" in await self.model_info()
            except RolloutRequestError:
                self._is_r3rl = False
        return self._is_r3rl

    async def update_weights_from_disk(
        self,
        model_path: str,
        *,
        weight_version: str | None = None,
        load_format: str | None = None,
        abort_all_requests: bool = False,
        flush_cache: bool = True,
    ) -> dict[str, Any]:
        """SGLang's `POST /update_weights_from_disk`: the server loads the HF checkpoint at `model_path` (a path on
        the server's file system) and serves it from its next engine step on. Raises `RolloutRequestError` when the
        server answers `success: false` (its message names the bad tensors or field); returns the answer."""
        payload = {"model_path": str(model_path), "load_format": load_format, "abort_all_requests": abort_all_requests,
                   "weight_version": weight_version, "flush_cache": flush_cache}
        try:
            answer = await self._request("POST", "/update_weights_from_disk", payload)
        except RolloutRequestError as e:
            raise RolloutRequestError(f"update_weights_from_disk({model_path}) failed: {e}", status=e.status,
                                      field=e.field) from e
        if not isinstance(answer, dict) or answer.get("success") is not True:
            raise RolloutRequestError(f"update_weights_from_disk({model_path}) failed: {answer}")
        return answer

    async def generate(
        self,
        input_ids_list: Sequence[Sequence[int]],
        sampling_params: SamplingLike | Sequence[SamplingLike] | None = None,
        *,
        return_routed_experts: bool = True,
        rids: Sequence[str] | None = None,
        routed_experts_start_len: Sequence[int] | None = None,
    ) -> list[Sample]:
        """Generate one Sample per prompt in one `/generate` call. `sampling_params` is one `SamplingParams` (or
        dict of SGLang names) for all prompts, or one per prompt; `seed` is sent as SGLang's `sampling_seed`.

        Log-probs: with `logprobs_at_temperature` (client option), `r3rl serve` is asked for log-probs at the
        sampling temperature; a SGLang server returns whatever its SGLANG_RETURN_ORIGINAL_LOGPROB says, and the
        option must state that (False when it is 1). Each Sample's `logprob_temperature` says which it holds."""
        prompts = [list(map(int, p)) for p in input_ids_list]
        if not prompts:
            return []
        per_item = sampling_params is not None and not isinstance(sampling_params, dict | SamplingParams)
        sps = [_wire_sampling(sp) for sp in (sampling_params if per_item else [sampling_params or {}])]
        if per_item and len(sps) != len(prompts):
            raise ValueError(f"sampling_params list must have one entry per prompt: got {len(sps)}, expected "
                             f"{len(prompts)}")
        shape = await self.model_shape() if return_routed_experts else None
        payload: dict[str, Any] = {"input_ids": prompts, "return_logprob": True,
                                   "return_routed_experts": return_routed_experts,
                                   "sampling_params": sps if per_item else sps[0]}
        if rids is not None:
            payload["rid"] = list(rids)
        starts = [0] * len(prompts) if routed_experts_start_len is None else list(map(int, routed_experts_start_len))
        if len(starts) != len(prompts):
            raise ValueError(f"routed_experts_start_len must have one entry per prompt: got {len(starts)}, expected "
                             f"{len(prompts)}")
        if any(starts):  # SGLang's field; only rows [start, seqlen - 1) come back
            payload["routed_experts_start_len"] = starts
        if return_routed_experts and self.routed_experts_format is not RoutedExpertsFormat.BASE64_INT32:
            payload["routed_experts_format"] = self.routed_experts_format.value
        if self.logprobs_at_temperature and await self.is_r3rl_server():
            payload["logprobs_at_temperature"] = True
        outputs = await self._request("POST", "/generate", payload)
        if not isinstance(outputs, list) or len(outputs) != len(prompts):
            got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
            raise RolloutServerError(f"/generate must return one output per prompt: got {got}, "
                                     f"expected {len(prompts)}")
        samples = []
        for i, (out, prompt) in enumerate(zip(outputs, prompts, strict=True)):
            temperature = float(sps[i if per_item else 0].get("temperature", 1.0))
            assumed = temperature if self.logprobs_at_temperature and temperature > GREEDY_TEMPERATURE else 1.0
            samples.append(decode_generate_output(out, prompt, shape=shape, index=i,
                                                  require_trace=return_routed_experts, logprob_temperature=assumed,
                                                  routed_experts_start_len=starts[i]))
        return samples

    # --- private ------------------------------------------------------------------------------------------------
    async def _request(self, method: str, path: str, payload: Any = None, *, idempotent: bool | None = None) -> Any:
        """One call with retries. Resent only when the request provably did not run: it was never sent (connect
        errors, pool timeout), or the server answered 503 ServiceUnavailable (not admitted). GETs are read-only, so
        they are also resent after other transport errors and 5xx; a timeout is never resent."""
        idempotent = method == "GET" if idempotent is None else idempotent
        error: RolloutHTTPError | None = None
        for attempt in range(self.max_retries + 1):
            try:
                resp = await self._http.request(method, path, json=payload)
            except _NEVER_SENT as e:
                error = RolloutServerError(f"{method} {self.base_url}{path} failed: {type(e).__name__}: {e}")
            except httpx.HTTPError as e:  # sent, maybe running (a read timeout: the server may still be generating)
                error = RolloutServerError(f"{method} {self.base_url}{path} failed: {type(e).__name__}: {e}")
                if not idempotent or isinstance(e, httpx.TimeoutException):
                    raise error from e
            else:
                if resp.status_code < 400:
                    try:
                        return resp.json()
                    except ValueError as e:
                        raise RolloutServerError(f"{method} {self.base_url}{path}: response is not JSON "
                                                 f"(status {resp.status_code}): {resp.text[:200]!r}") from e
                error = _http_error(method, self.base_url + path, resp)
                if resp.status_code < 500 or not (idempotent or error.kind == NOT_RUN_ERROR):
                    raise error
            if attempt < self.max_retries:
                delay = self.backoff * 2**attempt
                logger.warning("retry %d/%d in %.2fs: %s", attempt + 1, self.max_retries, delay, error)
                await asyncio.sleep(delay)
        raise error


def generate_sync(
    base_url: str,
    input_ids_list: Sequence[Sequence[int]],
    sampling_params: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    **client_kwargs,
) -> list[Sample]:
    """Blocking convenience: open a client, generate, close (not for use inside a running event loop)."""

    async def run() -> list[Sample]:
        async with RolloutClient(base_url, **client_kwargs) as client:
            return await client.generate(input_ids_list, sampling_params)

    return asyncio.run(run())


def wait_until_healthy(base_url: str, *, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll `GET /health` until it answers 200 (a server just started). Raises RuntimeError when `proc` (the server's
    process) exits first or `timeout_s` passes; callers add their log tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server at {base_url} exited with {proc.returncode} during startup")
        try:
            if httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server at {base_url} did not answer /health within {timeout_s:.0f} s")


# --- private helpers ------------------------------------------------------------------------------------------------
def _wire_sampling(sp: SamplingLike) -> dict[str, Any]:
    """A SamplingParams or dict -> the `sampling_params` JSON both servers take (SGLang names)."""
    if isinstance(sp, SamplingParams):
        sp = {"max_new_tokens": sp.max_new_tokens, "temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k,
              "stop_token_ids": list(sp.stop_token_ids), **({"seed": sp.seed} if sp.seed is not None else {})}
    return {_SGLANG_NAMES.get(k, k): v for k, v in sp.items()}


def _http_error(method: str, url: str, resp: httpx.Response) -> RolloutHTTPError:
    kind = None
    try:
        body = resp.json()
        err = body.get("error", body if "message" in body else {})  # SGLang's update answers {success, message}
        message, field = (err.get("message"), err.get("field")) if isinstance(err, dict) else (str(err), None)
        kind = err.get("type") if isinstance(err, dict) else None
    except (ValueError, AttributeError):
        message, field = resp.text[:500], None
    cls = RolloutRequestError if resp.status_code < 500 else RolloutServerError
    where = f" (field {field})" if field else ""
    return cls(f"{method} {url} -> {resp.status_code}{where}: {message}", status=resp.status_code, field=field,
               kind=kind)
