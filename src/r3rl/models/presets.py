"""Model presets and `init-model`: random-init HF MoE checkpoints that `AutoModelForCausalLM.from_pretrained` loads.

    r3rl init-model --preset tiny-qwen3-moe --out /tmp/tiny

Presets:
  tiny-qwen3-moe, tiny-qwen2-moe, tiny-mixtral, tiny-olmoe   CPU-fast (about 0.5 M params), for tests and CI
  probe-qwen3-moe    Qwen3-30B-A3B's MoE layer shape (hidden 2048, 128 experts, top-8, moe_intermediate 768) with
                     8 layers and a 32k vocabulary, for GPU benchmarks
  bench-qwen3-moe    hidden 1024, 8 layers, 64 experts, top-8: the rollout benchmark's small shape
  tiny-deepseek-v3, tiny-glm4-moe, tiny-gpt-oss, tiny-minimax-m2
                     CPU-fast, with each family's routing features on (groups, correction bias, scaling factor, dense
                     first layer, shared expert; sinks and sliding windows for GPT-OSS)
  probe-deepseek-v3, probe-glm4-moe, probe-gpt-oss, probe-minimax-m2
                     the real model's MoE layer shape, a few layers, 32k vocabulary (GPU)
  tiny-qwen3-next    CPU-fast hybrid: 3 gated-delta-net linear-attention layers + 1 full-attention layer (the real
                     model's full_attention_interval of 4), a dense first layer, 16 experts top-4 with the shared
                     expert and its sigmoid gate
  probe-qwen3-next   Qwen3-Next-80B-A3B's layer shapes (hidden 2048, 512 experts, top-10, moe_intermediate 512, shared
                     expert 512, linear attention 16 key / 32 value heads of 128, full attention 16 heads of 256 over 2
                     KV heads), 4 layers (3 linear + 1 full), 32k vocabulary (GPU, bf16 about 13 GB)

A preset whose model class the installed transformers lacks fails in `make_config` naming the model type.

Router init: a trained MoE's router logits are peaked, not uniform; with HF's default init (std 0.02) a random
router's logits have std 0.02*sqrt(hidden) (0.16 at hidden 64), so every expert ties and top-k is noise. We draw
router weights with std `ROUTER_LOGIT_STD / sqrt(hidden)`: the router's input is RMS-normalized (per-dimension
std ~1), so its logits have std ~ROUTER_LOGIT_STD = 2.0, which puts the top-1 expert's softmax probability at
several times the uniform 1/E. Near-ties still happen, which is exactly what rollout/training mismatch needs.
Selection-only correction biases (DeepSeek-V3, GLM-4.5, MiniMax-M2) start at std CORRECTION_BIAS_STD and GPT-OSS's
router bias at std 0.5, so both change which experts are picked.

The tokenizer is byte-level (256 byte tokens + <pad>, <bos>, <eos>), built with the `tokenizers` library, so no
file is fetched from a hub. It ships a small chat template (`r3rl.models.chat.CHAT_TEMPLATE`), as real checkpoints do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from r3rl.models.adapters import find_routers
from r3rl.models.chat import CHAT_TEMPLATE

__all__ = ["PRESETS", "ModelPreset", "make_config", "make_model", "make_tokenizer", "init_model", "preset_available",
           "ROUTER_LOGIT_STD", "CORRECTION_BIAS_STD", "TINY_FAMILIES", "TINY_NEW_FAMILIES"]

TINY_FAMILIES = ("tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-mixtral", "tiny-olmoe")
"""The CPU-fast presets of the first four families (softmax routers)."""
TINY_NEW_FAMILIES = ("tiny-deepseek-v3", "tiny-glm4-moe", "tiny-gpt-oss", "tiny-minimax-m2", "tiny-qwen3-next")
"""The CPU-fast presets of the families added later, each with its routing features on (groups, correction bias,
scaling, dense first layer, shared expert, sinks and windows, linear attention)."""

ROUTER_LOGIT_STD = 2.0
CORRECTION_BIAS_STD = 0.1  # sigmoid scores of logits with std 2 spread over ~[0.1, 0.9]: a bias this size flips picks
BYTE_VOCAB = 256
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258


@dataclass(frozen=True)
class ModelPreset:
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    random_biases: bool = False  # draw the linear / expert biases (zero in HF's init) so that they are exercised


_TINY_COMMON = dict(
    vocab_size=320, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
)

_PROBE_COMMON = dict(vocab_size=32768, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False)

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
        dict(_PROBE_COMMON, hidden_size=2048, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4,
             head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
             norm_topk_prob=True),
        "Qwen3-30B-A3B MoE shape, 8 layers, 128 experts, top-8 (GPU)",
    ),
    # --- the families RL users train in 2026 (tiny: every routing feature on; probe: the real MoE layer shape) ---
    "tiny-deepseek-v3": ModelPreset(
        "deepseek_v3",
        dict(_TINY_COMMON, num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16,
             num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
             routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
             head_dim=8, qk_nope_head_dim=16, v_head_dim=16),
        "DeepSeek-V3 (Kimi-K2): MLA, 1 dense + 3 MoE layers, 16 experts in 4 groups (top-2 groups), top-4, "
        "sigmoid + correction bias, scaling 2.5, shared expert",
    ),
    "tiny-glm4-moe": ModelPreset(
        "glm4_moe",
        dict(_TINY_COMMON, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4,
             n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
             norm_topk_prob=True, use_qk_norm=True, attention_bias=True,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
        "GLM-4.5: GQA, partial rotary, qk norm, 1 dense + 3 MoE layers, 16 experts in 4 groups, top-4, sigmoid + "
        "correction bias, scaling 2.5, shared expert",
        random_biases=True,
    ),
    "tiny-gpt-oss": ModelPreset(
        "gpt_oss",
        dict(_TINY_COMMON, intermediate_size=32, num_local_experts=32, num_experts_per_tok=4, sliding_window=8,
             layer_types=["sliding_attention", "full_attention"] * 2, attention_bias=True,
             rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                              "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 128}),
        "GPT-OSS: attention sinks, alternating sliding-window (8) / full layers, 32 experts (gpt-oss-20b), top-4 on "
        "biased logits",
        random_biases=True,
    ),
    "tiny-minimax-m2": ModelPreset(
        "minimax_m2",
        dict(_TINY_COMMON, intermediate_size=32, num_local_experts=16, num_experts_per_tok=4,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
        "MiniMax-M2: GQA, partial rotary, q/k norm, 16 experts, top-4, sigmoid + the MoE block's correction bias",
    ),
    "probe-deepseek-v3": ModelPreset(
        "deepseek_v3",
        dict(_PROBE_COMMON, hidden_size=7168, num_hidden_layers=3, num_attention_heads=128, num_key_value_heads=128,
             intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8,
             n_group=8, topk_group=4, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
             norm_topk_prob=True, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, head_dim=64,
             qk_nope_head_dim=128, v_head_dim=128),
        "DeepSeek-V3 MoE layer shape (hidden 7168, 256 experts, top-8, groups 8/4), 1 dense + 2 MoE layers (GPU)",
    ),
    "probe-glm4-moe": ModelPreset(
        "glm4_moe",
        dict(_PROBE_COMMON, hidden_size=5120, num_hidden_layers=4, num_attention_heads=96, num_key_value_heads=8,
             head_dim=128, intermediate_size=12288, moe_intermediate_size=1536, n_routed_experts=160,
             num_experts_per_tok=8, n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
             routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True, attention_bias=True,
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5}),
        "GLM-4.5 MoE layer shape (hidden 5120, 160 experts, top-8), 1 dense + 3 MoE layers (GPU)",
    ),
    "probe-gpt-oss": ModelPreset(
        "gpt_oss",
        dict(_PROBE_COMMON, hidden_size=2880, num_hidden_layers=4, num_attention_heads=64, num_key_value_heads=8,
             head_dim=64, intermediate_size=2880, num_local_experts=128, num_experts_per_tok=4, sliding_window=128,
             layer_types=["sliding_attention", "full_attention"] * 2, attention_bias=True,
             max_position_embeddings=131072,
             rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                              "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096}),
        "gpt-oss-120b MoE layer shape (hidden 2880, 128 experts, top-4), 4 layers (GPU)",
    ),
    "probe-minimax-m2": ModelPreset(
        "minimax_m2",
        dict(_PROBE_COMMON, hidden_size=3072, num_hidden_layers=4, num_attention_heads=48, num_key_value_heads=8,
             head_dim=128, intermediate_size=1536, num_local_experts=256, num_experts_per_tok=8,
             rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.5}),
        "MiniMax-M2 MoE layer shape (hidden 3072, 256 experts, top-8), 4 layers (GPU)",
    ),
    "tiny-qwen3-next": ModelPreset(
        "qwen3_next",
        dict(_TINY_COMMON, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
             num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, mlp_only_layers=[0],
             layer_types=["linear_attention"] * 3 + ["full_attention"], linear_num_key_heads=2,
             linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4),
        "Qwen3-Next: 3 gated-delta-net (linear attention) layers + 1 full-attention layer, dense layer 0 + 3 MoE "
        "layers, 16 experts, top-4, shared expert with a sigmoid gate",
    ),
    "probe-qwen3-next": ModelPreset(
        "qwen3_next",
        dict(_PROBE_COMMON, hidden_size=2048, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=2,
             head_dim=256, intermediate_size=5120, moe_intermediate_size=512, shared_expert_intermediate_size=512,
             num_experts=512, num_experts_per_tok=10, norm_topk_prob=True, mlp_only_layers=[],
             layer_types=["linear_attention"] * 3 + ["full_attention"], linear_num_key_heads=16,
             linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
             rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25}),
        "Qwen3-Next-80B-A3B layer shapes (hidden 2048, 512 experts, top-10, shared expert), 3 linear-attention + 1 "
        "full-attention layers, all MoE (GPU)",
    ),
    "bench-qwen3-moe": ModelPreset(
        "qwen3_moe",
        dict(_PROBE_COMMON, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
             head_dim=64, intermediate_size=3072, moe_intermediate_size=512, num_experts=64, num_experts_per_tok=8,
             norm_topk_prob=True),
        "hidden 1024, 8 layers, 64 experts, top-8 (GPU rollout benchmark)",
    ),
}


def preset_available(preset: str) -> bool:
    """Whether the installed transformers has the model class of `preset` (families arrive in different 5.x)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return PRESETS[preset].model_type in CONFIG_MAPPING


