"""Rollout engine request/response types, and sampling on the device with per-request counter-based seeds.

    params = SamplingParams(max_new_tokens=64, temperature=1.0, top_p=0.9, seed=7)
    tokens_B, logprobs_B = sample_tokens(logits_BV, params_B, counter_B, SamplingMode.for_params([params]))

Sampling is Gumbel-max: token = argmax(logits / temperature + g) over the tokens that top-k/top-p keep, where the
noise g[v] is a pure function of (request seed, position of the sampled token, token id v): a counter-based hash,
not a torch.Generator. A request therefore draws the same tokens whatever else shares its batch, and the sampler is
a fixed sequence of tensor ops with no generator state (it runs inside a CUDA graph). The hash (two rounds of a
32-bit xorshift-multiply mixer) is for sampling, not for cryptography.

Temperature 0 is greedy (argmax of the raw logits). Top-k is applied first, then top-p on the renormalized top-k
distribution at the request's temperature (SGLang's and vLLM's order).

Logprobs: the returned log-prob of a token is log_softmax of the raw logits at temperature 1, before temperature,
top-k and top-p: the policy's log-prob, what the trainer recomputes (SGLang returns it with
SGLANG_RETURN_ORIGINAL_LOGPROB=1).

Tensor suffixes: B batch rows, V vocabulary.
"""

from __future__ import annotations

import enum
import math
import operator
from dataclasses import dataclass, field

import torch

from r3rl.trace import RoutingTrace

__all__ = ["SamplingParams", "EngineRequest", "EngineOutput", "SamplingMode", "SlotParams", "sample_tokens"]

