"""RolloutClient: async HTTP client for `r3rl serve` or a real SGLang server; returns `Sample`s with their traces.

    async with RolloutClient("http://127.0.0.1:30000") as client:
        samples = await client.generate([[72, 105], [33]], {"max_new_tokens": 16, "temperature": 1.0, "seed": 0})
    samples = generate_sync("http://127.0.0.1:30000", [[72, 105]], {"max_new_tokens": 16})   # from sync code

Against a real SGLang server (`--enable-return-routed-experts`), which has no `num_experts` in its model info, pass
the model's shape: `RolloutClient(url, model_shape=ModelShape(num_layers=48, top_k=8, num_experts=128))`.

Both servers' responses go through ONE decode path, `decode_generate_output`: output ids, `output_token_logprobs`
(SGLang layout, checked against the ids), `routed_experts` (base64 int32, or r3rl's compact encoding) decoded and
validated into a `RoutingTrace` of `len(prompt) + len(output) - 1` rows, finish reason and weight version.

Retries: connection failures and 5xx are retried `max_retries` times with exponential backoff (`backoff * 2**i`
seconds); a 4xx is the caller's bug and raises `RolloutRequestError` at once; a read timeout is not retried (the
server may still be working on the request).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from r3rl.sample import Sample
from r3rl.trace import RoutingTrace

__all__ = [
    "ModelShape",
    "RolloutClient",
    "RolloutHTTPError",
    "RolloutRequestError",
    "RolloutServerError",
    "decode_generate_output",
    "generate_sync",
]

logger = logging.getLogger(__name__)

_RETRY_EXCEPTIONS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.PoolTimeout)
_SGLANG_NAMES = {"seed": "sampling_seed"}  # r3rl name -> SGLang name, so one payload fits both servers


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What a trace is validated against: MoE layers, experts per token, routed experts per layer."""

    num_layers: int
    top_k: int
    num_experts: int
    moe_layers: tuple[int, ...] | None = None
    """Decoder indices of the MoE layers, for a SGLang server on a model with dense layers: its trace has one
    column per decoder layer (`num_decoder_layers`), and only these are kept (`RoutingReplay.decoder_layers`)."""
    num_decoder_layers: int | None = None


