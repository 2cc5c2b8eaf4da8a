"""The one-pass sampler kernel (sampling_kernel.py) against the torch sampler (sampling.sample_tokens with
fused=False): the same tokens and log-probs, under Triton's CPU interpreter and, on GPU, at the probe's vocabulary.

    pytest tests/rollout/model/test_sampling_kernel.py -q       # the interpreter test skips without triton
"""

from __future__ import annotations

import pytest
import torch
from _triton_util import compile_sm90, run_interpreted

from r3rl.rollout.model import sampling_kernel as sk

# Runs in a subprocess with TRITON_INTERPRET=1 (the interpreter must be chosen before triton is imported).
_INTERPRET = r"""
import torch
from test_sampling_kernel import compare
for V, block in [(1000, 256), (4096, 4096), (77, 64)]:   # chunks that do not divide V; one chunk; tiny
    for dtype in (torch.float32, torch.bfloat16):
        print(V, dtype, compare("cpu", B=48, V=V, dtype=dtype, block_v=block))
print("ok")
"""


def _params(B: int, device: str, seed: int = 0):
    from r3rl.rollout.engine.sampling import SlotParams, fold_seed

    g = torch.Generator().manual_seed(seed)
    temperature = torch.tensor([0.0, 0.6, 1.0, 1.3])[torch.arange(B) % 4]  # greedy rows mixed with sampling ones
    lp_temperature = torch.where(torch.arange(B) % 3 == 0, temperature.clamp(min=0.5), torch.ones(B))
    seeds = torch.tensor([fold_seed(int(s)) for s in torch.randint(0, 2**62, (B,), generator=g)])
    return SlotParams(temperature.to(device), torch.ones(B, device=device),
                      torch.zeros(B, dtype=torch.int64, device=device), seeds.to(device), lp_temperature.to(device))


def compare(device: str, *, B: int, V: int, dtype: torch.dtype, block_v: int = 4096) -> dict:
    """Kernel vs torch sampler on random logits in both modes; asserts and returns the agreement."""
    from r3rl.rollout.engine.sampling import SamplingMode, sample_tokens, vocab_keys

    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype).to(device)
    logits[1, 5] = logits[1, 9] = logits[1].max() + 1  # a tie: the first index wins in both
    params = _params(B, device)
    counter = torch.randint(0, 2**40, (B,), generator=g).to(device)
    keys = vocab_keys(V, device)
    out = {}
    for mode in (SamplingMode.GREEDY, SamplingMode.SAMPLE):
        want_tok, want_lp = sample_tokens(logits, params, counter, mode, keys, fused=False)
        got_tok, got_lp = sk.sample_fused(logits, params.temperature_B, params.seed_B, params.logprob_temperature_B,
                                          counter, sample=mode is SamplingMode.SAMPLE, greedy_temperature=1e-5,
                                          block_v=block_v)
        same = (got_tok == want_tok).float().mean().item()
        err = (got_lp - want_lp).abs().max().item()
        assert same == 1.0 and err <= 1e-4, (mode, same, err)
        if mode is SamplingMode.SAMPLE:  # the sampling rows really sample: not the greedy token
            greedy = logits.float().argmax(-1)
            assert (got_tok != greedy)[params.temperature_B > 0].float().mean() > 0.5
            # negative control: another counter (the next position) draws other tokens, caught by the comparison
            other, _ = sk.sample_fused(logits, params.temperature_B, params.seed_B, params.logprob_temperature_B,
                                       counter + 1, sample=True, greedy_temperature=1e-5, block_v=block_v)
            assert (other != want_tok)[params.temperature_B > 0].float().mean() > 0.5
        out[mode.value] = (same, err)
    return out


@pytest.mark.skipif(not sk.available(), reason="triton not installed (the kernel runs in the GPU test)")
def test_sampler_kernel_in_interpreter_matches_torch_sampler():
    run_interpreted(_INTERPRET)


def test_sampler_kernel_rejects_bad_shapes():
    if not sk.available():
        with pytest.raises(RuntimeError, match="triton"):
            sk.sample_fused(torch.zeros(2, 8), *[torch.zeros(2)] * 4, sample=True, greedy_temperature=1e-5)
        return
    with pytest.raises(ValueError, match="seed must be \\[B=2\\]"):
        sk.sample_fused(torch.zeros(2, 8), torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2),
                        sample=True, greedy_temperature=1e-5)
    with pytest.raises(ValueError, match="contiguous last dim"):
        sk.sample_fused(torch.zeros(8, 2).t(), *[torch.zeros(2)] * 4, sample=True, greedy_temperature=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and sk.available()), reason="needs CUDA and triton")
@pytest.mark.parametrize("B", [32, 256])
def test_sampler_kernel_on_gpu_matches_torch_sampler(B):
    """The probe's vocabulary (32,768) and Qwen3's (151,936), bf16 logits as the engine's LM head returns them."""
    for V in (32768, 151936):
        print(B, V, compare("cuda", B=B, V=V, dtype=torch.bfloat16))


@pytest.mark.skipif(not sk.available(), reason="triton not installed")
def test_sampler_kernel_compiles_for_sm90():
    """The interpreter runs the kernel's Python with numpy semantics; compile it for an H100/H200 here (no GPU
    needed) so that the uint32 hash and the chunk loop also pass Triton's compiler, for both modes."""
    types = dict(logits_ptr="*bf16", temperature_ptr="*fp32", seed_ptr="*i64", lp_temperature_ptr="*fp32",
                 counter_ptr="*i64", tokens_ptr="*i64", logprobs_ptr="*fp32", stride_b="i32", V="i32",
                 greedy_temperature="fp32")
    for sample in (False, True):
        ptx = compile_sm90(sk._sample_kernel, types, dict(SAMPLE=sample, BLOCK_V=4096))
        assert ("mul.lo.s32" in ptx or "mul.lo.u32" in ptx) == sample  # the hash's wrapping 32-bit multiplies
