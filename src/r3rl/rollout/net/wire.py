"""Conversions between `r3rl serve`'s wire messages and the engine's: parse a `/generate` body into validated
engine requests, and turn engine outputs into `/generate` responses.

    batch = parse_generate_request(json.loads(body), max_seq_len=256, max_text_chars=4096)
    requests = [engine_request(batch, item, tokenizer=tok, vocab_size=320, max_seq_len=256) for item in batch.items]
    response = generate_response(batch, item, output, info=model_info, tokenizer=tok, latency=0.1)

Parsing is two-phase. `parse_generate_request` first turns SGLang's "single item or list" shorthand into lists
(remembering which form was sent, since a list request gets a list response), then validates the `GenerateRequest`
model, whose fields are lists only. The rest of the server never sees a union of single and batch. Every failure is
a `ProtocolError` carrying the field path as the client wrote it (`input_ids[3]`, `sampling_params.top_p`).
"""

from __future__ import annotations

import base64
import math
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from r3rl.rollout.engine.messages import EngineOutput, EngineRequest, FinishReason, ProtocolError, SamplingParams
from r3rl.rollout.net.protocol import (
    MAX_BATCH,
    FinishInfo,
    GenerateRequest,
    GenerateResponse,
    MetaInfo,
    ModelInfo,
    RoutedExpertsFormat,
    SamplingParamsMessage,
)

__all__ = ["GenerateItem", "GenerateBatch", "parse_generate_request", "engine_request", "generate_response",
           "validation_error", "format_field"]


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
    routed_experts_start_len: int = 0  # SGLang's: the first trace row to return


@dataclass(frozen=True, kw_only=True)
class GenerateBatch:
    items: list[GenerateItem]
    is_batch: bool  # the client sent list form: answer with a list
    return_logprob: bool
    return_routed_experts: bool
    routed_experts_format: RoutedExpertsFormat
    logprobs_at_temperature: bool


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
    start = body.get("routed_experts_start_len")
    start_is_list = isinstance(start, list)
    if start is not None and not start_is_list:  # one integer for every item
        n_items = len(text if text is not None else ids) if is_batch and isinstance(text or ids, list) else 1
        body["routed_experts_start_len"] = [start] * n_items
    sp_is_list = isinstance(body.get("sampling_params"), list)
    if body.get("sampling_params") is not None and not sp_is_list:
        body["sampling_params"] = [body["sampling_params"]]

    try:
        req = GenerateRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = list(err["loc"])
        if loc and ((not is_batch and loc[0] in wrapped) or (loc[0] == "sampling_params" and not sp_is_list)
                    or (loc[0] == "routed_experts_start_len" and not start_is_list)):
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
    starts = req.routed_experts_start_len
    if starts is not None and len(starts) != n:
        raise ProtocolError(f"routed_experts_start_len list must have one entry per prompt: got {len(starts)}, "
                            f"expected {n}", "routed_experts_start_len")
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
            routed_experts_start_len=starts[i] if starts is not None else 0,
        ))
    return GenerateBatch(
        items=items, is_batch=is_batch, return_logprob=req.return_logprob,
        return_routed_experts=req.return_routed_experts, routed_experts_format=req.routed_experts_format,
        logprobs_at_temperature=req.logprobs_at_temperature,
    )


def engine_request(batch: GenerateBatch, item: GenerateItem, *, tokenizer, vocab_size: int,
                   max_seq_len: int) -> EngineRequest:
    """Tokenize one item and validate it as an engine request; raise ProtocolError naming the client's field."""
    sp = item.sampling
    if item.input_ids is not None:
        ids = item.input_ids
    elif tokenizer is None:
        raise ProtocolError("this checkpoint has no tokenizer: send input_ids", item.prompt_field)
    else:
        ids = list(tokenizer.encode(item.text))
    sampling = SamplingParams(max_new_tokens=sp.max_new_tokens, temperature=sp.temperature, top_p=sp.top_p,
                              top_k=sp.top_k, stop_token_ids=list(sp.stop_token_ids), seed=item.seed,
                              logprobs_at_temperature=batch.logprobs_at_temperature)
    req = EngineRequest(request_id=uuid.uuid4().hex, input_ids=list(ids), sampling=sampling,
                        return_routed_experts=batch.return_routed_experts,
                        routed_experts_start_len=item.routed_experts_start_len)
    try:
        req.validate(vocab_size=vocab_size, max_seq_len=max_seq_len)
    except ProtocolError as e:  # the engine's field path, under this item's path
        field = (format_field(["routed_experts_start_len", item.index] if batch.is_batch else
                              ["routed_experts_start_len"]) if e.field == "routed_experts_start_len"
                 else _item_field(item, e.field))
        raise ProtocolError(e.message, field) from None
    return req


