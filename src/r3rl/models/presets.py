"""Model presets and `init-model`: random-init HF MoE checkpoints that `AutoModelForCausalLM.from_pretrained` loads.

    r3rl init-model --preset tiny-qwen3-moe --out /tmp/tiny

Presets:
  tiny-qwen3-moe, tiny-qwen2-moe, tiny-mixtral, tiny-olmoe   CPU-fast (about 0.5 M params), for tests and CI
  probe-qwen3-moe    Qwen3-30B-A3B's MoE layer shape (hidden 2048, 128 experts, top-8, moe_intermediate 768) with
                     8 layers and a 32k vocabulary, for GPU benchmarks
  bench-qwen3-moe    hidden 1024, 8 layers, 64 experts, top-8: the rollout benchmark's small shape

Router init: a trained MoE's router logits are peaked, not uniform; with HF's default init (std 0.02) a random
router's logits have std 0.02*sqrt(hidden) (0.16 at hidden 64), so every expert ties and top-k is noise. We draw
router weights with std `ROUTER_LOGIT_STD / sqrt(hidden)`: the router's input is RMS-normalized (per-dimension
std ~1), so its logits have std ~ROUTER_LOGIT_STD = 2.0, which puts the top-1 expert's softmax probability at
several times the uniform 1/E. Near-ties still happen, which is exactly what rollout/training mismatch needs.

The tokenizer is byte-level (256 byte tokens + <pad>, <bos>, <eos>), built with the `tokenizers` library, so no
file is fetched from a hub.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from r3rl.models.adapters import find_routers

__all__ = ["PRESETS", "ModelPreset", "make_config", "make_model", "make_tokenizer", "init_model", "ROUTER_LOGIT_STD"]

ROUTER_LOGIT_STD = 2.0
BYTE_VOCAB = 256
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258


@dataclass(frozen=True)
class ModelPreset:
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_TINY_COMMON = dict(
    vocab_size=320, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
)

PRESETS: dict[str, ModelPreset] = {
    "tiny-qwen3-moe": ModelPreset(
        "qwen3_moe",
        dict(_TINY_COMMON, intermediate_size=128, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
             norm_topk_prob=True),
        "Qwen3-MoE, 4 layers, 16 experts, top-4",
    ),
    "tiny-qwen2-moe": ModelPreset(
        "qwen2_moe",
        dict(_TINY_COMMON, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
             num_experts=16, num_experts_per_tok=4, norm_topk_prob=False),
        "Qwen2-MoE with shared expert, 4 layers, 16 experts, top-4",
    ),
    "tiny-mixtral": ModelPreset(
        "mixtral",
        dict(_TINY_COMMON, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
        "Mixtral, 4 layers, 8 experts, top-2",
    ),
    "tiny-olmoe": ModelPreset(
        "olmoe",
        dict(_TINY_COMMON, intermediate_size=32, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False),
        "OLMoE, 4 layers, 16 experts, top-4",
    ),
    "probe-qwen3-moe": ModelPreset(
        "qwen3_moe",
        dict(vocab_size=32768, hidden_size=2048, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4,
             head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
             norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False),
        "Qwen3-30B-A3B MoE shape, 8 layers, 128 experts, top-8 (GPU)",
    ),
    "bench-qwen3-moe": ModelPreset(
        "qwen3_moe",
        dict(vocab_size=32768, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
             head_dim=64, intermediate_size=3072, moe_intermediate_size=512, num_experts=64, num_experts_per_tok=8,
             norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False),
        "hidden 1024, 8 layers, 64 experts, top-8 (GPU rollout benchmark)",
    ),
}


def make_config(preset: str, **overrides: Any):
    if preset not in PRESETS:
        raise KeyError(f"unknown preset '{preset}': choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    kwargs = dict(p.config, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    kwargs.update(overrides)
    return AutoConfig.for_model(p.model_type, **kwargs)


def make_model(
    preset: str,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> PreTrainedModel:
    """A randomly initialized model of `preset` with peaked router init (see module docstring).

    `overrides` replace config fields (e.g. `num_experts=300` for the int16 trace path).
    """
    config = make_config(preset, **overrides)
    dev = torch.device(device)
    # A private RNG stream: the caller's global RNG state is the same after this call as before it.
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        with dev:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _peak_routers(model, seed)
    return model.eval()


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {_byte_token(i): i for i in range(BYTE_VOCAB)}
    vocab.update({"<pad>": PAD_ID, "<bos>": BOS_ID, "<eos>": EOS_ID})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        pre_tokenizers.Split(Regex("."), behavior="isolated"),  # one token per byte
    ])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<pad>"
    )


def init_model(preset: str, out: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json, model.safetensors and the tokenizer for `preset` into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = make_model(preset, seed=seed, dtype=dtype)
    model.save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out


def _byte_token(i: int) -> str:
    """The ByteLevel pre-tokenizer's printable alphabet character for byte i."""
    return _BYTES_TO_UNICODE[i]


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_BYTES_TO_UNICODE = _bytes_to_unicode()


@torch.no_grad()
def _peak_routers(model: PreTrainedModel, seed: int) -> None:
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    for site in find_routers(model):
        w = site.router.weight
        std = ROUTER_LOGIT_STD / math.sqrt(w.shape[1])
        w.copy_((torch.randn(w.shape, generator=gen) * std).to(w.dtype))