def make_config(preset: str, **overrides: Any):
    if preset not in PRESETS:
        raise KeyError(f"unknown preset '{preset}': choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    if not preset_available(preset):
        import transformers

        raise KeyError(f"preset '{preset}' needs model type '{p.model_type}', which transformers "
                       f"{transformers.__version__} does not have: upgrade transformers or pick another preset")
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
    if PRESETS[preset].random_biases:
        _draw_biases(model, seed)
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
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


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
def _draw_biases(model: PreTrainedModel, seed: int) -> None:
    """Attention and expert biases (HF initializes them to zero) drawn with std 0.02; router biases are left alone."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 2)
    for name, p in model.named_parameters():
        if name.endswith("bias") and ("self_attn" in name or "experts" in name):
            p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))


@torch.no_grad()
def _peak_routers(model: PreTrainedModel, seed: int) -> None:
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    for site in find_routers(model):
        w = site.router.weight
        std = ROUTER_LOGIT_STD / math.sqrt(w.shape[1])
        w.copy_((torch.randn(w.shape, generator=gen) * std).to(w.dtype))
        # Biases start nonzero so that they matter: the correction bias moves the selection (and must stay out of
        # the gate weights), GPT-OSS's logit bias shifts the logits. Families without them draw nothing here.
        t = site.adapter.tensors(site)
        for bias, bias_std in ((t.correction, CORRECTION_BIAS_STD), (t.logit_bias, ROUTER_LOGIT_STD / 4)):
            if bias is not None:
                bias.copy_((torch.randn(bias.shape, generator=gen) * bias_std).to(bias.dtype))
