"""Rollout protocol: every request and response message of `r3rl serve`, typed in one file.

The names and semantics follow SGLang's native `/generate` endpoint, so a real SGLang server started with
`--enable-return-routed-experts` can replace `r3rl serve` by URL (see docs/protocol.md for every difference):

    curl -s localhost:30000/generate -d '{"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4},
                                          "return_logprob": true, "return_routed_experts": true}'

Parsing is two-phase. `parse_generate_request` first turns SGLang's "single item or list" shorthand into lists
(remembering which form was sent, since a list request gets a list response), then validates the `GenerateRequest`
model, whose fields are lists only. The rest of the server never sees a union of single and batch. Every failure is
a `ProtocolError` carrying the field path as the client wrote it (`input_ids[3]`, `sampling_params.top_p`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "MAX_BATCH",
    "ProtocolError",
    "RoutedExpertsFormat",
    "SamplingParamsMessage",
    "GenerateRequest",
    "GenerateItem",
    "GenerateBatch",
    "FinishReason",
    "MetaInfo",
    "GenerateResponse",
    "ModelInfo",
    "UpdateWeightsFromDiskRequest",
    "UpdateWeightsFromDiskResponse",
    "ErrorBody",
    "ErrorResponse",
    "parse_generate_request",
    "validation_error",
    "format_field",
]

MAX_BATCH = 4096  # items in one /generate call; larger batches should be split by the client
MAX_TEMPERATURE = 1e6  # beyond this, logits / T is uniform to float32 precision anyway (and 1e300 would be inf)
_SEED_MAX = 2**63 - 1
_STRICT = ConfigDict(extra="forbid", strict=True)


class ProtocolError(ValueError):
    """A request breaks the protocol. `field` is the path of the offending field as the client wrote it."""

    def __init__(self, message: str, field: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status


class RoutedExpertsFormat(enum.StrEnum):
    BASE64_INT32 = "base64_int32"  # SGLang's: base64 of little-endian int32 [rows * num_layers * top_k], pad -1
    COMPACT = "compact"  # base64 of `RoutingTrace.to_bytes()`: 24-byte header + uint8/int16 ids (4x smaller)


# --- request --------------------------------------------------------------------------------------------------------
class SamplingParamsMessage(BaseModel):
    """`sampling_params` of one item. Unknown fields are rejected (SGLang's other knobs are not implemented)."""

    model_config = _STRICT

    max_new_tokens: int = Field(128, ge=1)
    """Tokens to generate at most (>= 1; SGLang also allows 0, r3rl does not)."""
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    """Softmax temperature; 0 means greedy."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 disables. 0 and values below -1 are rejected."""
    stop_token_ids: list[int] = Field(default_factory=list)
    """Generation stops after emitting any of these ids; the stop token is part of `output_ids`."""
    seed: int | None = Field(None, ge=0, le=_SEED_MAX)
    """Per-request sampling seed: the same seed, prompt and weights give the same tokens. r3rl's name."""
    sampling_seed: int | None = Field(None, ge=0, le=_SEED_MAX)
    """SGLang's name for `seed`. Give at most one of the two (they must agree if both are given)."""

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1: got {v}")
        return v

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
    logprobs_at_temperature: bool = False
    """r3rl only: `output_token_logprobs` at each item's sampling temperature (log_softmax(logits / T), before
    top-k/top-p) instead of the raw temperature-1 log-probs. SGLang chooses by its SGLANG_RETURN_ORIGINAL_LOGPROB."""


@dataclass(frozen=True, kw_only=True)
class GenerateItem:
    """One prompt of a validated request; the server turns it into an engine request."""

    index: int  # position in the batch
    input_ids: list[int] | None  # None when the item came as text (the server tokenizes it)
    text: str | None
    sampling: SamplingParamsMessage
    seed: int | None  # `seed` or `sampling_seed`
    rid: str | None
    prompt_field: str  # path of this item's prompt as the client wrote it: 'input_ids', 'text[2]'
    sampling_field: str  # path of its sampling params: 'sampling_params', 'sampling_params[2]'


@dataclass(frozen=True, kw_only=True)
class GenerateBatch:
    items: list[GenerateItem]
    is_batch: bool  # the client sent list form: answer with a list
    return_logprob: bool
    return_routed_experts: bool
    routed_experts_format: RoutedExpertsFormat
    logprobs_at_temperature: bool


# --- response -------------------------------------------------------------------------------------------------------
class FinishReason(BaseModel):
    type: str
    """'length' (hit max_new_tokens or the context) or 'stop' (emitted a stop token)."""
    matched: int | None = None
    """The stop token id that ended generation (type 'stop' only)."""
    length: int | None = None
    """Completion length when type is 'length' (SGLang reports this too)."""


class MetaInfo(BaseModel):
    id: str
    """The request id (`rid` if given)."""
    prompt_tokens: int
    """Prompt length in tokens."""
    completion_tokens: int
    """Generated tokens (stop token included)."""
    finish_reason: FinishReason
    """Why generation ended."""
    weight_version: int
    """Engine weight version when the request finished (SGLang: a string, 'default' until set)."""
    weight_version_start: int | None = None
    """Engine weight version when the request was admitted (r3rl only); < weight_version if an update happened
    while it ran."""
    logprob_temperature: float | None = None
    """Temperature `output_token_logprobs` were computed at: 1.0 = raw policy log-probs (r3rl only)."""
    e2e_latency: float
    """Seconds from request receipt to response (the whole batch for a batch request)."""
    output_token_logprobs: list[tuple[float, int, None]] | None = None
    """SGLang layout: one [logprob, token_id, null] per output token; only with `return_logprob`."""
    routed_experts: str | None = None
    """Base64 routing of prompt+completion, shape [prompt+completion-1, num_layers, top_k]; only with
    `return_routed_experts`. Encoding per `routed_experts_format`."""
    routed_experts_format: RoutedExpertsFormat | None = None
    """Encoding of `routed_experts` (r3rl only; absent from SGLang, where it is always base64_int32)."""


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


# --- parsing --------------------------------------------------------------------------------------------------------
def parse_generate_request(body: Any, *, max_seq_len: int | None = None,
                           max_text_chars: int | None = None) -> GenerateBatch:
    """Expand the single-item shorthand, validate, and return one `GenerateItem` per prompt (or raise).

    A `null` field means the field is absent (its default), at every level. Sizes are checked before any per-token
    work: the batch size, each `input_ids` prompt against `max_seq_len`, each `text` against `max_text_chars`."""
    if not isinstance(body, dict):
        raise ProtocolError(f"request body must be a JSON object: got {type(body).__name__}", "body")
    body = _drop_nulls(body)
    if isinstance(body.get("sampling_params"), dict):
        body["sampling_params"] = _drop_nulls(body["sampling_params"])
    elif isinstance(body.get("sampling_params"), list):
        body["sampling_params"] = [_drop_nulls(sp) if isinstance(sp, dict) else sp for sp in body["sampling_params"]]
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        got = "neither" if text is None else "both"
        raise ProtocolError(f"exactly one of text or input_ids is required: got {got}", "input_ids")
    is_batch = isinstance(text, list) if text is not None else bool(ids) and isinstance(ids, list) and all(
        isinstance(x, list) for x in ids
    )
    _check_sizes(text, ids, is_batch, max_seq_len=max_seq_len, max_text_chars=max_text_chars)
    wrapped = {"text", "input_ids", "rid"}
    if not is_batch:
        for key in wrapped:
            if body.get(key) is not None:
                body[key] = [body[key]]
    sp_is_list = isinstance(body.get("sampling_params"), list)
    if body.get("sampling_params") is not None and not sp_is_list:
        body["sampling_params"] = [body["sampling_params"]]

    try:
        req = GenerateRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = list(err["loc"])
        if loc and ((not is_batch and loc[0] in wrapped) or (loc[0] == "sampling_params" and not sp_is_list)):
            loc = loc[:1] + loc[2:]  # drop the index the shorthand expansion added
        field = format_field(loc)
        raise ProtocolError(_error_message(err, field), field) from None

    prompts: list = req.text if req.text is not None else req.input_ids
    prompt_name = "text" if req.text is not None else "input_ids"
    n = len(prompts)
    if not 1 <= n <= MAX_BATCH:
        raise ProtocolError(f"batch size must be in [1, {MAX_BATCH}]: got {n}", prompt_name)
    sps = req.sampling_params if req.sampling_params is not None else [SamplingParamsMessage()]
    if sp_is_list and len(sps) != n:
        raise ProtocolError(f"sampling_params list must have one entry per prompt: got {len(sps)}, expected {n}",
                            "sampling_params")
    if req.rid is not None and len(req.rid) != n:
        raise ProtocolError(f"rid list must have one entry per prompt: got {len(req.rid)}, expected {n}", "rid")
    for i, rid in enumerate(req.rid or []):
        field = format_field(["rid", i] if is_batch else ["rid"])
        _check_unicode(rid, field)
        if rid in req.rid[:i]:
            raise ProtocolError(f"rid must be unique within a request: got {rid!r} twice (first at index "
                                f"{req.rid.index(rid)})", field)
    for i, t in enumerate(req.text or []):
        _check_unicode(t, format_field(["text", i] if is_batch else ["text"]))
    items = []
    for i, prompt in enumerate(prompts):
        sp = sps[i] if sp_is_list else sps[0]
        sampling_field = format_field(["sampling_params", i] if sp_is_list else ["sampling_params"])
        try:
            seed = sp.resolved_seed()
        except ProtocolError as e:
            raise ProtocolError(e.message, f"{sampling_field}.{e.field}") from None
        items.append(GenerateItem(
            index=i, input_ids=prompt if req.input_ids is not None else None,
            text=prompt if req.text is not None else None, sampling=sp, seed=seed,
            rid=req.rid[i] if req.rid is not None else None,
            prompt_field=format_field([prompt_name, i] if is_batch else [prompt_name]), sampling_field=sampling_field,
        ))
    return GenerateBatch(
        items=items, is_batch=is_batch, return_logprob=req.return_logprob,
        return_routed_experts=req.return_routed_experts, routed_experts_format=req.routed_experts_format,
        logprobs_at_temperature=req.logprobs_at_temperature,
    )


def validation_error(e: ValidationError) -> ProtocolError:
    """A pydantic ValidationError -> ProtocolError naming the first offending field."""
    err = e.errors()[0]
    field = format_field(list(err["loc"]))
    return ProtocolError(_error_message(err, field), field)


def format_field(loc: Any) -> str:
    """('sampling_params', 0, 'top_p') -> 'sampling_params[0].top_p'; a string passes through."""
    if isinstance(loc, str):
        return loc
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _drop_nulls(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _check_unicode(s: str, field: str) -> None:
    """JSON allows lone surrogates (\\ud800); they cannot be tokenized nor echoed back as UTF-8."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ProtocolError(f"{field} must be valid Unicode: got a lone surrogate {s[e.start]!r} at index {e.start}",
                            field) from None


def _check_sizes(text: Any, ids: Any, is_batch: bool, *, max_seq_len: int | None, max_text_chars: int | None) -> None:
    """Cheap size checks on the raw JSON, before any per-token validation or tokenization."""
    prompts = (text if is_batch else [text]) if text is not None else (ids if is_batch else [ids])
    name = "text" if text is not None else "input_ids"
    if isinstance(prompts, list) and len(prompts) > MAX_BATCH:
        raise ProtocolError(f"batch size must be in [1, {MAX_BATCH}]: got {len(prompts)}", name)
    for i, p in enumerate(prompts if isinstance(prompts, list) else []):
        field = format_field([name, i] if is_batch else [name])
        if name == "input_ids" and max_seq_len is not None and isinstance(p, list) and len(p) >= max_seq_len:
            raise ProtocolError(f"prompt must be shorter than the context (max_seq_len) to leave room for a generated "
                                f"token: got prompt_tokens={len(p)}, max_seq_len={max_seq_len}", field)
        if name == "text" and max_text_chars is not None and isinstance(p, str) and len(p) > max_text_chars:
            raise ProtocolError(f"text is too long to fit the context: got {len(p)} characters, at most "
                                f"{max_text_chars} are tokenized (16 per context token)", field)


def _error_message(err: dict, field: str) -> str:
    got = repr(err.get("input"))[:80]
    if err["type"] == "extra_forbidden":
        return f"{field}: unknown field (not part of the protocol, see docs/protocol.md): got {field}={got}"
    if err["type"] == "missing":
        return f"{field}: missing required field"
    if err["type"] == "value_error":  # our own validator: its message already says what it got
        return f"{field}: {err['ctx']['error']}"
    return f"{field}: {err['msg']}: got {got}"
