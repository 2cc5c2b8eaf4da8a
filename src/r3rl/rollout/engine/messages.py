"""Engine messages: the in-process request and output types of `RolloutEngine` (dataclasses), and the one error type
their validation raises.

`SamplingParams`, `EngineRequest`, `EngineOutput`; `FinishReason` lives in `r3rl.sample` (a `Sample` carries it) and
is re-exported here. `EngineRequest.validate` checks every value, raising `ProtocolError`, which carries the field
path (`input_ids[3]`, `sampling.top_p`); the server rewrites the path into the client's (`input_ids[1][3]`,
`sampling_params.top_p`). The wire (JSON) messages of `r3rl serve` are in `r3rl.rollout.net.protocol`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

from r3rl.sample import FinishReason
from r3rl.trace import RoutingTrace

__all__ = [
    "MAX_TEMPERATURE",
    "GREEDY_TEMPERATURE",
    "ProtocolError",
    "FinishReason",
    "SamplingParams",
    "EngineRequest",
    "EngineOutput",
]

MAX_TEMPERATURE = 1e6  # beyond this, logits / T is uniform to float32 precision anyway (and 1e300 would be inf)
# At or below this temperature a request is greedy (as in vLLM): logits / T would overflow float32 to inf, and argmax
# over several +inf would pick the first, not the largest, logit.
GREEDY_TEMPERATURE = 1e-5


class ProtocolError(ValueError):
    """A request breaks the protocol. `field` is the path of the offending field as the client wrote it."""

    def __init__(self, message: str, field: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status


@dataclass(kw_only=True)
class SamplingParams:
    max_new_tokens: int = 128
    """Generate at most this many tokens (finish_reason 'length'). Must be >= 1."""
    temperature: float = 1.0
    """0 = greedy; otherwise logits are divided by it before top-k/top-p and sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 keeps all (SGLang's convention)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Generation stops after emitting one of these (the stop token is part of the output, finish_reason 'stop')."""
    seed: int | None = None
    """Same seed, same prompt, same weights -> same tokens, regardless of batching. None draws a random seed."""
    logprobs_at_temperature: bool = False
    """Return log_softmax(logits / temperature) (the distribution sampled, before top-k/top-p) instead of the raw
    temperature-1 log-prob. Greedy requests (temperature <= GREEDY_TEMPERATURE) always return the raw one."""

    @property
    def logprob_temperature(self) -> float:
        """The temperature the returned log-probs are computed at: 1.0 (raw) or `temperature`."""
        return self.temperature if self.logprobs_at_temperature and self.temperature > GREEDY_TEMPERATURE else 1.0

    def validate(self, vocab_size: int) -> None:
        """Raise ProtocolError carrying the field (`sampling.top_p`) whose value breaks its invariant."""
        def bad(name: str, message: str) -> ProtocolError:
            return ProtocolError(f"{name} {message}", f"sampling.{name}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", f"must be an integer >= 1: got {self.max_new_tokens!r}")
        if (not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0
                or self.temperature > MAX_TEMPERATURE):
            raise bad("temperature", f"must be a finite number in [0, {MAX_TEMPERATURE:g}]: got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1]: got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or (self.top_k != -1 and self.top_k < 1):
            raise bad("top_k", f"must be -1 (all tokens) or an integer >= 1: got {self.top_k!r}")
        for i, t in enumerate(self.stop_token_ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ProtocolError(f"stop_token_ids must be token ids in [0, {vocab_size}): got {t!r} at index {i}",
                                    f"sampling.stop_token_ids[{i}]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", f"must be an integer or None: got {self.seed!r}")
        if not isinstance(self.logprobs_at_temperature, bool):
            raise bad("logprobs_at_temperature", f"must be a bool: got {self.logprobs_at_temperature!r}")


@dataclass(kw_only=True)
class EngineRequest:
    request_id: str
    """Unique among the requests the engine holds; outputs carry it back."""
    input_ids: list[int]
    """Prompt token ids (non-empty, each in [0, vocab_size))."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    return_routed_experts: bool = True
    """Return the routing trace of prompt + output (ignored when the engine does not capture routing)."""
    routed_experts_start_len: int = 0
    """SGLang's: return only trace rows [start, len(prompt) + len(output) - 1), in [0, len(input_ids)]. A later turn
    of an episode asks from the first row it does not hold yet (r3rl.episodes)."""

    def validate(self, *, vocab_size: int, max_seq_len: int) -> None:
        """Raise ProtocolError carrying the field (`input_ids[3]`, `sampling.top_p`) that breaks its invariant.
        Normalizes input_ids to a list of ints. Lengths are checked before any per-token work."""
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ProtocolError(f"request_id must be a non-empty string: got {self.request_id!r}", "request_id")
        if not isinstance(self.input_ids, list | tuple):
            raise ProtocolError(f"input_ids must be a list of integer token ids: got {self.input_ids!r:.80}",
                                "input_ids")
        n = len(self.input_ids)
        if not n:
            raise ProtocolError("input_ids must hold at least one token: got an empty prompt", "input_ids")
        if n >= max_seq_len:
            raise ProtocolError(f"input_ids must be shorter than the context (max_seq_len={max_seq_len}) to leave room "
                                f"for a generated token: got len(input_ids)={n}", "input_ids")
        try:
            ids = [operator.index(t) for t in self.input_ids]
        except TypeError:
            raise ProtocolError(f"input_ids must be a list of integer token ids: got {self.input_ids!r:.80}",
                                "input_ids") from None
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ProtocolError(f"input_ids must be token ids in [0, {vocab_size}): got {ids[bad]} at index {bad}",
                                f"input_ids[{bad}]")
        self.input_ids = ids
        start = self.routed_experts_start_len
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= n:
            raise ProtocolError(f"routed_experts_start_len must be an integer in [0, len(input_ids)={n}]: got "
                                f"{start!r}", "routed_experts_start_len")
        self.sampling.validate(vocab_size)
        if n + self.sampling.max_new_tokens > max_seq_len:
            raise ProtocolError(f"max_new_tokens must fit the context, len(input_ids) + max_new_tokens <= "
                                f"max_seq_len={max_seq_len}: got {n} + {self.sampling.max_new_tokens}",
                                "sampling.max_new_tokens")


@dataclass(kw_only=True)
class EngineOutput:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    """Generated ids; ends with the stop token when finish_reason is 'stop'."""
    output_logprobs: list[float]
    """log_softmax of the logits at each output token, before top-k/top-p: at temperature 1 (raw), or at
    `logprob_temperature` when the request asked for `logprobs_at_temperature`."""
    logprob_temperature: float
    """Temperature `output_logprobs` were computed at (1.0 = the policy's raw log-probs)."""
    finish_reason: FinishReason
    """Why generation ended (SGLang's finish_reason.type)."""
    trace: RoutingTrace | None
    """Routing of prompt_ids + output_ids from row `routed_experts_start_len` on: len(prompt) + len(output) - 1 -
    start rows; None if not requested/captured."""
    weight_version: int
    """Engine weight version when the request finished (bumped by every update_weights)."""
    weight_version_start: int
    """Engine weight version when the request was admitted (its prefill); differs from `weight_version` when an
    update happened while it ran (later tokens then came from the newer weights)."""
    routed_experts_start_len: int = 0
    """First trace row returned (the request's `routed_experts_start_len`)."""


# --- private helpers ------------------------------------------------------------------------------------------------
def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)
