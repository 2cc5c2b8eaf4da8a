"""The rollout engine's model: its own copy of the weights and its own forward (prefill and decode).

Built from a transformers v5 MoE model (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE): fused QKV, q/k norms and RoPE in
one op, attention over the slot KV cache, routing in float32 as the family does it, and experts as a sorted
grouped matmul (or a per-row gather on CPU, for batch invariance). Every (token, MoE layer) top-k is written into
the routing capture buffer inside the forward. Used by `r3rl.rollout.engine.RolloutEngine`; not a public API.

Tensor suffixes: S slots, T tokens, B decode rows, N prefill requests, P positions, H hidden, Q fused qkv width,
D head dim, X q + k heads, R rows of a flattened (token, k) or (row, kv head) product, G q heads per kv head,
E experts, K top-k, I intermediate, V vocabulary.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from r3rl.models.adapters import find_routers
from r3rl.models.routing import RouterSpec, route, router_logits
from r3rl.rollout.kv_cache import KVCache, NullRoutingCapture, RoutingCapture

__all__ = ["MoEKernel", "MoEForward"]

logger = logging.getLogger(__name__)


class MoEKernel(enum.Enum):
    """How the engine runs the experts (chosen once, at construction)."""

    GROUPED_MM = "grouped_mm"  # sort (token, k) rows by expert, one grouped GEMM per projection (default)
    GATHER = "gather"  # one small matmul per (token, k) on gathered expert weights: batch-invariant (CPU)
    LOOP = "loop"  # per-expert loop with a host sync: the fallback where grouped_mm is unavailable


@dataclass
class _Layer:
    input_norm_H: torch.Tensor
    post_norm_H: torch.Tensor
    qkv_QH: torch.Tensor  # q, k, v projections fused along the output dim
    qkv_bias_Q: torch.Tensor | None
    o_HQ: torch.Tensor
    o_bias_H: torch.Tensor | None
    qk_norm_XD: torch.Tensor | None  # Qwen3-MoE per-head norms, q_norm repeated on q heads then k_norm on k heads
    q_norm: torch.Tensor | None  # OLMoE norms over the whole q / k projection
    k_norm: torch.Tensor | None
    mlp_gate_up_IH: torch.Tensor | None = None  # dense MLP, or the shared expert of a MoE layer (Qwen2-MoE)
    mlp_down_HI: torch.Tensor | None = None
    shared_gate_1H: torch.Tensor | None = None
    moe_layer: int | None = None  # index on the trace's layer axis; None for a dense layer
    router_EH: torch.Tensor | None = None
    experts_gate_up_EIH: torch.Tensor | None = None  # HF's fused layout [E, 2I, H], gate first
    experts_down_EHI: torch.Tensor | None = None
    router_spec: RouterSpec | None = None  # the family's routing constants (arithmetic: r3rl.models.routing)
    router_bias_E: torch.Tensor | None = None  # added to the logits (GPT-OSS)
    correction_E: torch.Tensor | None = None  # selection-only correction bias (sigmoid families)


class MoEForward:
    """The engine's copy of the weights and its prefill/decode forward (no autograd, no HF modules)."""

    def __init__(self, model: PreTrainedModel, *, device: torch.device, dtype: torch.dtype, max_seq_len: int,
                 max_slots: int, batch_invariant: bool) -> None:
        cfg = model.config
        _check_supported(model, max_seq_len)
        sites = {int(re.search(r"layers\.(\d+)\.", s.name).group(1)): s for s in find_routers(model)}  # raises
        first = next(iter(sites.values()))
        self.family, self.num_experts, self.top_k, self.num_moe_layers = (cfg.model_type, first.num_experts,
                                                                          first.top_k, len(sites))
        self.num_decoder_layers, self.vocab_size, self.eps = cfg.num_hidden_layers, cfg.vocab_size, cfg.rms_norm_eps
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.clip_qkv = getattr(cfg, "clip_qkv", None)
        self.act = ACT2FN[cfg.hidden_act]
        self.linear = _rowwise_linear if batch_invariant else F.linear

        loader = _Loader(model.state_dict(), device, dtype)
        self.embed_VH = loader.take("model.embed_tokens.weight")
        self.final_norm_H = loader.take("model.norm.weight")
        self.lm_head_VH = loader.take("lm_head.weight", tied_to="model.embed_tokens.weight")
        self.layers = [self._load_layer(loader, i, sites.get(i)) for i in range(self.num_decoder_layers)]
        loader.check_all_taken(type(model).__name__)
        self.views, self.shapes = loader.views, loader.shapes  # for update_weights
        self.cos_PD, self.sin_PD = _rope_tables(model, max_seq_len, device, dtype)
        self._arange = torch.arange(max(max_seq_len, max_slots), device=device)
        self._expert_ends_E = torch.arange(1, self.num_experts + 1, device=device)
        if batch_invariant:
            self.moe_kernel, self._expert_mlp = MoEKernel.GATHER, None
        elif self._grouped_mm_works():
            self.moe_kernel, self._expert_mlp = MoEKernel.GROUPED_MM, self._expert_mlp_grouped
        else:
            self.moe_kernel, self._expert_mlp = MoEKernel.LOOP, self._expert_mlp_loop

    # --- forward ----------------------------------------------------------------------------------------------------
    def prefill(self, tokens_NP: torch.Tensor, lengths_N: torch.Tensor, slot0: int, kv: KVCache,
                routes: RoutingCapture | NullRoutingCapture) -> torch.Tensor:
        """N right-padded prompts into slots [slot0, slot0 + N). Returns the logits of each last prompt token."""
        N, P = tokens_NP.shape
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        valid_T = (self._arange[:P].unsqueeze(0) < lengths_N.unsqueeze(1)).flatten() if N > 1 else None
        cos_TD, sin_TD = self.cos_PD[:P].repeat(N, 1), self.sin_PD[:P].repeat(N, 1)
        x_TH = self.embed_VH[tokens_NP.flatten()]
        for i, lw in enumerate(self.layers):
            q_THD, k_THD, v_THD = self._qkv(lw, _rms_norm(x_TH, lw.input_norm_H, self.eps), cos_TD, sin_TD)
            k_NHPD, v_NHPD = (t.view(N, P, Hkv, D).transpose(1, 2) for t in (k_THD, v_THD))
            kv.write_prefill(i, slot0, k_NHPD, v_NHPD)
            # right padding + causal mask: a real token never attends to a pad
            o_NHPD = F.scaled_dot_product_attention(q_THD.view(N, P, Hq, D).transpose(1, 2), k_NHPD, v_NHPD,
                                                    is_causal=True, scale=self.scale, enable_gqa=Hq != Hkv)
            x_TH = x_TH + self.linear(o_NHPD.transpose(1, 2).reshape(N * P, Hq * D), lw.o_HQ, lw.o_bias_H)
            mlp_TH, ids_TK = self._mlp(lw, _rms_norm(x_TH, lw.post_norm_H, self.eps), valid_T)
            if ids_TK is not None:
                routes.write_prefill(lw.moe_layer, slot0, ids_TK.view(N, P, -1))
            x_TH = x_TH + mlp_TH
        last_NH = x_TH.view(N, P, -1)[self._arange[:N], lengths_N - 1]
        return self.linear(_rms_norm(last_NH, self.final_norm_H, self.eps), self.lm_head_VH)

    def decode(self, tokens_B: torch.Tensor, pos_B: torch.Tensor, T: int, active_B: torch.Tensor | None, kv: KVCache,
               routes: RoutingCapture | NullRoutingCapture) -> torch.Tensor:
        """One token for each of slots [0, B), attending over positions [0, T). Returns logits `[B, V]`."""
        B, D = tokens_B.shape[0], self.head_dim
        Hq, Hkv = self.num_heads, self.num_kv_heads
        rows_B = self._arange[:B]
        # additive mask, built once per step: row b sees positions <= pos_B[b]; R = B * kv_heads, G = q heads per kv
        hidden_BT = self._arange[:T].unsqueeze(0) > pos_B.unsqueeze(1)
        bias_RGT = torch.zeros(B, Hkv, Hq // Hkv, T, dtype=self.embed_VH.dtype, device=pos_B.device).masked_fill_(
            hidden_BT.view(B, 1, 1, T), float("-inf")).view(B * Hkv, Hq // Hkv, T)
        cos_BD, sin_BD = self.cos_PD[pos_B], self.sin_PD[pos_B]
        x_BH = self.embed_VH[tokens_B]
        for i, lw in enumerate(self.layers):
            q_BHD, k_BHD, v_BHD = self._qkv(lw, _rms_norm(x_BH, lw.input_norm_H, self.eps), cos_BD, sin_BD)
            kv.write_decode(i, rows_B, pos_B, k_BHD, v_BHD)
            k_BHTD, v_BHTD = kv.context(i, B, T)
            k_RTD, v_RTD = k_BHTD.reshape(B * Hkv, T, D), v_BHTD.reshape(B * Hkv, T, D)  # views: no copy
            scores_RGT = torch.baddbmm(bias_RGT, q_BHD.reshape(B * Hkv, Hq // Hkv, D), k_RTD.transpose(1, 2),
                                       alpha=self.scale)
            probs_RGT = torch.softmax(scores_RGT, dim=-1)  # float32 inside, rounded once, as HF's eager softmax
            o_BH = torch.bmm(probs_RGT, v_RTD).view(B, Hq * D)
            x_BH = x_BH + self.linear(o_BH, lw.o_HQ, lw.o_bias_H)
            mlp_BH, ids_BK = self._mlp(lw, _rms_norm(x_BH, lw.post_norm_H, self.eps), active_B)
            if ids_BK is not None:
                routes.write_decode(lw.moe_layer, rows_B, pos_B, ids_BK)
            x_BH = x_BH + mlp_BH
        return self.linear(_rms_norm(x_BH, self.final_norm_H, self.eps), self.lm_head_VH)

    # --- layer pieces -------------------------------------------------------------------------------------------------
    def _qkv(self, lw: _Layer, h_TH: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor):
        """q `[T, Hq, D]`, k and v `[T, Hkv, D]` (views); the q and k heads are normed and rotated as one tensor."""
        T, D, Hq, Hkv = h_TH.shape[0], self.head_dim, self.num_heads, self.num_kv_heads
        qkv_TQ = self.linear(h_TH, lw.qkv_QH, lw.qkv_bias_Q)
        qk_TXD, v_THD = qkv_TQ[:, : (Hq + Hkv) * D].view(T, Hq + Hkv, D), qkv_TQ[:, (Hq + Hkv) * D :].view(T, Hkv, D)
        if lw.q_norm is not None:  # OLMoE: RMSNorm over each whole projection
            q_TQ, k_TQ = qkv_TQ[:, : Hq * D], qkv_TQ[:, Hq * D : (Hq + Hkv) * D]
            qk_TXD = torch.cat([_rms_norm(q_TQ, lw.q_norm, self.eps), _rms_norm(k_TQ, lw.k_norm, self.eps)], dim=-1)
            qk_TXD = qk_TXD.view(T, Hq + Hkv, D)
        if self.clip_qkv is not None:
            qk_TXD, v_THD = qk_TXD.clamp(-self.clip_qkv, self.clip_qkv), v_THD.clamp(-self.clip_qkv, self.clip_qkv)
        if lw.qk_norm_XD is not None:  # Qwen3-MoE: RMSNorm per head, q_norm on q heads and k_norm on k heads
            qk_TXD = F.rms_norm(qk_TXD, (D,), eps=self.eps) * lw.qk_norm_XD
        qk_TXD = _rope(qk_TXD, cos_TD, sin_TD)
        return qk_TXD[:, :Hq], qk_TXD[:, Hq:], v_THD

    def _mlp(self, lw: _Layer, h_TH: torch.Tensor, valid_T: torch.Tensor | None):
        """(output, top-k ids or None). `valid_T` False marks padding rows, kept out of the experts."""
        if lw.moe_layer is None:
            return self._dense_mlp(h_TH, lw.mlp_gate_up_IH, lw.mlp_down_HI), None
        logits_TE = router_logits(lw.router_spec, h_TH, lw.router_EH, lw.router_bias_E, linear=self.linear)
        weights_TK, ids_TK = route(lw.router_spec, logits_TE, lw.correction_E)
        if self._expert_mlp is None:
            out_TH = self._experts_gather(h_TH, ids_TK, weights_TK, lw)
        else:
            out_TH = self._experts_sorted(h_TH, ids_TK, weights_TK, valid_T, lw)
        if lw.mlp_gate_up_IH is not None:  # Qwen2-MoE shared expert with its sigmoid gate
            shared_TH = self._dense_mlp(h_TH, lw.mlp_gate_up_IH, lw.mlp_down_HI)
            out_TH = out_TH + torch.sigmoid(self.linear(h_TH, lw.shared_gate_1H)) * shared_TH
        return out_TH, ids_TK

    def _dense_mlp(self, h_TH: torch.Tensor, gate_up_IH: torch.Tensor, down_HI: torch.Tensor) -> torch.Tensor:
        gate_TI, up_TI = self.linear(h_TH, gate_up_IH).chunk(2, dim=-1)
        return self.linear(self.act(gate_TI) * up_TI, down_HI)

    def _experts_gather(self, h_TH, ids_TK, weights_TK, lw: _Layer) -> torch.Tensor:
        """Batch-invariant experts: one matmul per (token, k) against its gathered expert weights."""
        (T, K), H = ids_TK.shape, h_TH.shape[1]
        flat_R = ids_TK.reshape(-1)
        x_R1H = h_TH.unsqueeze(1).expand(T, K, H).reshape(T * K, 1, H)
        gate_R1I, up_R1I = torch.bmm(x_R1H, lw.experts_gate_up_EIH[flat_R].transpose(1, 2)).chunk(2, dim=-1)
        y_R1H = torch.bmm(self.act(gate_R1I) * up_R1I, lw.experts_down_EHI[flat_R].transpose(1, 2))
        return torch.bmm(weights_TK.to(y_R1H.dtype).unsqueeze(1), y_R1H.view(T, K, H)).squeeze(1)

    def _experts_sorted(self, h_TH, ids_TK, weights_TK, valid_T, lw: _Layer) -> torch.Tensor:
        """Sort (token, k) rows by expert, run each expert on its rows, unsort, weight and sum over k.

        Padding rows get the sentinel expert E: they sort last, past every group, and cost no expert compute."""
        (T, K), E = ids_TK.shape, self.num_experts
        if valid_T is not None:
            ids_TK = ids_TK.masked_fill(~valid_T.unsqueeze(1), E)
        sorted_R, order_R = ids_TK.reshape(-1).sort()
        y_RH = self._expert_mlp(h_TH[order_R // K], sorted_R, lw.experts_gate_up_EIH, lw.experts_down_EHI)
        if valid_T is not None:  # rows past the last group are left unwritten by grouped_mm
            y_RH = torch.where((sorted_R < E).unsqueeze(1), y_RH, 0)
        unsorted_RH = torch.empty_like(y_RH)
        unsorted_RH[order_R] = y_RH
        return torch.bmm(weights_TK.to(y_RH.dtype).unsqueeze(1), unsorted_RH.view(T, K, -1)).squeeze(1)

    def _expert_mlp_grouped(self, x_RH, sorted_R, gate_up_EIH, down_EHI) -> torch.Tensor:
        ends_E = torch.searchsorted(sorted_R, self._expert_ends_E, out_int32=True)  # on device: graph-safe
        gate_RI, up_RI = _grouped_mm(x_RH, gate_up_EIH.transpose(1, 2), offs=ends_E).chunk(2, dim=-1)
        return _grouped_mm(self.act(gate_RI) * up_RI, down_EHI.transpose(1, 2), offs=ends_E)

    def _expert_mlp_loop(self, x_RH, sorted_R, gate_up_EIH, down_EHI) -> torch.Tensor:
        """Fallback where grouped_mm is unavailable: a loop over experts (host sync; CUDA graphs are turned off)."""
        counts = torch.bincount(sorted_R, minlength=self.num_experts + 1).tolist()
        y_RH = x_RH.new_zeros(x_RH.shape[0], down_EHI.shape[1])
        start = 0
        for e in range(self.num_experts):
            end = start + counts[e]
            if end > start:
                y_RH[start:end] = self._dense_mlp(x_RH[start:end], gate_up_EIH[e], down_EHI[e])
            start = end
        return y_RH

    def _grouped_mm_works(self) -> bool:
        lw = next(lw for lw in self.layers if lw.moe_layer is not None)
        x_RH = torch.zeros(2, lw.experts_gate_up_EIH.shape[2], dtype=lw.experts_gate_up_EIH.dtype,
                           device=lw.experts_gate_up_EIH.device)
        try:
            self._expert_mlp_grouped(x_RH, torch.zeros(2, dtype=torch.int64, device=x_RH.device),
                                     lw.experts_gate_up_EIH, lw.experts_down_EHI)
            return True
        except (RuntimeError, NotImplementedError, TypeError) as e:
            logger.warning("grouped_mm is unavailable for %s on %s (%s); using the per-expert loop and no CUDA "
                           "graphs", x_RH.dtype, x_RH.device, str(e).splitlines()[0])
            return False

    def _load_layer(self, loader: _Loader, i: int, site) -> _Layer:
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        lw = _Layer(
            input_norm_H=loader.take(p + "input_layernorm.weight"),
            post_norm_H=loader.take(p + "post_attention_layernorm.weight"),
            qkv_QH=loader.take(*(f"{a}{x}_proj.weight" for x in "qkv")),
            qkv_bias_Q=loader.take(*(f"{a}{x}_proj.bias" for x in "qkv"), optional=True),
            o_HQ=loader.take(a + "o_proj.weight"), o_bias_H=loader.take(a + "o_proj.bias", optional=True),
            qk_norm_XD=None, q_norm=None, k_norm=None,
        )
        q_norm = loader.sd.get(a + "q_norm.weight")
        if q_norm is not None and q_norm.numel() == self.head_dim:
            lw.qk_norm_XD = loader.take_heads(a + "q_norm.weight", a + "k_norm.weight", self.num_heads,
                                              self.num_kv_heads)
        elif q_norm is not None:
            lw.q_norm, lw.k_norm = loader.take(a + "q_norm.weight"), loader.take(a + "k_norm.weight")
        if site is None:
            lw.mlp_gate_up_IH = loader.take(m + "gate_proj.weight", m + "up_proj.weight")
            lw.mlp_down_HI = loader.take(m + "down_proj.weight")
            return lw
        names = site.adapter.tensor_names(site)
        lw.moe_layer, lw.router_spec, lw.router_EH = site.layer, site.spec, loader.take(names.weight)
        lw.router_bias_E = loader.take(names.logit_bias) if names.logit_bias else None
        lw.correction_E = loader.take(names.correction) if names.correction else None
        lw.experts_gate_up_EIH = loader.take(m + "experts.gate_up_proj")
        lw.experts_down_EHI = loader.take(m + "experts.down_proj")
        s = m + "shared_expert."
        lw.mlp_gate_up_IH = loader.take(s + "gate_proj.weight", s + "up_proj.weight", optional=True)
        lw.mlp_down_HI = loader.take(s + "down_proj.weight", optional=True)
        lw.shared_gate_1H = loader.take(m + "shared_expert_gate.weight", optional=True)
        return lw


class _Loader:
    """Copies HF state-dict tensors into engine storage (fusing some) and records name -> view for updates."""

    def __init__(self, state_dict: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> None:
        self.sd, self.device, self.dtype = state_dict, device, dtype
        self.views: dict[str, torch.Tensor] = {}  # HF name -> destination in engine storage
        self.shapes: dict[str, tuple[int, ...]] = {}  # HF name -> HF shape (a destination may broadcast it)

    def take(self, *names: str, optional: bool = False, tied_to: str | None = None) -> torch.Tensor | None:
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
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        out = out.to(device=self.device, dtype=self.dtype, copy=True).contiguous()
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


def _check_supported(model: PreTrainedModel, max_seq_len: int) -> None:
    """Full attention only; a sliding window at least as long as the engine's context is full attention."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    sliding = getattr(cfg, "use_sliding_window", window is not None) if hasattr(cfg, "sliding_window") else False
    if window is not None and window >= max_seq_len:  # the window never cuts anything off
        sliding, layer_types = False, layer_types - {"sliding_attention"} | {"full_attention"}
    if sliding or layer_types != {"full_attention"}:
        raise NotImplementedError(f"the rollout engine implements full attention only: got sliding_window={window} "
                                  f"< max_seq_len={max_seq_len}, layer_types={sorted(layer_types)}")


def _rope_tables(model: PreTrainedModel, max_seq_len: int, device: torch.device, dtype: torch.dtype):
    """cos and signed sin `[max_seq_len, D]` as the HF rotary module computes them (float32, then cast); the first
    half of sin is negated for `_rope`. Static RoPE only."""
    rotary = next(m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor))
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if "dynamic" in rope_type or rope_type == "longrope":
        raise NotImplementedError(f"the rollout engine needs a static RoPE: got rope_type={rope_type!r}")
    freqs_PF = torch.arange(max_seq_len, device=device).float().unsqueeze(1) * rotary.inv_freq.to(device).float()
    emb_PD = torch.cat((freqs_PF, freqs_PF), dim=-1)
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    sign_D = torch.ones(emb_PD.shape[1], device=device)
    sign_D[: emb_PD.shape[1] // 2] = -1.0
    return (emb_PD.cos() * scaling).to(dtype), (emb_PD.sin() * scaling).to(dtype) * sign_D.to(dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm (float32 statistics, then the weight) as one op."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)


def _rope(x_THD: torch.Tensor, cos_TD: torch.Tensor, signed_sin_TD: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = roll(x, D/2) * [-sin_1, sin_2]."""
    rolled_THD = x_THD.roll(x_THD.shape[-1] // 2, dims=-1)
    return torch.addcmul(x_THD * cos_TD.unsqueeze(1), rolled_THD, signed_sin_TD.unsqueeze(1))


def _rowwise_linear(x_TI: torch.Tensor, w_OI: torch.Tensor, b_O: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b as T independent [1, I] @ [I, O] products: each row's result does not depend on T."""
    y_TO = torch.bmm(x_TI.unsqueeze(1), w_OI.t().expand(x_TI.shape[0], -1, -1)).squeeze(1)
    return y_TO if b_O is None else y_TO + b_O


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, *, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm  # F.grouped_mm from torch 2.10
    return fn(x, w, offs=offs)
