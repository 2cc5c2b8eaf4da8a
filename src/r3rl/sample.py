"""Sample: one rollout, as the rollout engine (or a real SGLang server) returned it and the trainer consumes it."""

from __future__ import annotations

from dataclasses import dataclass, field

from r3rl.trace import RoutingTrace

__all__ = ["Sample"]


@dataclass(kw_only=True)
class Sample:
    prompt_ids: list[int]
    """Prompt token ids, as the engine saw them."""
    response_ids: list[int]
    """Generated token ids (stop token included when generation stopped on one)."""
    rollout_logprobs: list[float]
    """Log-prob of each response token under the policy itself: log-softmax of the raw logits, before temperature,
    top-k and top-p (r3rl's engine always returns this; SGLang does with SGLANG_RETURN_ORIGINAL_LOGPROB=1, see
    docs/protocol.md). It is the quantity the trainer's log-probs are compared with."""
    trace: RoutingTrace | None = None
    """Routing of `prompt_ids + response_ids`: `len(tokens) - 1` rows (None when routing was not requested)."""
    reward: float | None = None
    """Task reward, filled by the task after rollout."""
    finish_reason: str = "length"
    """'length' or 'stop', as SGLang reports `finish_reason.type`."""
    weight_version: int = 0
    """Version of the weights that generated this sample (engine counter, bumped on each weight update)."""
    metadata: dict = field(default_factory=dict)
    """Free-form per-sample info (request id, task fields)."""

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def validate(self, *, num_layers: int | None = None, top_k: int | None = None, index: int | None = None) -> Sample:
        """Check the invariants trainers rely on; errors name the sample."""
        where = f"sample {index}" if index is not None else "sample"
        if len(self.rollout_logprobs) != len(self.response_ids):
            raise ValueError(
                f"{where}: rollout_logprobs length {len(self.rollout_logprobs)} != response length "
                f"{len(self.response_ids)}"
            )
        if self.trace is not None:
            self.trace.validate(num_tokens=self.num_tokens, num_layers=num_layers, top_k=top_k, sample=index)
        return self
