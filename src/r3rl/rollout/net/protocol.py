"""Wire messages of `r3rl serve`: every JSON request and response type (pydantic), typed in one file.

The `/generate` request and response, `/model_info`, `/update_weights_from_disk`, errors, and the enum
`RoutedExpertsFormat`. The names and semantics follow SGLang's native endpoints, so a
real SGLang server started with `--enable-return-routed-experts` can replace `r3rl serve` by URL (docs/protocol.md
lists every difference). `wire.py` converts between them and the engine messages
(`r3rl.rollout.engine.messages`: `SamplingParams`, `EngineRequest`, `EngineOutput`, `FinishReason`).

Validation happens once: the wire models check JSON types only (strict), and `EngineRequest.validate` checks every
value, raising the one error type `ProtocolError`, which carries the field path (`input_ids[3]`,
`sampling.top_p`); the server rewrites the path into the client's (`input_ids[1][3]`, `sampling_params.top_p`).
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field

from r3rl.rollout.engine.messages import FinishReason, ProtocolError

__all__ = [
    "MAX_BATCH",
    "RoutedExpertsFormat",
    "SamplingParamsMessage",
    "GenerateRequest",
    "FinishInfo",
    "MetaInfo",
    "GenerateResponse",
    "ModelInfo",
    "UpdateWeightsFromDiskRequest",
    "UpdateWeightsFromDiskResponse",
    "ErrorBody",
    "ErrorResponse",
    "parse_weight_version",
]

MAX_BATCH = 4096  # items in one /generate call; larger batches should be split by the client

_SEED_MAX = 2**63 - 1
_STRICT = ConfigDict(extra="forbid", strict=True)


class RoutedExpertsFormat(enum.StrEnum):
    BASE64_INT32 = "base64_int32"  # SGLang's: base64 of little-endian int32 [rows * num_layers * top_k], pad -1
    COMPACT = "compact"  # base64 of `RoutingTrace.to_bytes()`: 24-byte header + uint8/int16 ids (4x smaller)



# --- wire: /generate request ------------------------------------------------------------------------------------------
class SamplingParamsMessage(BaseModel):
    """`sampling_params` of one item: types only; the values are checked once, by `SamplingParams.validate`.
    Unknown fields are rejected (SGLang's other knobs are not implemented)."""

    model_config = _STRICT

    max_new_tokens: int = 128
    """Tokens to generate at most (>= 1; SGLang also allows 0, r3rl does not)."""
    temperature: float = 1.0
    """Softmax temperature in [0, MAX_TEMPERATURE]; at most GREEDY_TEMPERATURE means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 disables. 0 and values below -1 are rejected."""
    stop_token_ids: list[int] = Field(default_factory=list)
    """Generation stops after emitting any of these ids; the stop token is part of `output_ids`."""
    seed: int | None = Field(None, ge=0, le=_SEED_MAX)
    """Per-request sampling seed: the same seed, prompt and weights give the same tokens. r3rl's name."""
    sampling_seed: int | None = Field(None, ge=0, le=_SEED_MAX)
    """SGLang's name for `seed`. Give at most one of the two (they must agree if both are given)."""

    def resolved_seed(self) -> int | None:
        if self.seed is not None and self.sampling_seed is not None and self.seed != self.sampling_seed:
            raise ProtocolError(
                f"seed and sampling_seed name the same setting and must agree: got seed={self.seed}, "
                f"sampling_seed={self.sampling_seed}", "sampling_seed",
            )
        return self.seed if self.seed is not None else self.sampling_seed


class GenerateRequest(BaseModel):
    """Body of `POST /generate`, after the single-item shorthand was expanded into lists (see module docstring).

    On the wire, `text`, `input_ids`, `sampling_params` and `rid` may each be a single item; a request whose `text`
    is a list or whose `input_ids` is a list of lists is a batch and gets a list of `GenerateResponse` back.
    """

    model_config = _STRICT

    text: list[str] | None = None
    """Prompt text, tokenized with the checkpoint's tokenizer. Exactly one of `text` and `input_ids` is required."""
    input_ids: list[list[int]] | None = None
    """Prompt token ids, each in [0, vocab_size)."""
    sampling_params: list[SamplingParamsMessage] | None = None
    """One for all items (a single object on the wire) or one per item (a list of the batch's length)."""
    rid: list[str] | None = None
    """Request ids echoed as `meta_info.id` (one per item); generated when absent."""
    return_logprob: bool = False
    """Return `meta_info.output_token_logprobs`."""
    return_routed_experts: bool = False
    """Return `meta_info.routed_experts`: the experts of every token at every MoE layer."""
    routed_experts_format: RoutedExpertsFormat = Field(RoutedExpertsFormat.BASE64_INT32, strict=False)
    """Encoding of `routed_experts` (r3rl only; SGLang always sends base64_int32). Lax: accepts the string value."""
    routed_experts_start_len: list[int] | None = None
    """SGLang's: per item, the first trace row to return, in [0, prompt_tokens]; the answer covers rows
    [start, prompt + completion - 1). One integer (applies to every item) or one per item on the wire."""
    logprobs_at_temperature: bool = False
    """r3rl only: `output_token_logprobs` at each item's sampling temperature (log_softmax(logits / T), before
    top-k/top-p) instead of the raw temperature-1 log-probs. SGLang chooses by its SGLANG_RETURN_ORIGINAL_LOGPROB."""


# --- wire: responses --------------------------------------------------------------------------------------------------
class FinishInfo(BaseModel):
    """`meta_info.finish_reason`."""

    type: FinishReason
    """'length' (hit max_new_tokens) or 'stop' (emitted a stop token)."""
    matched: int | str | None = None
    """The stop token id that ended generation (type 'stop' only; SGLang may send a stop string)."""
    length: int | None = None
    """Completion length when type is 'length' (SGLang reports this too)."""


class MetaInfo(BaseModel):
    id: str
    """The request id (`rid` if given)."""
    prompt_tokens: int
    """Prompt length in tokens."""
    completion_tokens: int
    """Generated tokens (stop token included)."""
    finish_reason: FinishInfo
    """Why generation ended."""
    weight_version: int | str = 0
    """Engine weight version when the request finished (an int; SGLang: a string, 'default' until set)."""
    weight_version_start: int | None = None
    """Engine weight version when the request was admitted (r3rl only); < weight_version if an update happened
    while it ran."""
    logprob_temperature: float | None = None
    """Temperature `output_token_logprobs` were computed at: 1.0 = raw policy log-probs (r3rl only)."""
    e2e_latency: float | None = None
    """Seconds from request receipt to response (the whole batch for a batch request)."""
    output_token_logprobs: list[tuple[float, int, str | None]] | None = None
    """SGLang layout: one [logprob, token_id, null] per output token (SGLang may put the token text third); only
    with `return_logprob`."""
    routed_experts: str | None = None
    """Base64 routing of prompt+completion, shape [prompt+completion-1, num_layers, top_k]; only with
    `return_routed_experts`. Encoding per `routed_experts_format`."""
    routed_experts_format: RoutedExpertsFormat | None = None
    """Encoding of `routed_experts` (r3rl only; absent from SGLang, where it is always base64_int32)."""
    routed_experts_start_len: int | None = None
    """First row of `routed_experts` (r3rl only, echoed when the request set it; SGLang does not echo it)."""


class GenerateResponse(BaseModel):
    text: str
    """Decoded completion (special tokens skipped); empty when the checkpoint has no tokenizer."""
    output_ids: list[int]
    """Generated token ids."""
    meta_info: MetaInfo


class ModelInfo(BaseModel):
    """`GET /model_info` (also served at SGLang's `/get_model_info`)."""

    model_path: str
    """Checkpoint directory the server loaded."""
    is_generation: bool = True
    """Always true (SGLang field)."""
    num_layers: int
    """MoE layers (rows of one trace token)."""
    top_k: int
    """Experts per token per layer."""
    num_experts: int
    """Routed experts per layer."""
    vocab_size: int
    """Valid token ids are [0, vocab_size)."""
    max_seq_len: int
    """Prompt + completion tokens at most."""
    weight_version: int
    """Current engine weight counter."""
    dtype: str
    """Model dtype, e.g. 'torch.float32'."""
    device: str
    """Device the engine runs on."""


class UpdateWeightsFromDiskRequest(BaseModel):
    """Body of `POST /update_weights_from_disk` (SGLang's fields; its others are rejected)."""

    model_config = _STRICT

    model_path: str
    """HF checkpoint directory on the server's file system, same architecture and shapes as the served model."""
    load_format: str | None = None
    """None, "auto" or "safetensors" (the loader reads HF safetensors checkpoints only)."""
    abort_all_requests: bool = False
    """Abort the requests in flight (their clients get a 503 RequestAborted) instead of letting them continue on
    the new weights."""
    weight_version: str | None = None
    """New version: a decimal integer string (r3rl's versions are ints); None = the current version + 1."""
    flush_cache: bool = True
    """Accepted for SGLang compatibility; r3rl has no prefix cache to flush."""


class UpdateWeightsFromDiskResponse(BaseModel):
    """Answer of `POST /update_weights_from_disk`: HTTP 200 with success true, or 400 with success false."""

    success: bool
    message: str
    """What was loaded, or what was wrong (the missing, unexpected or mismatched tensors, or the field)."""
    num_paused_requests: int = 0
    """Requests paused for the update: always 0 (r3rl applies an update between two engine steps)."""
    weight_version: int | None = None
    """The version now served (r3rl only)."""


class ErrorBody(BaseModel):
    message: str
    """The broken invariant, then got/expected."""
    field: str | None = None
    """Path of the offending request field (`sampling_params.top_p`, `input_ids[1][3]`); null for server errors."""
    type: str = "BadRequestError"
    """Error class: BadRequestError (4xx) or InternalServerError / ServiceUnavailable (5xx)."""
    code: int = 400
    """HTTP status, repeated."""


class ErrorResponse(BaseModel):
    error: ErrorBody


def parse_weight_version(value: str | None, field: str = "weight_version") -> int | None:
    """A weight-update request's `weight_version` (a decimal string) -> int, or None when absent. Only ASCII digits
    and values in [0, 2**63 - 1] (int64, what `/model_info` reports) are accepted: `str.isdigit` alone also takes
    Unicode digits ("\u0663") and any length. Raises ProtocolError naming `field`."""
    if value is None:
        return None
    if not (isinstance(value, str) and 0 < len(value) <= 19 and value.isascii() and value.isdigit()
            and int(value) <= _SEED_MAX):
        raise ProtocolError(f"{field} must be a decimal string of ASCII digits in [0, {_SEED_MAX}] (r3rl's weight "
                            f"versions are int64): got {value!r:.80}", field)
    return int(value)