def generate_response(batch: GenerateBatch, item: GenerateItem, out: EngineOutput, *, info: ModelInfo, tokenizer,
                      latency: float) -> GenerateResponse:
    """One engine output -> its `/generate` response (trace validated against the model, encoded as asked)."""
    n_prompt, n_out = len(out.prompt_ids), len(out.output_ids)
    if out.finish_reason is FinishReason.STOP:
        finish = FinishInfo(type=FinishReason.STOP, matched=out.output_ids[-1])
    else:
        finish = FinishInfo(type=out.finish_reason, length=n_out)
    meta = MetaInfo(id=item.rid if item.rid is not None else out.request_id, prompt_tokens=n_prompt,
                    completion_tokens=n_out, finish_reason=finish, weight_version=out.weight_version,
                    weight_version_start=out.weight_version_start, e2e_latency=round(latency, 6))
    if batch.return_logprob:
        if len(out.output_logprobs) != n_out:
            raise RuntimeError(f"engine must return one logprob per output token: got {len(out.output_logprobs)}, "
                               f"expected {n_out}")
        if not all(map(math.isfinite, out.output_logprobs)):  # JSON has no infinities: refuse (500), not null
            bad = next(i for i, lp in enumerate(out.output_logprobs) if not math.isfinite(lp))
            raise RuntimeError(f"engine returned a non-finite logprob for sample {meta.id}: "
                               f"{out.output_logprobs[bad]} at output position {bad}")
        meta.output_token_logprobs = [(float(lp), int(t), None) for lp, t in zip(out.output_logprobs, out.output_ids,
                                                                                 strict=True)]
        meta.logprob_temperature = out.logprob_temperature
    if batch.return_routed_experts:
        if out.trace is None:
            raise RuntimeError("engine returned no routing trace for a request with return_routed_experts")
        start = out.routed_experts_start_len
        trace = out.trace.validate(num_tokens=n_prompt + n_out - start, num_layers=info.num_layers, top_k=info.top_k,
                                   num_experts=info.num_experts, sample=meta.id)
        if start:
            meta.routed_experts_start_len = start
        if batch.routed_experts_format is RoutedExpertsFormat.COMPACT:
            meta.routed_experts = base64.b64encode(trace.to_bytes()).decode("ascii")
        else:
            meta.routed_experts = trace.to_sglang()
        meta.routed_experts_format = batch.routed_experts_format
    text = tokenizer.decode(out.output_ids, skip_special_tokens=True) if tokenizer is not None else ""
    return GenerateResponse(text=text, output_ids=list(out.output_ids), meta_info=meta)


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


def _item_field(item: GenerateItem, engine_field: str) -> str:
    """Engine field path ('input_ids[3]', 'sampling.top_p') -> the client's ('input_ids[1][3]',
    'sampling_params.top_p')."""
    if engine_field.startswith("sampling."):
        return item.sampling_field + engine_field[len("sampling"):]
    if engine_field.startswith("input_ids"):
        return item.prompt_field + (engine_field[len("input_ids"):] if item.input_ids is not None else "")
    return item.prompt_field


def _error_message(err: dict, field: str) -> str:
    got = repr(err.get("input"))[:80]
    if err["type"] == "extra_forbidden":
        return f"{field}: unknown field (not part of the protocol, see docs/protocol.md): got {field}={got}"
    if err["type"] == "missing":
        return f"{field}: missing required field"
    if err["type"] == "value_error":  # our own validator: its message already says what it got
        return f"{field}: {err['ctx']['error']}"
    return f"{field}: {err['msg']}: got {got}"
