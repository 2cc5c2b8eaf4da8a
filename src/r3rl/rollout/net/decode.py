"""Decoding of `/generate` answers, the one path for both servers (`r3rl serve` and SGLang): output ids,
`output_token_logprobs` (SGLang layout, checked against the ids), `routed_experts` (base64 int32, or r3rl's compact
encoding) decoded and validated into a `RoutingTrace` of `len(prompt) + len(output) - 1` rows against a
`ModelShape`, finish reason and weight version; and the client's error types. Used by `RolloutClient` (client.py),
which re-exports these names.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from r3rl.rollout.net.protocol import GenerateResponse, RoutedExpertsFormat
from r3rl.rollout.net.wire import validation_error
from r3rl.sample import Sample
from r3rl.trace import RoutingTrace

__all__ = [
    "WeightSyncError",
    "ModelShape",
    "RolloutHTTPError",
    "RolloutRequestError",
    "RolloutServerError",
    "decode_generate_output",
    "weight_version_int",
]


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

    @classmethod
    def of_model(cls, model) -> ModelShape:
        """The MoE shape of a local HF model (the trainer's policy): what a SGLang server's traces are decoded
        against, since its model info has none."""
        from r3rl.models.adapters import find_routers

        sites = find_routers(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        num_decoder = int(config.num_hidden_layers)
        decoder = [s.decoder_layer for s in sites]
        moe_layers = None
        if decoder != list(range(num_decoder)):  # some decoder layers are dense
            if None in decoder:
                raise ValueError(f"{type(model).__name__}: {len(sites)} MoE layers of {num_decoder} decoder layers, "
                                 f"but the decoder index of {[s.name for s in sites if s.decoder_layer is None]} "
                                 "is unknown: cannot map a SGLang trace's columns")
            moe_layers = tuple(decoder)
        return cls(num_layers=len(sites), top_k=sites[0].top_k, num_experts=sites[0].num_experts,
                   moe_layers=moe_layers, num_decoder_layers=num_decoder)

    def moe_shape(self) -> tuple[int, int, int]:
        """(MoE layers, top-k, experts): what two descriptions of one model must agree on."""
        return self.num_layers, self.top_k, self.num_experts


class RolloutHTTPError(RuntimeError):
    """The server answered with an error (or could not be reached)."""

    def __init__(self, message: str, *, status: int | None = None, field: str | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.kind = kind
        """The error body's `type` (e.g. ServiceUnavailable: not run, safe to resend)."""


class WeightSyncError(RuntimeError):
    """A weight update did not take: the server refused it, or reports another version than the one sent."""


class RolloutRequestError(RolloutHTTPError):
    """4xx: the request is invalid (`field` names what); never retried."""


class RolloutServerError(RolloutHTTPError):
    """5xx or connection failure, after all retries."""


def decode_generate_output(
    output: dict[str, Any],
    prompt_ids: Sequence[int],
    *,
    shape: ModelShape | None,
    index: int | None = None,
    require_trace: bool = True,
    logprob_temperature: float = 1.0,
    routed_experts_start_len: int = 0,
) -> Sample:
    """One `/generate` output (r3rl serve or SGLang) -> a validated Sample. Raises naming the sample on mismatch.
    `logprob_temperature`: what the log-probs are computed at when the server does not say (SGLang)."""
    where = f"sample {index}" if index is not None else "sample"
    try:
        response = GenerateResponse.model_validate(output)
    except ValidationError as e:
        err = validation_error(e)
        raise RolloutServerError(f"{where}: the /generate response breaks the protocol: {err.message}") from None
    meta, output_ids = response.meta_info, response.output_ids
    if meta.prompt_tokens != len(prompt_ids):
        raise RolloutServerError(f"{where}: server prompt length differs from the request: "
                                 f"got prompt_tokens={meta.prompt_tokens}, expected={len(prompt_ids)}")
    if meta.output_token_logprobs is None:
        raise RolloutServerError(f"{where}: meta_info.output_token_logprobs is missing (send return_logprob=true)")
    lp_ids = [e[1] for e in meta.output_token_logprobs]
    if lp_ids != output_ids:
        raise RolloutServerError(f"{where}: output_token_logprobs token ids must equal output_ids: got "
                                 f"{lp_ids[:8]}... ({len(lp_ids)}), expected {output_ids[:8]}... ({len(output_ids)})")
    trace = None
    num_tokens = len(prompt_ids) + len(output_ids)
    if meta.routed_experts is None and require_trace:
        raise RolloutServerError(f"{where}: meta_info.routed_experts is missing (r3rl serve: send "
                                 "return_routed_experts=true; SGLang: start it with --enable-return-routed-experts)")
    start = routed_experts_start_len
    if meta.routed_experts is not None and shape is not None:
        trace = _decode_trace(meta.routed_experts, meta.routed_experts_format, shape, num_tokens, index, where,
                              start=start)
    return Sample(
        prompt_ids=list(prompt_ids), response_ids=output_ids,
        rollout_logprobs=[e[0] for e in meta.output_token_logprobs],
        logprob_temperature=meta.logprob_temperature if meta.logprob_temperature is not None else logprob_temperature,
        trace=trace, finish_reason=meta.finish_reason.type, weight_version=weight_version_int(meta.weight_version),
        weight_version_start=weight_version_int(meta.weight_version_start if meta.weight_version_start is not None
                                          else meta.weight_version),
        metadata={"rid": meta.id, "weight_version_raw": meta.weight_version, "e2e_latency": meta.e2e_latency},
        routed_experts_start_len=start if trace is not None else 0,
    ).validate(num_layers=shape.num_layers if shape else None, top_k=shape.top_k if shape else None,
               num_experts=shape.num_experts if shape else None, index=index)


def _decode_trace(routed: str, fmt: RoutedExpertsFormat | None, shape: ModelShape, num_tokens: int,
                  index: int | None, where: str, *, start: int = 0) -> RoutingTrace:
    """The trace rows [start, num_tokens - 1). A server that ignored `routed_experts_start_len` sends every row:
    that is an error here (its rows would be over-counted into the episode), never silently sliced."""
    num_tokens -= start
    if fmt is RoutedExpertsFormat.COMPACT:
        try:
            blob = base64.b64decode(routed, validate=True)
        except ValueError as e:  # binascii.Error is a ValueError
            raise RolloutServerError(f"{where}: meta_info.routed_experts (compact) must be valid base64: {e}; "
                                     f"got {routed[:40]!r}...") from None
        trace = RoutingTrace.from_bytes(blob, sample=index)
    else:  # SGLang's base64 int32, one column per decoder layer when the model has dense layers
        wire_layers = shape.num_decoder_layers if shape.moe_layers is not None else shape.num_layers
        trace = RoutingTrace.from_sglang(routed, num_layers=wire_layers, top_k=shape.top_k,
                                         num_experts=shape.num_experts, num_tokens=None if start else num_tokens,
                                         layers=shape.moe_layers, sample=index)
    if start and trace.num_rows != num_tokens - 1:
        raise RolloutServerError(
            f"{where}: routed_experts has {trace.num_rows} rows, expected {num_tokens - 1} for "
            f"routed_experts_start_len={start} (tokens={num_tokens + start}; {num_tokens + start - 1} rows means the "
            "server ignored routed_experts_start_len, and an episode would over-count them)")
    return trace.validate(num_tokens=num_tokens, num_layers=shape.num_layers, top_k=shape.top_k,
                          num_experts=shape.num_experts, sample=index)


def weight_version_int(version: Any) -> int:
    """A weight version as an int: r3rl sends an int; SGLang a string ('default' until a weight update sets one,
    which counts as 0)."""
    if isinstance(version, int):
        return version
    return int(version) if isinstance(version, str) and version.isdigit() else 0

