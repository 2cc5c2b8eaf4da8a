"""The rollout engine's model: its own copy of the weights and its own forward (prefill and decode).

One forward for every supported family, composed per decoder layer from the shared attention block
(`r3rl.rollout.model.attention`: fused QKV, q/k norms, full or partial RoPE, sliding windows, sinks) and either a dense
MLP or the shared MoE block (`r3rl.rollout.model.moe`: the family's routing from `r3rl.models.routing`, routed and
shared experts). DeepSeek-V3 layers use multi-head latent attention over a compressed-latent cache instead
(`r3rl.rollout.model.attention_mla`); Qwen3-Next's linear-attention layers are gated delta-nets over a per-slot
recurrent state (`r3rl.rollout.model.attention_linear`; its full-attention layers gate their output, its norms are
zero-centered).
Families: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, GLM-4.5, MiniMax-M2, GPT-OSS, DeepSeek-V3, Qwen3-Next. Every
(token, MoE layer) top-k is written into the routing capture buffer inside the forward.
Used by `r3rl.rollout.engine.engine.RolloutEngine`; not a public API.

Tensor suffixes: S slots, T tokens, B decode rows, N prefill requests, P positions, H hidden, Q fused qkv width,
D head dim, E experts, K top-k, I intermediate, V vocabulary.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from r3rl.models.adapters import RouterSite, find_routers
from r3rl.rollout.model import paged_attention
from r3rl.rollout.model.attention import (
    AttentionWeights,
    decode_attention,
    decode_bias,
    prefill_attention,
    qkv,
    rms_norm,
    rope_tables,
    rowwise_linear,
)
from r3rl.rollout.model.attention_linear import (
    LinearAttentionSpec,
    LinearAttentionWeights,
    LinearStateCache,
    linear_attention_decode,
    linear_attention_prefill,
    load_linear_attention,
)
from r3rl.rollout.model.attention_mla import MLAWeights, mla_decode, mla_prefill
from r3rl.rollout.model.kv_cache import KVCache, NullRoutingCapture, RoutingCapture, TokenWhere
from r3rl.rollout.model.moe import ExpertAct, MoEBlock, MoEKernel, MoEWeights

__all__ = ["MoEKernel", "MoEForward"]

logger = logging.getLogger(__name__)

_UNSUPPORTED: dict[str, str] = {}  # model type -> what the engine lacks for it
_FP32_NORMS = {"gpt_oss"}  # families whose HF model keeps its RMSNorm weights (and their product) in float32
_ZERO_CENTERED_NORMS = {"qwen3_next"}  # RMSNorms scale by (1 + weight), in float32
_GATED_ATTENTION = {"qwen3_next"}  # q_proj emits a per-head output gate


@dataclass
class _Layer:
    input_norm_H: torch.Tensor
    post_norm_H: torch.Tensor
    attn: AttentionWeights | MLAWeights | LinearAttentionWeights
    moe: MoEWeights | None = None  # None for a dense layer
    mlp_gate_up_IH: torch.Tensor | None = None  # dense MLP
    mlp_down_HI: torch.Tensor | None = None

    @property
    def experts_gate_up_EIH(self) -> torch.Tensor | None:
        return None if self.moe is None else self.moe.gate_up_EIH

    @property
    def experts_down_EHI(self) -> torch.Tensor | None:
        return None if self.moe is None else self.moe.down_EHI


class MoEForward:
    """The engine's copy of the weights and its prefill/decode forward (no autograd, no HF modules)."""

    def __init__(self, model: PreTrainedModel, *, device: torch.device, dtype: torch.dtype, max_seq_len: int,
                 max_slots: int, batch_invariant: bool, fused_moe: bool = True) -> None:
        cfg = model.config
        _check_supported(model)
        sites = {int(re.search(r"layers\.(\d+)\.", s.name).group(1)): s for s in find_routers(model)}  # raises
        first = next(iter(sites.values()))
        self.family, self.num_experts, self.top_k, self.num_moe_layers = (cfg.model_type, first.num_experts,
                                                                          first.top_k, len(sites))
        self.num_decoder_layers, self.vocab_size, self.eps = cfg.num_hidden_layers, cfg.vocab_size, cfg.rms_norm_eps
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.mla = getattr(cfg, "kv_lora_rank", None) is not None
        if self.mla:  # the KV cache holds one latent "head" per token (see attention_mla)
            self.num_kv_heads, self.head_dim = 1, cfg.kv_lora_rank
        self.scale = self.head_dim**-0.5
        self.clip_qkv = getattr(cfg, "clip_qkv", None)
        self.act = ACT2FN[cfg.hidden_act]
        self.linear, self.batch_invariant = rowwise_linear if batch_invariant else F.linear, batch_invariant
        self.windows = _windows(model, max_seq_len)
        self.norm_offset = cfg.model_type in _ZERO_CENTERED_NORMS
        layer_types = getattr(cfg, "layer_types", None) or []
        self.linear_layers = [i for i, t in enumerate(layer_types) if t == "linear_attention"]
        self.linear_spec = LinearAttentionSpec.from_config(cfg) if self.linear_layers else None
        # the KV cache holds the attention layers only: decoder layer -> its index in the KV pools
        self.kv_index = {i: j for j, i in enumerate(x for x in range(cfg.num_hidden_layers)
                                                    if x not in self.linear_layers)}
        self.expert_act = ExpertAct.GPT_OSS if cfg.model_type == "gpt_oss" else ExpertAct.SWIGLU

        self.config, self.hf_layers = cfg, model.model.layers  # read while loading, then dropped
        loader = _Loader(model.state_dict(), device, dtype)
        self.embed_VH = loader.take("model.embed_tokens.weight")
        self.norm_dtype = torch.float32 if cfg.model_type in _FP32_NORMS else None
        self.final_norm_H = loader.take("model.norm.weight", dtype=self.norm_dtype)
        self.lm_head_VH = loader.take("lm_head.weight", tied_to="model.embed_tokens.weight")
        self.layers = [self._load_layer(loader, i, sites.get(i)) for i in range(self.num_decoder_layers)]
        loader.check_all_taken(type(model).__name__)
        del self.config, self.hf_layers
        self.views, self.shapes = loader.views, loader.shapes  # for update_weights
        self.cos_PD, self.sin_PD = rope_tables(model, max_seq_len, device, dtype)
        # per decoder layer: decode may compute q/k and write K/V in one kernel (when attention reads in place)
        self._qk_kernel = [isinstance(lw.attn, AttentionWeights) and self._qk_kernel_fits(lw.attn)
                           for lw in self.layers]
        self._arange = torch.arange(max(max_seq_len, max_slots), device=device)
        self.moe = MoEBlock(num_experts=self.num_experts, act=self.act, expert_act=self.expert_act,
                            linear=self.linear, batch_invariant=batch_invariant,
                            probe=next(lw.moe for lw in self.layers if lw.moe is not None),
                            alpha=float(getattr(cfg, "swiglu_alpha", 1.702)),
                            limit=float(getattr(cfg, "swiglu_limit", 7.0)), fused=fused_moe)
        self.moe_kernel = self.moe.kernel
        self._paged_fits: dict[int, bool] = {}  # block size -> decode attention reads the blocks in place (Triton)

    def weight_bytes(self) -> tuple[int, int]:
        """(bytes of every engine weight except the routed experts, bytes of one routed expert of one layer)."""
        seen, total, experts = set(), 0, 0
        for name, t in self.views.items():
            if t.data_ptr() in seen and name == "lm_head.weight":  # tied to the embedding: stored once
                continue
            seen.add(t.data_ptr())
            nbytes = t.numel() * t.element_size()
            total += nbytes
            experts += nbytes if ".mlp.experts." in name else 0
        return total - experts, experts // (self.num_experts * self.num_moe_layers)

    # --- forward ----------------------------------------------------------------------------------------------------
    @property
    def num_attention_layers(self) -> int:
        """Decoder layers with a KV cache (all but the linear-attention ones)."""
        return len(self.kv_index)

    def prefill(self, tokens_NP: torch.Tensor, lengths_N: torch.Tensor, rows_N: torch.Tensor, kv: KVCache,
                routes: RoutingCapture | NullRoutingCapture, state: LinearStateCache | None = None) -> torch.Tensor:
        """N right-padded prompts into slots rows_N (their KV blocks, see paging.py, and their linear-attention
        state). Returns the logits of each last prompt token."""
        N, P = tokens_NP.shape
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        valid_T = (self._arange[:P].unsqueeze(0) < lengths_N.unsqueeze(1)).flatten() if N > 1 else None
        cos_TD, sin_TD = self.cos_PD[:P].repeat(N, 1), self.sin_PD[:P].repeat(N, 1)
        where = TokenWhere.prefill(kv.table, rows_N, self._arange[:P])  # once, for every layer's writes
        x_TH = self.embed_VH[tokens_NP.flatten()]
        for i, lw in enumerate(self.layers):
            h_TH = self._norm(x_TH, lw.input_norm_H)
            if isinstance(lw.attn, LinearAttentionWeights):
                x_TH = x_TH + linear_attention_prefill(lw.attn, h_TH, lengths_N, rows_N, state, i, linear=self.linear,
                                                               batch_invariant=self.batch_invariant)
            elif self.mla:
                x_TH = x_TH + mla_prefill(lw.attn, h_TH, N, P, cos_TD, sin_TD, kv, self.kv_index[i], where,
                                          self.linear)
            else:
                q_THD, k_THD, v_THD, gate_TQ = self._qkv(lw, h_TH, cos_TD, sin_TD)
                k_NPHD, v_NPHD = (t.view(N, P, Hkv, D) for t in (k_THD, v_THD))
                kv.write(self.kv_index[i], where, k_NPHD, v_NPHD)
                k_NHPD, v_NHPD = k_NPHD.transpose(1, 2), v_NPHD.transpose(1, 2)
                q_NHPD = q_THD.view(N, P, Hq, D).transpose(1, 2)
                o_NHPD = prefill_attention(lw.attn, q_NHPD, k_NHPD, v_NHPD, self.scale)
                o_TQ = o_NHPD.transpose(1, 2).reshape(N * P, Hq * D)
                x_TH = x_TH + self.linear(o_TQ if gate_TQ is None else o_TQ * torch.sigmoid(gate_TQ), lw.attn.o_HQ,
                                          lw.attn.o_bias_H)
            x_TH = self._mlp(lw, self._norm(x_TH, lw.post_norm_H), valid_T, routes, where, x_TH)
        last_NH = x_TH.view(N, P, -1)[self._arange[:N], lengths_N - 1]
        return self.linear(self._norm(last_NH, self.final_norm_H), self.lm_head_VH)

    def decode(self, tokens_B: torch.Tensor, pos_B: torch.Tensor, T: int, active_B: torch.Tensor | None, kv: KVCache,
               routes: RoutingCapture | NullRoutingCapture, state: LinearStateCache | None = None) -> torch.Tensor:
        """One token for each of slots [0, B), attending over positions [0, T) (a multiple of the KV block size);
        linear-attention layers advance the slots' states in place. Returns logits `[B, V]`."""
        B = tokens_B.shape[0]
        where = TokenWhere.decode(kv.table, self._arange[:B], pos_B)  # once per step, for every layer's writes
        in_place = self.decodes_in_place(kv)
        # additive masks, built once per step (one per distinct window): row b sees positions <= pos_B[b]
        bias_by_window = {} if in_place else {
            w: decode_bias(pos_B, T, self.num_heads, self.num_kv_heads, self.embed_VH.dtype, w)
            for w in set(self.windows)}
        cos_BD, sin_BD = self.cos_PD[pos_B], self.sin_PD[pos_B]
        x_BH = self.embed_VH[tokens_B]
        for i, lw in enumerate(self.layers):
            h_BH = self._norm(x_BH, lw.input_norm_H)
            if isinstance(lw.attn, LinearAttentionWeights):
                x_BH = x_BH + linear_attention_decode(lw.attn, h_BH, state, i, linear=self.linear,
                                                      batch_invariant=self.batch_invariant)
            elif self.mla:
                x_BH = x_BH + mla_decode(lw.attn, h_BH, cos_BD, sin_BD, kv, self.kv_index[i], where, T,
                                         bias_by_window[None], self.linear, batch_invariant=self.batch_invariant)
            else:
                j = self.kv_index[i]
                if in_place and self._qk_kernel[i]:  # one kernel: q/k norm, RoPE, K/V written
                    gate_BQ = None
                    q_BHD = paged_attention.qk_norm_rope_write(
                        self.linear(h_BH, lw.attn.qkv_QH, lw.attn.qkv_bias_Q), lw.attn.qk_norm_XD, self.cos_PD,
                        self.sin_PD, pos_B, where.blk, where.off, kv.k_LNHbD[j], kv.v_LNHbD[j],
                        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, eps=self.eps)
                else:
                    q_BHD, k_BHD, v_BHD, gate_BQ = self._qkv(lw, h_BH, cos_BD, sin_BD)
                    kv.write(j, where, k_BHD, v_BHD)
                if in_place:
                    o_BH = paged_attention.paged_decode_attention(
                        q_BHD, kv.k_LNHbD[j], kv.v_LNHbD[j], kv.table.table_SM, pos_B, scale=self.scale,
                        window=lw.attn.window, sinks_H=lw.attn.sinks_H)
                else:
                    k_BHTD, v_BHTD = kv.context(j, B, T)
                    o_BH = decode_attention(lw.attn, q_BHD, k_BHTD, v_BHTD, bias_by_window[lw.attn.window],
                                            self.scale)
                x_BH = x_BH + self.linear(o_BH if gate_BQ is None else o_BH * torch.sigmoid(gate_BQ), lw.attn.o_HQ,
                                          lw.attn.o_bias_H)
            x_BH = self._mlp(lw, self._norm(x_BH, lw.post_norm_H), active_B, routes, where, x_BH)
        return self.linear(self._norm(x_BH, self.final_norm_H), self.lm_head_VH)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.eps, offset=self.norm_offset)

    def decodes_in_place(self, kv: KVCache) -> bool:
        """Decode attention reads the KV blocks in place (paged_attention.py) rather than gathering them: CUDA with
        triton, not batch-invariant, not MLA (its absorbed attention reads gathered latents), no attention sinks:
        GPT-OSS's HF attention rounds its scores and sink softmax to bf16, which the torch path reproduces and the
        kernel's float32 softmax does not, and GPT-OSS amplifies the difference past the engine-vs-HF gate."""
        bs = kv.table.block_size
        if bs not in self._paged_fits:
            sinks = any(getattr(lw.attn, "sinks_H", None) is not None for lw in self.layers)
            self._paged_fits[bs] = not (self.batch_invariant or self.mla or sinks) and paged_attention.fits(
                device=self.embed_VH.device, head_dim=self.head_dim, block_size=bs, num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads)
        return self._paged_fits[bs]

    def _qk_kernel_fits(self, attn: AttentionWeights) -> bool:
        """Decode computes q/k and writes K/V in one Triton kernel (`paged_attention.qk_norm_rope_write`)."""
        return paged_attention.qk_fits(
            whole_projection_norm=attn.q_norm is not None, gated=attn.gated, zero_centered=attn.norm_offset,
            clip_qkv=self.clip_qkv, rotary_dims=self.cos_PD.shape[1], head_dim=self.head_dim)

    # --- layer pieces -------------------------------------------------------------------------------------------------
    def _qkv(self, lw: _Layer, h_TH: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor):
        return qkv(lw.attn, h_TH, cos_TD, sin_TD, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                   head_dim=self.head_dim, eps=self.eps, clip_qkv=self.clip_qkv, linear=self.linear)

    def _mlp(self, lw: _Layer, h_TH: torch.Tensor, valid_T: torch.Tensor | None,
             routes: RoutingCapture | NullRoutingCapture, where: TokenWhere, residual_TH: torch.Tensor) -> torch.Tensor:
        """`residual_TH` + the layer's MLP of `h_TH`; a MoE layer's top-k ids go into the routing capture. `valid_T`
        False marks padding rows, kept out of the experts."""
        if lw.moe is None:
            return residual_TH + self.moe.dense_mlp(h_TH, lw.mlp_gate_up_IH, lw.mlp_down_HI)
        return self.moe(lw.moe, h_TH, valid_T, routes.target(lw.moe.moe_layer, where), residual_TH)[0]

    def _load_layer(self, loader: _Loader, i: int, site: RouterSite | None) -> _Layer:
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        if i in self.linear_layers:
            attn = load_linear_attention(loader.take, p + "linear_attn.", self.linear_spec)
        else:
            attn = self._load_mla(loader, i, a) if self.mla else self._load_attention(loader, i, a)
        lw = _Layer(input_norm_H=loader.take(p + "input_layernorm.weight", dtype=self.norm_dtype),
                    post_norm_H=loader.take(p + "post_attention_layernorm.weight", dtype=self.norm_dtype), attn=attn)
        if site is None:
            lw.mlp_gate_up_IH = loader.take(m + "gate_proj.weight", m + "up_proj.weight")
            lw.mlp_down_HI = loader.take(m + "down_proj.weight")
            return lw
        lw.moe = self._load_moe(loader, m, site)
        return lw

    def _load_attention(self, loader: _Loader, i: int, a: str) -> AttentionWeights:
        attn = AttentionWeights(
            qkv_QH=loader.take(*(f"{a}{x}_proj.weight" for x in "qkv")),
            qkv_bias_Q=loader.take(*(f"{a}{x}_proj.bias" for x in "qkv"), optional=True),
            o_HQ=loader.take(a + "o_proj.weight"), o_bias_H=loader.take(a + "o_proj.bias", optional=True),
            window=self.windows[i], sinks_H=loader.take(a + "sinks", optional=True),
            gated=self.family in _GATED_ATTENTION, norm_offset=self.norm_offset,
        )
        q_norm = loader.sd.get(a + "q_norm.weight")
        if q_norm is not None and q_norm.numel() == self.head_dim:
            attn.qk_norm_XD = loader.take_heads(a + "q_norm.weight", a + "k_norm.weight", self.num_heads,
                                                self.num_kv_heads)
        elif q_norm is not None:
            attn.q_norm, attn.k_norm = loader.take(a + "q_norm.weight"), loader.take(a + "k_norm.weight")
        return attn

    def _load_mla(self, loader: _Loader, i: int, a: str) -> MLAWeights:
        cfg, hf = self.config, self.hf_layers[i].self_attn
        return MLAWeights(
            num_heads=self.num_heads, nope_dim=cfg.qk_nope_head_dim, rope_dim=cfg.qk_rope_head_dim,
            v_dim=cfg.v_head_dim, kv_lora_rank=cfg.kv_lora_rank, interleave=bool(getattr(cfg, "rope_interleave", True)),
            scale=float(hf.scaling), kv_eps=float(hf.kv_a_layernorm.variance_epsilon),
            q_eps=float(hf.q_a_layernorm.variance_epsilon) if hf.q_a_layernorm is not None else self.eps,
            kv_a_QM=loader.take(a + "kv_a_proj_with_mqa.weight"),
            kv_a_bias=loader.take(a + "kv_a_proj_with_mqa.bias", optional=True),
            kv_norm_C=loader.take(a + "kv_a_layernorm.weight"), kv_b_XC=loader.take(a + "kv_b_proj.weight"),
            o_MX=loader.take(a + "o_proj.weight"), o_bias_M=loader.take(a + "o_proj.bias", optional=True),
            q_XM=loader.take(a + "q_proj.weight", optional=True),
            q_a_LM=loader.take(a + "q_a_proj.weight", optional=True),
            q_a_bias_L=loader.take(a + "q_a_proj.bias", optional=True),
            q_norm_L=loader.take(a + "q_a_layernorm.weight", optional=True),
            q_b_XL=loader.take(a + "q_b_proj.weight", optional=True),
        )

    def _load_moe(self, loader: _Loader, m: str, site: RouterSite) -> MoEWeights:
        names, spec = site.adapter.tensor_names(site), site.spec
        transposed = self.expert_act is ExpertAct.GPT_OSS  # HF keeps GPT-OSS experts as [E, H, 2I] and [E, I, H]
        shared = m + ("shared_expert." if m + "shared_expert.gate_proj.weight" in loader.sd else "shared_experts.")
        return MoEWeights(
            moe_layer=site.layer, router_spec=spec,
            # float32 logits: keep the router weight in float32, as HF does (its values are exact either way)
            router_EH=loader.take(names.weight, dtype=torch.float32 if spec.logits_fp32 else None),
            router_bias_E=loader.take(names.logit_bias) if names.logit_bias else None,
            # added to float32 scores: float32 holds any stored bias exactly
            correction_E=loader.take(names.correction, dtype=torch.float32) if names.correction else None,
            gate_up_EIH=loader.take(m + "experts.gate_up_proj", transpose=transposed),
            down_EHI=loader.take(m + "experts.down_proj", transpose=transposed),
            gate_up_bias_EI=loader.take(m + "experts.gate_up_proj_bias", optional=True),
            down_bias_EH=loader.take(m + "experts.down_proj_bias", optional=True),
            shared_gate_up_IH=loader.take(shared + "gate_proj.weight", shared + "up_proj.weight", optional=True),
            shared_down_HI=loader.take(shared + "down_proj.weight", optional=True),
            shared_gate_1H=loader.take(m + "shared_expert_gate.weight", optional=True),
        )


