"""Sample: one rollout, as the rollout backend (r3rl's engine, `r3rl serve` or a real SGLang server) returned it and
the trainer consumes it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from r3rl.trace import RoutingTrace

__all__ = ["FinishReason", "Sample"]


class FinishReason(enum.StrEnum):
    """Why generation ended (SGLang's `finish_reason.type`). Here, one floor below `r3rl.rollout`, which re-exports it
    (`r3rl.rollout.engine.messages`)."""

    STOP = "stop"  # emitted one of stop_token_ids (the stop token is the last output token)
    LENGTH = "length"  # max_new_tokens reached


@dataclass(kw_only=True)
class Sample:
    prompt_ids: list[int]
    """Prompt token ids, as the engine saw them."""
    response_ids: list[int]
    """Generated token ids (stop token included when generation stopped on one)."""
    rollout_logprobs: list[float]
    """Log-prob of each response token as the rollout computed it, before top-k and top-p, at temperature
    `logprob_temperature`:
    - 1.0 (the default): log_softmax of the raw logits, the policy's own log-prob. r3rl's engine returns it unless
      asked otherwise; SGLang does with SGLANG_RETURN_ORIGINAL_LOGPROB=1.
    - T (the rollout temperature, `SamplingParams.logprobs_at_temperature=True`): log_softmax(logits / T), the
      log-prob under the distribution that was sampled. SGLang's default.
    The trainer compares it with its own log-probs computed at the same `logprob_temperature` (logits / T before
    log_softmax); see docs/protocol.md, "Log-probs"."""
    logprob_temperature: float = 1.0
    """Temperature `rollout_logprobs` were computed at: 1.0 = raw policy log-probs; greedy samples are always 1.0."""
    trace: RoutingTrace | None = None
    """Routing of `prompt_ids + response_ids`: `len(tokens) - 1` rows (None when routing was not requested)."""
    reward: float | None = None
    """Task reward, filled by the task after rollout."""
    finish_reason: FinishReason | str = "length"
    """Why generation ended: a `FinishReason` from the backends (a StrEnum, equal to 'stop' / 'length', SGLang's
    `finish_reason.type`)."""
    weight_version_start: int = 0
    """Weight version when the request was admitted into the engine (the version of its prefill)."""
    weight_version: int = 0
    """Weight version when the request finished. It differs from `weight_version_start` when a weight update
    happened while the request ran: its tokens then came from two (or more) policies."""
    loss_mask: list[int] | None = None
    """Per response token: 1 where the loss trains on it (the model generated it), 0 where it does not (an episode's
    observation tokens, which the forward still reads and replays). None: every response token is trained on."""
    routed_experts_start_len: int = 0
    """First row `trace` holds (SGLang's `routed_experts_start_len`): a later turn of an episode asks only for the rows
    it does not hold yet. Trainers need whole traces (0)."""
    metadata: dict = field(default_factory=dict)
    """Free-form per-sample info. Backends set "prompt_index", "sample_index" (index within the prompt's group) and
    "rid" (request id); tasks add their fields."""

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def validate(self, *, num_layers: int | None = None, top_k: int | None = None, num_experts: int | None = None,
                 index: int | None = None) -> Sample:
        """Check the invariants trainers rely on; errors name the sample."""
        where = f"sample {index}" if index is not None else "sample"
        if len(self.rollout_logprobs) != len(self.response_ids):
            raise ValueError(
                f"{where}: rollout_logprobs length {len(self.rollout_logprobs)} != response length "
                f"{len(self.response_ids)}"
            )
        if self.loss_mask is not None and (len(self.loss_mask) != len(self.response_ids)
                                           or any(m not in (0, 1) for m in self.loss_mask)):
            raise ValueError(f"{where}: loss_mask must hold one 0/1 per response token: got {len(self.loss_mask)} "
                             f"entries for {len(self.response_ids)} response tokens")
        if self.trace is not None:
            start = self.routed_experts_start_len
            if start and self.trace.num_rows != self.num_tokens - 1 - start:
                raise ValueError(f"{where}: trace rows must cover [routed_experts_start_len, tokens - 1): got "
                                 f"{self.trace.num_rows} rows, expected {self.num_tokens - 1 - start} "
                                 f"(tokens={self.num_tokens}, routed_experts_start_len={start})")
            self.trace.validate(num_tokens=self.num_tokens - start, num_layers=num_layers, top_k=top_k,
                                num_experts=num_experts, sample=index)
        return self