_M32 = 0xFFFFFFFF


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

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the field whose value breaks its invariant."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1: got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0: got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]: got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or (self.top_k != -1 and self.top_k < 1):
            raise ValueError(f"top_k must be -1 (all tokens) or an integer >= 1: got {self.top_k!r}")
        bad = [t for t in self.stop_token_ids
               if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids must be token ids in [0, {vocab_size}): got {bad[:5]}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None: got {self.seed!r}")


@dataclass(kw_only=True)
class EngineRequest:
    request_id: str
    """Unique among the requests the engine holds; outputs carry it back."""
    input_ids: list[int]
    """Prompt token ids (non-empty, each in [0, vocab_size))."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    return_routed_experts: bool = True
    """Return the routing trace of prompt + output (ignored when the engine does not capture routing)."""

    def validate(self, *, vocab_size: int, max_seq_len: int) -> None:
        """Raise ValueError naming the field that breaks its invariant. Normalizes input_ids to a list of ints."""
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty string: got {self.request_id!r}")
        try:
            ids = [operator.index(t) for t in self.input_ids]
        except TypeError:
            raise ValueError(f"input_ids must be a list of integer token ids: got {self.input_ids!r:.80}") from None
        if not ids:
            raise ValueError("input_ids must hold at least one token: got an empty prompt")
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"input_ids must be token ids in [0, {vocab_size}): got {ids[bad]} at index {bad}")
        self.input_ids = ids
        self.sampling.validate(vocab_size)
        if len(ids) >= max_seq_len:
            raise ValueError(f"input_ids must be shorter than the context (max_seq_len={max_seq_len}): got "
                             f"len(input_ids)={len(ids)}")
        if len(ids) + self.sampling.max_new_tokens > max_seq_len:
            raise ValueError(f"max_new_tokens must fit the context, len(input_ids) + max_new_tokens <= max_seq_len="
                             f"{max_seq_len}: got {len(ids)} + {self.sampling.max_new_tokens}")


@dataclass(kw_only=True)
class EngineOutput:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    """Generated ids; ends with the stop token when finish_reason is 'stop'."""
    output_logprobs: list[float]
    """log_softmax of the raw logits (temperature 1, before top-k/top-p) at each output token."""
    finish_reason: str
    """'stop' (emitted a stop token) or 'length' (max_new_tokens reached), as SGLang's finish_reason.type."""
    trace: RoutingTrace | None
    """Routing of prompt_ids + output_ids: len(prompt) + len(output) - 1 rows; None if not requested/captured."""
    weight_version: int
    """Engine weight version when the request finished (bumped by every update_weights)."""


# At or below this temperature a request is greedy (as in vLLM): logits / T would overflow float32 to inf, and argmax
# over several +inf would pick the first, not the largest, logit.
GREEDY_TEMPERATURE = 1e-5


class SamplingMode(enum.Enum):
    """What the sampler must compute for a batch; chosen on the host per step (one CUDA graph per mode)."""

    GREEDY = "greedy"  # every row has temperature 0: argmax only, no noise
    SAMPLE = "sample"  # some row samples; no row filters
    FILTERED = "filtered"  # some row uses top-k or top-p (needs a sort of the vocabulary)

    @classmethod
    def for_params(cls, params: list[SamplingParams]) -> SamplingMode:
        if any(p.temperature > GREEDY_TEMPERATURE and (p.top_p < 1.0 or p.top_k > 0) for p in params):
            return cls.FILTERED
        if any(p.temperature > GREEDY_TEMPERATURE for p in params):
            return cls.SAMPLE
        return cls.GREEDY


@dataclass(frozen=True)
class SlotParams:
    """Per-row sampling parameters on the device (views of the engine's per-slot buffers)."""

    temperature_B: torch.Tensor  # float32
    top_p_B: torch.Tensor  # float32
    top_k_B: torch.Tensor  # int64, <= 0 disables
    seed_B: torch.Tensor  # int64 in [0, 2**32)

    def narrow(self, start: int, length: int) -> SlotParams:
        return SlotParams(*(t.narrow(0, start, length) for t in (self.temperature_B, self.top_p_B, self.top_k_B,
                                                                   self.seed_B)))


def fold_seed(seed: int) -> int:
    """Any Python int -> the 32-bit key the hash uses: splitmix64 of the seed (mod 2**64), high half.

    Every bit of the seed moves the key, so structured seeds such as `(step << 32) | i` do not collide the way a
    plain xor-fold would (fold(1) == fold(2**32)); distinct seeds still share a key with probability 2**-32."""
    z = (seed + 0x9E3779B97F4A7C15) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (z ^ (z >> 31)) >> 32


def vocab_keys(vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """Per-token-id hash keys `[V]` (int64), precomputed once per engine."""
    return _mix32((torch.arange(vocab_size, dtype=torch.int64, device=device) * 0x9E3779B1 + 0x7F4A7C15) & _M32)


def sample_tokens(
    logits_BV: torch.Tensor, params: SlotParams, counter_B: torch.Tensor, mode: SamplingMode, vocab_keys_V: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row. `counter_B` is the position the sampled token takes in its sequence.

    Returns (tokens_B int64, logprobs_B float32). Every op is row-wise, so a row's result does not depend on the
    other rows.
    """
    logits_BV = logits_BV.float()
    logprobs_BV = torch.log_softmax(logits_BV, dim=-1)
    greedy_B = logits_BV.argmax(dim=-1)
    if mode is SamplingMode.GREEDY:
        tokens_B = greedy_B
    else:
        temperature_B = params.temperature_B
        samples_B = temperature_B > GREEDY_TEMPERATURE
        scaled_BV = logits_BV / torch.where(samples_B, temperature_B, 1.0).unsqueeze(1)
        if mode is SamplingMode.FILTERED:
            scaled_BV = _mask_top_k_top_p(scaled_BV, params.top_k_B, params.top_p_B)
        noise_BV = _gumbel_BV(params.seed_B, counter_B, vocab_keys_V)
        sampled_B = (scaled_BV + noise_BV).argmax(dim=-1)
        tokens_B = torch.where(samples_B, sampled_B, greedy_B)
    return tokens_B, logprobs_BV.gather(1, tokens_B.unsqueeze(1)).squeeze(1)


# --- private helpers ------------------------------------------------------------------------------------------------
def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """32-bit integer mixer on int64 tensors holding values in [0, 2**32). Multipliers < 2**31 keep every product
    below 2**63, so no signed overflow happens on any backend."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def _gumbel_BV(seed_B: torch.Tensor, counter_B: torch.Tensor, vocab_keys_V: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from hash(seed, counter, token id); uniforms have 23 random bits, strictly inside (0, 1)."""
    row_key_B = _mix32(seed_B ^ _mix32((counter_B * 0x61C88647 + 0x3C6EF372) & _M32))
    bits_BV = _mix32(row_key_B.unsqueeze(1) ^ vocab_keys_V.unsqueeze(0)) >> 9
    uniform_BV = (bits_BV.float() + 0.5) * (1.0 / (1 << 23))
    return -torch.log(-torch.log(uniform_BV))


def _mask_top_k_top_p(scaled_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """-inf outside each row's top-k, then outside its top-p nucleus of the renormalized top-k distribution."""
    V = scaled_BV.shape[1]
    sorted_BV, order_BV = scaled_BV.sort(dim=-1, descending=True)
    rank_V = torch.arange(V, device=scaled_BV.device)
    k_B = torch.where(top_k_B > 0, top_k_B, V)
    remove_BV = rank_V.unsqueeze(0) >= k_B.unsqueeze(1)
    probs_BV = torch.softmax(sorted_BV.masked_fill(remove_BV, float("-inf")), dim=-1)
    mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV
    remove_BV |= (mass_before_BV >= top_p_B.unsqueeze(1)) & (top_p_B < 1.0).unsqueeze(1)
    remove_BV[:, 0] = False  # the top token always stays (a top_p that rounds to 0 in float32 would drop it)
    return scaled_BV.masked_fill(torch.zeros_like(remove_BV).scatter(1, order_BV, remove_BV), float("-inf"))