class RolloutHTTPError(RuntimeError):
    """The server answered with an error (or could not be reached)."""

    def __init__(self, message: str, *, status: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


class RolloutRequestError(RolloutHTTPError):
    """4xx: the request is invalid (`field` names what); never retried."""


class RolloutServerError(RolloutHTTPError):
    """5xx or connection failure, after all retries."""


class RolloutClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 600.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        model_shape: ModelShape | None = None,
        routed_experts_format: str = "base64_int32",
        max_connections: int = 512,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`timeout` bounds one HTTP attempt (a long generation needs a long one); `max_retries` counts retries
        after the first attempt. `model_shape` is fetched from `/model_info` when not given. `transport` is for
        tests (httpx.MockTransport)."""
        if max_retries < 0 or backoff < 0:
            raise ValueError(f"max_retries and backoff must be >= 0: got {max_retries}, {backoff}")
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff = backoff
        self.routed_experts_format = routed_experts_format
        self._shape = model_shape
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
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
        if self._shape is None:
            try:
                info = await self.model_info()
            except RolloutRequestError as e:
                raise RolloutRequestError(
                    f"{self.base_url}/model_info is unavailable ({e}): for a real SGLang server pass "
                    "RolloutClient(..., model_shape=ModelShape(num_layers=..., top_k=..., num_experts=...))",
                    status=e.status,
                ) from e
            self._shape = ModelShape(num_layers=info["num_layers"], top_k=info["top_k"],
                                     num_experts=info["num_experts"])
        return self._shape

    async def generate(
        self,
        input_ids_list: Sequence[Sequence[int]],
        sampling_params: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        *,
        return_routed_experts: bool = True,
        rids: Sequence[str] | None = None,
    ) -> list[Sample]:
        """Generate one Sample per prompt in one `/generate` call. `sampling_params` is one dict for all prompts
        or one per prompt (SGLang names; `seed` is sent as SGLang's `sampling_seed`)."""
        prompts = [list(map(int, p)) for p in input_ids_list]
        if not prompts:
            return []
        shape = await self.model_shape() if return_routed_experts else None
        payload: dict[str, Any] = {"input_ids": prompts, "return_logprob": True,
                                   "return_routed_experts": return_routed_experts}
        if sampling_params is not None:
            payload["sampling_params"] = (_sglang_sampling(sampling_params) if isinstance(sampling_params, dict)
                                          else [_sglang_sampling(sp) for sp in sampling_params])
        if rids is not None:
            payload["rid"] = list(rids)
        if return_routed_experts and self.routed_experts_format != "base64_int32":
            payload["routed_experts_format"] = self.routed_experts_format
        outputs = await self._request("POST", "/generate", payload)
        if not isinstance(outputs, list) or len(outputs) != len(prompts):
            got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
            raise RolloutServerError(f"/generate must return one output per prompt: got {got}, "
                                     f"expected {len(prompts)}")
        return [decode_generate_output(out, prompt, shape=shape, index=i, require_trace=return_routed_experts)
                for i, (out, prompt) in enumerate(zip(outputs, prompts, strict=True))]

    # --- private ------------------------------------------------------------------------------------------------
    async def _request(self, method: str, path: str, payload: Any = None) -> Any:
        error: RolloutHTTPError | None = None
        for attempt in range(self.max_retries + 1):
            try:
                resp = await self._http.request(method, path, json=payload)
            except _RETRY_EXCEPTIONS as e:
                error = RolloutServerError(f"{method} {self.base_url}{path} failed: {type(e).__name__}: {e}")
            except httpx.HTTPError as e:  # e.g. a read timeout: the server may still be generating; do not resend
                raise RolloutServerError(f"{method} {self.base_url}{path} failed: {type(e).__name__}: {e}") from e
            else:
                if resp.status_code < 400:
                    try:
                        return resp.json()
                    except ValueError as e:
                        raise RolloutServerError(f"{method} {self.base_url}{path}: response is not JSON "
                                                 f"(status {resp.status_code}): {resp.text[:200]!r}") from e
                error = _http_error(method, self.base_url + path, resp)
                if resp.status_code < 500:
                    raise error
            if attempt < self.max_retries:
                delay = self.backoff * 2**attempt
                logger.warning("retry %d/%d in %.2fs: %s", attempt + 1, self.max_retries, delay, error)
                await asyncio.sleep(delay)
        raise error


def decode_generate_output(
    output: dict[str, Any],
    prompt_ids: Sequence[int],
    *,
    shape: ModelShape | None,
    index: int | None = None,
    require_trace: bool = True,
) -> Sample:
    """One `/generate` output (r3rl serve or SGLang) -> a validated Sample. Raises naming the sample on mismatch."""
    where = f"sample {index}" if index is not None else "sample"
    meta = output["meta_info"]
    output_ids = [int(t) for t in output["output_ids"]]
    finish = (meta.get("finish_reason") or {}).get("type")
    if finish not in ("length", "stop"):
        raise RolloutServerError(f"{where}: finish_reason.type must be 'length' or 'stop': got {finish!r} "
                                 f"({meta.get('finish_reason')})")
    if meta.get("prompt_tokens", len(prompt_ids)) != len(prompt_ids):
        raise RolloutServerError(f"{where}: server prompt length differs from the request: "
                                 f"got prompt_tokens={meta['prompt_tokens']}, expected={len(prompt_ids)}")
    lp_entries = meta.get("output_token_logprobs")
    if lp_entries is None:
        raise RolloutServerError(f"{where}: meta_info.output_token_logprobs is missing (send return_logprob=true)")
    lp_ids = [int(e[1]) for e in lp_entries]
    if lp_ids != output_ids:
        raise RolloutServerError(f"{where}: output_token_logprobs token ids must equal output_ids: got "
                                 f"{lp_ids[:8]}... ({len(lp_ids)}), expected {output_ids[:8]}... ({len(output_ids)})")
    trace = None
    routed = meta.get("routed_experts")
    num_tokens = len(prompt_ids) + len(output_ids)
    if routed is None and require_trace:
        raise RolloutServerError(f"{where}: meta_info.routed_experts is missing (r3rl serve: send "
                                 "return_routed_experts=true; SGLang: start it with --enable-return-routed-experts)")
    if routed is not None and shape is not None:
        if meta.get("routed_experts_format", "base64_int32") == "compact":
            trace = RoutingTrace.from_bytes(base64.b64decode(routed, validate=True), sample=index)
        else:
            wire_layers = shape.num_decoder_layers if shape.moe_layers is not None else shape.num_layers
            trace = RoutingTrace.from_sglang(routed, num_layers=wire_layers, top_k=shape.top_k,
                                             num_experts=shape.num_experts, num_tokens=num_tokens,
                                             layers=shape.moe_layers, sample=index)
        trace.validate(num_tokens=num_tokens, num_layers=shape.num_layers, top_k=shape.top_k,
                       num_experts=shape.num_experts, sample=index)
    version = meta.get("weight_version", 0)
    sample = Sample(
        prompt_ids=list(prompt_ids), response_ids=output_ids, rollout_logprobs=[float(e[0]) for e in lp_entries],
        trace=trace, finish_reason=finish, weight_version=_int_version(version),
        metadata={"rid": meta.get("id"), "weight_version_raw": version, "e2e_latency": meta.get("e2e_latency")},
    )
    return sample.validate(num_layers=shape.num_layers if shape else None, top_k=shape.top_k if shape else None,
                           index=index)


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


# --- private helpers ------------------------------------------------------------------------------------------------
def _sglang_sampling(sp: dict[str, Any]) -> dict[str, Any]:
    return {_SGLANG_NAMES.get(k, k): v for k, v in sp.items()}


def _int_version(version: Any) -> int:
    """r3rl sends an int; SGLang a string ('default' until a weight update sets one)."""
    if isinstance(version, int):
        return version
    return int(version) if isinstance(version, str) and version.isdigit() else 0


def _http_error(method: str, url: str, resp: httpx.Response) -> RolloutHTTPError:
    try:
        err = resp.json().get("error", {})
        message, field = (err.get("message"), err.get("field")) if isinstance(err, dict) else (str(err), None)
    except (ValueError, AttributeError):
        message, field = resp.text[:500], None
    cls = RolloutRequestError if resp.status_code < 500 else RolloutServerError
    where = f" (field {field})" if field else ""
    return cls(f"{method} {url} -> {resp.status_code}{where}: {message}", status=resp.status_code, field=field)