class _Loader:
    """Copies HF state-dict tensors into engine storage (fusing some) and records name -> view for updates."""

    def __init__(self, state_dict: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> None:
        self.sd, self.device, self.dtype = state_dict, device, dtype
        self.views: dict[str, torch.Tensor] = {}  # HF name -> destination in engine storage
        self.shapes: dict[str, tuple[int, ...]] = {}  # HF name -> HF shape (a destination may broadcast it)

    def take(self, *names: str, optional: bool = False, tied_to: str | None = None, dtype: torch.dtype | None = None,
             transpose: bool = False) -> torch.Tensor | None:
        """`transpose`: store one 3D tensor with its last two dims swapped (the update view swaps them back)."""
        if tied_to is not None and (names[0] not in self.sd or _same_storage(self.sd[names[0]], self.sd[tied_to])):
            if names[0] in self.sd:
                self.views[names[0]], self.shapes[names[0]] = self.views[tied_to], self.shapes[tied_to]
            return self.views[tied_to]
        missing = [n for n in names if n not in self.sd]
        if missing and optional and len(missing) == len(names):
            return None
        if missing:
            raise NotImplementedError(f"the rollout engine expects parameters {missing} in the checkpoint (fused with "
                                      f"{[n for n in names if n not in missing]}): got none of that name")
        parts = [self.sd[n] for n in names]
        if transpose:
            (name,), (part,) = names, parts
            out = part.transpose(1, 2).to(device=self.device, dtype=dtype or self.dtype, copy=True).contiguous()
            self.views[name], self.shapes[name] = out.transpose(1, 2), tuple(part.shape)
            return out
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        out = out.to(device=self.device, dtype=dtype or self.dtype, copy=True).contiguous()
        start = 0
        for name, part in zip(names, parts, strict=True):
            self.views[name], self.shapes[name] = out[start : start + part.shape[0]], tuple(part.shape)
            start += part.shape[0]
        return out

    def take_heads(self, q_name: str, k_name: str, num_heads: int, num_kv_heads: int) -> torch.Tensor:
        """Per-head norm weights `[D]` repeated over heads into one `[Hq + Hkv, D]`; updates broadcast into it."""
        q, k = self.sd[q_name], self.sd[k_name]
        out = torch.cat([q.expand(num_heads, -1), k.expand(num_kv_heads, -1)]).to(self.device, self.dtype)
        self.views[q_name], self.views[k_name] = out[:num_heads], out[num_heads:]
        self.shapes[q_name], self.shapes[k_name] = tuple(q.shape), tuple(k.shape)
        return out

    def check_all_taken(self, model_name: str) -> None:
        unused = sorted(set(self.sd) - set(self.views))
        if unused:
            raise NotImplementedError(f"the rollout engine must use every parameter of {model_name} (else it would "
                                      f"silently ignore them): got unused {unused[:5]}{' ...' * (len(unused) > 5)}")


def _check_supported(model: PreTrainedModel) -> None:
    family = model.config.model_type
    if family in _UNSUPPORTED:
        raise NotImplementedError(f"the rollout engine does not implement {type(model).__name__} ({family}): its "
                                  f"{_UNSUPPORTED[family]} is not built yet. Roll out with the HF model instead "
                                  "(`r3rl check --rollout hf`); replay and the check support this family.")


def _windows(model: PreTrainedModel, max_seq_len: int) -> list[int | None]:
    """Each decoder layer's sliding window, None for full attention (or a window that never cuts anything off).

    Per-layer windows come from `config.layer_types`; a config with a window but no layer types (one window for
    every layer, older style) is refused."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    sliding = getattr(cfg, "use_sliding_window", window is not None) if hasattr(cfg, "sliding_window") else False
    layer_types = getattr(cfg, "layer_types", None)
    if window is None or window >= max_seq_len:
        return [None] * cfg.num_hidden_layers
    if layer_types is None:
        if sliding:
            raise NotImplementedError(f"the rollout engine needs per-layer attention types for a sliding window: got "
                                      f"sliding_window={window} < max_seq_len={max_seq_len} and no layer_types")
        return [None] * cfg.num_hidden_layers
    unknown = set(layer_types) - {"full_attention", "sliding_attention", "linear_attention"}
    if unknown:
        raise NotImplementedError(f"the rollout engine implements full, sliding-window and gated delta-net linear "
                                  f"attention: got layer types {sorted(unknown)}")
    return [window if t == "sliding_attention" else None for t in layer_types]


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape
