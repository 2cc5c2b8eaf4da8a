"""Sampling on the device with per-request counter-based seeds, and the seed folding of the rollout engine.

    mode = SamplingMode.for_params([r.sampling for r in requests])
    tokens_B, logprobs_B = sample_tokens(logits_BV, slot_params, counter_B, mode, vocab_keys_V)

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
from dataclasses import dataclass

import torch

from r3rl.rollout.engine.messages import GREEDY_TEMPERATURE, SamplingParams
from r3rl.rollout.model import sampling_kernel

__all__ = ["SamplingMode", "SlotParams", "sample_tokens", "fold_seed", "group_seed", "splitmix64", "vocab_keys"]

_M32 = 0xFFFFFFFF


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
    logits_BV: torch.Tensor, params: SlotParams, counter_B: torch.Tensor, mode: SamplingMode,
    vocab_keys_V: torch.Tensor, *, fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row. `counter_B` is the position the sampled token takes in its sequence.

    Returns (tokens_B int64, logprobs_B float32). Every op is row-wise, so a row's result does not depend on the
    other rows. On CUDA with triton, GREEDY and SAMPLE batches run as one kernel (`sampling_kernel`, the same
    computation in one pass over the logits); `fused=False` keeps the torch ops below.
    """
    if fused and mode is not SamplingMode.FILTERED and logits_BV.is_cuda and sampling_kernel.available():
        return sampling_kernel.sample_fused(logits_BV, params.temperature_B, params.seed_B,
                                           params.logprob_temperature_B, counter_B,
                                           sample=mode is SamplingMode.SAMPLE, greedy_temperature=GREEDY_TEMPERATURE)
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
