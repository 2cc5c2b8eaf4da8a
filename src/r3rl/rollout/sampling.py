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

Logprobs: by default the returned log-prob of a token is log_softmax of the raw logits (temperature 1), before
top-k and top-p: the policy's own log-prob (SGLang returns it with SGLANG_RETURN_ORIGINAL_LOGPROB=1). With
`SamplingParams.logprobs_at_temperature` it is log_softmax(logits / temperature), still before top-k/top-p: the
log-prob under the distribution that was sampled (SGLang's default). Greedy rows always return the raw one.

Tensor suffixes: B batch rows, V vocabulary.
"""

from __future__ import annotations

import enum
import math
import operator
from dataclasses import dataclass, field

import torch

from r3rl.rollout.protocol import MAX_TEMPERATURE, ProtocolError
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
    finish_reason: str
    """'stop' (emitted a stop token) or 'length' (max_new_tokens reached), as SGLang's finish_reason.type."""
    trace: RoutingTrace | None
    """Routing of prompt_ids + output_ids: len(prompt) + len(output) - 1 rows; None if not requested/captured."""
    weight_version: int
    """Engine weight version when the request finished (bumped by every update_weights)."""
    weight_version_start: int
    """Engine weight version when the request was admitted (its prefill); differs from `weight_version` when an
    update happened while it ran (later tokens then came from the newer weights)."""


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
    logprob_temperature_B: torch.Tensor  # float32: 1.0 = raw log-probs, else log_softmax(logits / this)

    def narrow(self, start: int, length: int) -> SlotParams:
        return SlotParams(*(t.narrow(0, start, length) for t in vars(self).values()))


def splitmix64(x: int) -> int:
    """splitmix64 finalizer of x mod 2**64: a bijection on 64-bit ints where every input bit moves every output bit."""
    z = (x + 0x9E3779B97F4A7C15) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return z ^ (z >> 31)


def fold_seed(seed: int) -> int:
    """Any Python int -> the 32-bit key the hash uses: splitmix64 of the seed (mod 2**64), high half.

    Every bit of the seed moves the key, so structured seeds such as `(step << 32) | i` do not collide the way a
    plain xor-fold would (fold(1) == fold(2**32)); distinct seeds still share a key with probability 2**-32."""
    return splitmix64(seed) >> 32


def group_seed(base_seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of sample `sample_index` of prompt `prompt_index` in a generate call seeded with `base_seed`:
    splitmix64 folded over the three, in [0, 2**63) (a valid wire seed). Distinct indices give distinct seeds
    (splitmix64 is a bijection; collisions only through the final 63-bit truncation)."""
    z = splitmix64(splitmix64(splitmix64(base_seed) ^ prompt_index) ^ sample_index)
    return z >> 1


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
    # x / 1.0 == x exactly: rows with raw log-probs are bitwise what log_softmax(logits) gives
    logprobs_BV = torch.log_softmax(logits_BV / params.logprob_temperature_B.unsqueeze(1), dim=-1)
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
