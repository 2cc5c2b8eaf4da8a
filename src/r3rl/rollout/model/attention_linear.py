"""Gated delta-net linear attention (Qwen3-Next) for the rollout engine, over a per-slot recurrent state cache.

A linear-attention layer keeps no per-token KV: per slot it keeps the last `kernel - 1` inputs of its causal depthwise
convolution and one recurrent state per value head. `LinearStateCache` allocates both once, for every
linear-attention layer and every slot, so nothing is reallocated and no step syncs with the host:

    conv_LSCW        [linear layers, slots, conv channels (q, k, v), kernel - 1]   model dtype (as HF's cache)
    recurrent_LSVKD  [linear layers, slots, value heads, key dim, value dim]        float32 (as HF's kernels)

  prefill  N right-padded prompts into slots rows_N, chunked (the delta rule's UT transform per chunk, a scan over
           chunks). Pad positions get beta = 0 and no decay, so they leave the state as it was: each slot ends with
           the state at its prompt's last real token, and its conv state holds that prompt's last real inputs.
  decode   one token for each of rows [0, B): the recurrent step, reading and updating each row's state in place.

Decode advances the state, so it is not idempotent: a CUDA-graph warm-up run must be undone (`snapshot` before it,
`restore` after). Slots that move or share a prompt copy their state with `copy_rows`.

The layer computes what HF's `Qwen3NextGatedDeltaNet` computes (in_proj_qkvz / in_proj_ba, SiLU causal conv, q/k
l2-normalized in float32, q scaled by key_dim^-0.5, decay g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b),
gated RMSNorm, out_proj), written from the recurrence, not from HF's code. Pure torch; used by
`r3rl.rollout.model.forward.MoEForward` once wired in; not a public API.

Tensor suffixes: S slots, T tokens, B decode rows, N prefill requests, P positions, H hidden, C conv channels,
W conv kernel, V value heads, G key heads, K key head dim, D value head dim, Q fused qkvz width, A fused ba width,
L linear-attention layers, U chunk length, X chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

__all__ = ["LinearAttentionSpec", "LinearAttentionWeights", "LinearStateCache", "load_linear_attention",
           "linear_attention_prefill", "linear_attention_decode", "LINEAR_ATTENTION_PARAMS"]

# the parameters of one HF gated delta-net module (state-dict suffixes under `model.layers.{i}.linear_attn.`)
LINEAR_ATTENTION_PARAMS = ("in_proj_qkvz.weight", "in_proj_ba.weight", "conv1d.weight", "dt_bias", "A_log",
                           "norm.weight", "out_proj.weight")
_CONFIG_FIELDS = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                  "linear_conv_kernel_dim", "rms_norm_eps", "hidden_act")


@dataclass(frozen=True, kw_only=True)
class LinearAttentionSpec:
    """The dimensions of a model's gated delta-net layers (the same for each of them)."""

    num_k_heads: int
    """Query/key heads G; each serves num_v_heads // num_k_heads consecutive value heads."""
    num_v_heads: int
    """Value heads V (one recurrent state each)."""
    head_k_dim: int
    """Query/key head dim K."""
    head_v_dim: int
    """Value head dim D."""
    kernel: int
    """Causal conv kernel W (the conv state keeps W - 1 inputs)."""
    eps: float
    """Epsilon of the gated RMSNorm."""
    act: str = "silu"
    """Activation after the conv (config.hidden_act)."""

    def __post_init__(self) -> None:
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(f"LinearAttentionSpec: num_v_heads must be a multiple of num_k_heads: got "
                             f"{self.num_v_heads} and {self.num_k_heads}")
        if self.kernel < 2:
            raise ValueError(f"LinearAttentionSpec: the conv kernel must be >= 2: got {self.kernel}")

    @classmethod
    def from_config(cls, config) -> LinearAttentionSpec:
        missing = [f for f in _CONFIG_FIELDS if getattr(config, f, None) is None]
        if missing:
            raise NotImplementedError(f"gated delta-net linear attention needs config fields {missing}: "
                                      f"{type(config).__name__} has none of that name")
        return cls(num_k_heads=config.linear_num_key_heads, num_v_heads=config.linear_num_value_heads,
                   head_k_dim=config.linear_key_head_dim, head_v_dim=config.linear_value_head_dim,
                   kernel=config.linear_conv_kernel_dim, eps=float(config.rms_norm_eps), act=config.hidden_act)

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


@dataclass
class LinearAttentionWeights:
    """One gated delta-net layer's weights (engine copies, in HF's layouts so that weight updates copy straight in)."""

    spec: LinearAttentionSpec
    in_qkvz_QH: torch.Tensor  # per key head g: [q_g, k_g, v of its value heads, z of its value heads]
    in_ba_AH: torch.Tensor  # per key head g: [b of its value heads, a of its value heads]
    conv_C1W: torch.Tensor  # depthwise conv over the q, k, v channels
    dt_bias_V: torch.Tensor  # float32 (exact for any stored dtype; HF adds it to float32 `a`)
    a_log_V: torch.Tensor  # float32 (HF reads A_log.float())
    norm_D: torch.Tensor  # gated RMSNorm weight over a value head
    out_HC: torch.Tensor  # out_proj [H, V * D]
    conv_bias_C: torch.Tensor | None = None


def load_linear_attention(take: Callable[..., torch.Tensor | None], prefix: str,
                          spec: LinearAttentionSpec) -> LinearAttentionWeights:
    """The layer's weights through the engine loader's `take(name, optional=, dtype=)` (`prefix` ends with
    `linear_attn.`); a missing parameter is the loader's error naming it."""
    return LinearAttentionWeights(
        spec=spec, in_qkvz_QH=take(prefix + "in_proj_qkvz.weight"), in_ba_AH=take(prefix + "in_proj_ba.weight"),
        conv_C1W=take(prefix + "conv1d.weight"), conv_bias_C=take(prefix + "conv1d.bias", optional=True),
        dt_bias_V=take(prefix + "dt_bias", dtype=torch.float32), a_log_V=take(prefix + "A_log", dtype=torch.float32),
        norm_D=take(prefix + "norm.weight"), out_HC=take(prefix + "out_proj.weight"),
    )


@dataclass(frozen=True)
class LinearStateCache:
    """Conv and recurrent states of every linear-attention layer for every slot, allocated once."""

    conv_LSCW: torch.Tensor
    recurrent_LSVKD: torch.Tensor
    layers: tuple[int, ...]  # decoder-layer index of each linear-attention layer (the L axis)

    @classmethod
    def allocate(cls, *, decoder_layers: Sequence[int], max_slots: int, spec: LinearAttentionSpec,
                 dtype: torch.dtype, device: torch.device) -> LinearStateCache:
        L, s = len(decoder_layers), spec
        return cls(torch.zeros(L, max_slots, s.conv_dim, s.kernel - 1, dtype=dtype, device=device),
                   torch.zeros(L, max_slots, s.num_v_heads, s.head_k_dim, s.head_v_dim, dtype=torch.float32,
                               device=device),
                   tuple(decoder_layers))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv_LSCW, self.recurrent_LSVKD))

    def conv(self, layer: int) -> torch.Tensor:
        """`[S, C, W - 1]` of decoder layer `layer` (a view)."""
        return self.conv_LSCW[self._index(layer)]

    def recurrent(self, layer: int) -> torch.Tensor:
        """`[S, V, K, D]` of decoder layer `layer` (a view)."""
        return self.recurrent_LSVKD[self._index(layer)]

    def copy_rows(self, src_M: torch.Tensor, dst_M: torch.Tensor) -> None:
        """Slot dst_M[m] takes slot src_M[m]'s state in every layer (a prompt's samples after its one prefill; slots
        moved into holes)."""
        self.conv_LSCW[:, dst_M] = self.conv_LSCW[:, src_M]
        self.recurrent_LSVKD[:, dst_M] = self.recurrent_LSVKD[:, src_M]

    def snapshot(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of rows [0, B) (taken before a CUDA-graph warm-up decode, which advances them)."""
        return self.conv_LSCW[:, :B].clone(), self.recurrent_LSVKD[:, :B].clone()

    def restore(self, snapshot: tuple[torch.Tensor, torch.Tensor]) -> None:
        conv, recurrent = snapshot
        self.conv_LSCW[:, : conv.shape[1]].copy_(conv)
        self.recurrent_LSVKD[:, : recurrent.shape[1]].copy_(recurrent)

    def _index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise KeyError(f"decoder layer {layer} is not a linear-attention layer of this cache: its layers are "
                           f"{list(self.layers)}") from None


def linear_attention_prefill(w: LinearAttentionWeights, h_TH: torch.Tensor, lengths_N: torch.Tensor,
                             rows_N: torch.Tensor, state: LinearStateCache, layer: int, *,
                             linear=F.linear, chunk_size: int = 64, batch_invariant: bool = False) -> torch.Tensor:
    """N right-padded prompts (`h_TH` is `[N * P, H]`, prompt n's real tokens first) into slots rows_N: writes each
    slot's conv and recurrent state as of its last real token. Returns `[N * P, H]` (pad rows hold garbage)."""
    s, N = w.spec, lengths_N.shape[0]
    P, W = h_TH.shape[0] // N, s.kernel
    mixed_TC, z_TVD, b_TV, a_TV = _project(w, h_TH, linear)
    x_NCP = F.pad(mixed_TC.view(N, P, -1).transpose(1, 2), (W - 1, 0))  # W - 1 zeros before each prompt
    # the conv state: the prompt's last W - 1 real inputs (padded coordinates [length, length + W - 1))
    last_NW = lengths_N.unsqueeze(1) + torch.arange(W - 1, device=h_TH.device)
    state.conv(layer)[rows_N] = x_NCP.gather(2, last_NW.unsqueeze(1).expand(N, x_NCP.shape[1], W - 1))
    conv_NCP = F.conv1d(x_NCP.to(w.conv_C1W.dtype), w.conv_C1W, w.conv_bias_C, groups=x_NCP.shape[1])
    conv_TC = ACT2FN[s.act](conv_NCP).to(h_TH.dtype).transpose(1, 2).reshape(N * P, -1)
    q_TGK, k_TGK, v_TVD, beta_TV, g_TV = _gates(w, conv_TC, b_TV, a_TV, batch_invariant=batch_invariant)
    valid_T = (torch.arange(P, device=h_TH.device).unsqueeze(0) < lengths_N.unsqueeze(1)).flatten()
    beta_TV, g_TV = beta_TV * valid_T.unsqueeze(1), g_TV * valid_T.unsqueeze(1)  # pads: no write, no decay
    q, k, v, beta, g = (t.view(N, P, *t.shape[1:]).transpose(1, 2) for t in (q_TGK, k_TGK, v_TVD, beta_TV, g_TV))
    q_NVPK, k_NVPK = _qk_heads(s, q, k)
    o_NVPD, state_NVKD = _chunked_delta_rule(q_NVPK, k_NVPK, v.float(), g, beta.float(), chunk_size)
    state.recurrent(layer)[rows_N] = state_NVKD
    o_TVD = o_NVPD.to(h_TH.dtype).transpose(1, 2).reshape(N * P, s.num_v_heads, s.head_v_dim)
    return _output(w, o_TVD, z_TVD, linear)


def linear_attention_decode(w: LinearAttentionWeights, h_BH: torch.Tensor, state: LinearStateCache, layer: int, *,
                            linear=F.linear, batch_invariant: bool = False) -> torch.Tensor:
    """One token for each of slots [0, B): reads and advances their conv and recurrent states in place (no
    allocation in the cache, no host sync). Returns `[B, H]`.

    `batch_invariant` (the CPU engine): the conv and the state reads as fixed-order elementwise sums instead of
    conv1d / bmm, whose CPU kernels may pick a different summation order with the number of rows, and the small
    per-head gates through `_pointwise` (see there)."""
    s, B = w.spec, h_BH.shape[0]
    mixed_BC, z_BVD, b_BV, a_BV = _project(w, h_BH, linear)
    conv_BCW = state.conv(layer)[:B]
    window_BCW = torch.cat([conv_BCW, mixed_BC.unsqueeze(2).to(conv_BCW.dtype)], dim=2)
    conv_BCW.copy_(window_BCW[:, :, 1:])
    window_BCW = window_BCW.to(w.conv_C1W.dtype)
    if batch_invariant:
        out_BC = window_BCW[:, :, 0] * w.conv_C1W[:, 0, 0]
        for j in range(1, s.kernel):
            out_BC = out_BC + window_BCW[:, :, j] * w.conv_C1W[:, 0, j]
        out_BC = out_BC if w.conv_bias_C is None else out_BC + w.conv_bias_C
    else:
        out_BC = F.conv1d(window_BCW, w.conv_C1W, w.conv_bias_C, groups=window_BCW.shape[1]).squeeze(2)
    conv_BC = ACT2FN[s.act](out_BC).to(h_BH.dtype)
    q_BGK, k_BGK, v_BVD, beta_BV, g_BV = _gates(w, conv_BC, b_BV, a_BV, batch_invariant=batch_invariant)
    q_BVK, k_BVK = _qk_heads(s, q_BGK, k_BGK)
    o_BVD = _recurrent_step(state.recurrent(layer)[:B], q_BVK, k_BVK, v_BVD.float(), g_BV, beta_BV.float(),
                            batch_invariant=batch_invariant)
    return _output(w, o_BVD.to(h_BH.dtype), z_BVD, linear)


# --- private ----------------------------------------------------------------------------------------------------
def _project(w: LinearAttentionWeights, h_TH: torch.Tensor, linear):
    """(q, k, v channels `[T, C]` in HF's conv order, z `[T, V, D]`, b and a `[T, V]`) from the two projections,
    whose outputs are grouped per key head."""
    s, T = w.spec, h_TH.shape[0]
    r = s.num_v_heads // s.num_k_heads
    qkvz_TGQ = linear(h_TH, w.in_qkvz_QH).view(T, s.num_k_heads, -1)
    q, k, v, z = qkvz_TGQ.split([s.head_k_dim, s.head_k_dim, r * s.head_v_dim, r * s.head_v_dim], dim=-1)
    b, a = linear(h_TH, w.in_ba_AH).view(T, s.num_k_heads, 2 * r).split([r, r], dim=-1)
    mixed_TC = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], dim=-1)
    return mixed_TC, z.reshape(T, s.num_v_heads, s.head_v_dim), b.reshape(T, -1), a.reshape(T, -1)


def _gates(w: LinearAttentionWeights, conv_TC: torch.Tensor, b_TV: torch.Tensor, a_TV: torch.Tensor, *,
           batch_invariant: bool = False):
    """q, k `[T, G, K]`, v `[T, V, D]` from the conv output; beta = sigmoid(b); log-decay g (float32, <= 0)."""
    s, T = w.spec, conv_TC.shape[0]
    q, k, v = conv_TC.split([s.key_dim, s.key_dim, s.value_dim], dim=-1)
    g_TV = -w.a_log_V.exp() * _pointwise(F.softplus, a_TV.float() + w.dt_bias_V, batch_invariant)
    return (q.reshape(T, s.num_k_heads, s.head_k_dim), k.reshape(T, s.num_k_heads, s.head_k_dim),
            v.reshape(T, s.num_v_heads, s.head_v_dim), _pointwise(torch.sigmoid, b_TV, batch_invariant), g_TV)


_POINTWISE_ROW = 64  # elements: whole vectorized chunks (2 vectors) of ATen for fp32 and bf16, AVX2 to AVX-512


def _pointwise(fn: Callable[[torch.Tensor], torch.Tensor], x_T: torch.Tensor, batch_invariant: bool) -> torch.Tensor:
    """fn(x) where each row's values do not depend on the number of rows (`batch_invariant`).

    ATen's CPU kernels compute a contiguous elementwise op in vectorized chunks and the remainder with the scalar
    function, and the two differ in the last bit for exp-based ops (softplus, sigmoid, exp) on CPUs whose vectors are
    narrower than the tensor's tail (AVX2: a [4, 4] gate is all vector, a [1, 4] one all scalar). Rows are padded to a
    whole number of chunks so every element takes the vector path whatever the row count."""
    if not batch_invariant:
        return fn(x_T)
    flat = x_T.reshape(x_T.shape[0], -1)
    n = flat.shape[1]
    padded = F.pad(flat, (0, (-n) % _POINTWISE_ROW))
    return fn(padded)[:, :n].reshape(x_T.shape)


def _qk_heads(s: LinearAttentionSpec, q: torch.Tensor, k: torch.Tensor):
    """q and k (heads on dim 1) on the value heads (key head g serves r consecutive value heads), float32,
    l2-normalized, q scaled by K^-0.5."""
    r = s.num_v_heads // s.num_k_heads
    q, k = (t.repeat_interleave(r, dim=1).float() if r > 1 else t.float() for t in (q, k))
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    return q * s.head_k_dim**-0.5, k


def _recurrent_step(state_BVKD: torch.Tensor, q_BVK: torch.Tensor, k_BVK: torch.Tensor, v_BVD: torch.Tensor,
                    g_BV: torch.Tensor, beta_BV: torch.Tensor, *, batch_invariant: bool = False) -> torch.Tensor:
    """One step of the gated delta rule, updating `state_BVKD` in place; returns the output `[B, V, D]`.

    With S the old state and e = exp(g): S' = e S + k (beta (v - e k.S))^T and o = q.S' = e q.S + (q.k) delta. One
    batched read of S gives q.S and k.S; the update is two in-place passes (scale, rank-1 add), so a step moves the
    state through memory three times and allocates nothing of its size (the state dominates decode at large batch)."""
    B, V, K, D = state_BVKD.shape
    s_RKD = state_BVKD.view(B * V, K, D)
    q_RK, k_RK = q_BVK.reshape(B * V, K), k_BVK.reshape(B * V, K)
    if batch_invariant:  # sums over K in a fixed order, row by row
        read_R2D = torch.stack([q_RK[:, :1] * s_RKD[:, 0], k_RK[:, :1] * s_RKD[:, 0]], dim=1)
        qk_R1 = q_RK[:, :1] * k_RK[:, :1]
        for j in range(1, K):
            read_R2D = read_R2D + torch.stack([q_RK[:, j : j + 1], k_RK[:, j : j + 1]], dim=1) * s_RKD[:, j : j + 1]
            qk_R1 = qk_R1 + q_RK[:, j : j + 1] * k_RK[:, j : j + 1]
    else:
        read_R2D = torch.bmm(torch.stack([q_RK, k_RK], dim=1), s_RKD)
        qk_R1 = (q_RK * k_RK).sum(-1, keepdim=True)
    decay_R1 = _pointwise(torch.exp, g_BV, batch_invariant).reshape(B * V, 1)
    delta_RD = (v_BVD.reshape(B * V, D) - decay_R1 * read_R2D[:, 1]) * beta_BV.reshape(B * V, 1)
    o_RD = decay_R1 * read_R2D[:, 0] + qk_R1 * delta_RD
    if batch_invariant:
        s_RKD.mul_(decay_R1.unsqueeze(-1)).add_(k_RK.unsqueeze(-1) * delta_RD.unsqueeze(1))
    else:
        s_RKD.mul_(decay_R1.unsqueeze(-1)).baddbmm_(k_RK.unsqueeze(-1), delta_RD.unsqueeze(1))
    return o_RD.view(B, V, D)


def _chunked_delta_rule(q_NVPK, k_NVPK, v_NVPD, g_NVP, beta_NVP, chunk: int):
    """The gated delta rule from a zero state, chunk by chunk. Within a chunk (Γ: cumulative log-decay from its
    start), the writes u solve (I + A) u = beta v - beta e^Γ (k · S0) with A[t, j] = beta_t e^(Γt - Γj) k_t·k_j for
    j < t; outputs are e^Γt q_t·S0 + sum_{j<=t} e^(Γt - Γj) (q_t·k_j) u_j; the state after it is
    e^Γend S0 + sum_j e^(Γend - Γj) k_j u_j^T. Returns (`[N, V, P, D]`, final state `[N, V, K, D]`)."""
    N, V, P, K = k_NVPK.shape
    D, pad = v_NVPD.shape[-1], (-P) % chunk
    if pad:  # beta = 0 and g = 0 on the padding: no write, no decay
        q_NVPK, k_NVPK, v_NVPD = (F.pad(t, (0, 0, 0, pad)) for t in (q_NVPK, k_NVPK, v_NVPD))
        g_NVP, beta_NVP = F.pad(g_NVP, (0, pad)), F.pad(beta_NVP, (0, pad))
    X, U = (P + pad) // chunk, chunk
    q, k, v = (t.reshape(N, V, X, U, t.shape[-1]) for t in (q_NVPK, k_NVPK, v_NVPD))
    gam_NVXU, beta_NVXU = g_NVP.reshape(N, V, X, U).cumsum(-1), beta_NVP.reshape(N, V, X, U)
    causal_UU = torch.ones(U, U, dtype=torch.bool, device=q.device).tril()
    decay_UU = torch.where(causal_UU, gam_NVXU.unsqueeze(-1) - gam_NVXU.unsqueeze(-2), float("-inf")).exp()
    a_UU = (beta_NVXU.unsqueeze(-1) * (k @ k.transpose(-1, -2)) * decay_UU).tril(-1)
    system_UU = a_UU + torch.eye(U, dtype=q.dtype, device=q.device)
    writes_v = torch.linalg.solve_triangular(system_UU, beta_NVXU.unsqueeze(-1) * v, upper=False,
                                             unitriangular=True)
    writes_k = torch.linalg.solve_triangular(system_UU, (beta_NVXU * gam_NVXU.exp()).unsqueeze(-1) * k,
                                             upper=False, unitriangular=True)
    attn_UU = (q @ k.transpose(-1, -2)) * decay_UU
    q_read = q * gam_NVXU.exp().unsqueeze(-1)
    k_write = k * (gam_NVXU[..., -1:] - gam_NVXU).exp().unsqueeze(-1)
    end_decay_NVX = gam_NVXU[..., -1].exp()
    state_NVKD = q.new_zeros(N, V, K, D)
    out = torch.empty_like(v)
    for x in range(X):
        u = writes_v[:, :, x] - writes_k[:, :, x] @ state_NVKD
        out[:, :, x] = q_read[:, :, x] @ state_NVKD + attn_UU[:, :, x] @ u
        state_NVKD = state_NVKD * end_decay_NVX[:, :, x, None, None] + k_write[:, :, x].transpose(-1, -2) @ u
    return out.reshape(N, V, X * U, D)[:, :, :P], state_NVKD


def _output(w: LinearAttentionWeights, o_TVD: torch.Tensor, z_TVD: torch.Tensor, linear) -> torch.Tensor:
    """Gated RMSNorm per value head (float32 statistics, the weight in the model dtype, times silu(z) in float32),
    then out_proj."""
    x = o_TVD.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + w.spec.eps)
    x = (w.norm_D * x.to(o_TVD.dtype)) * F.silu(z_TVD.float())
    return linear(x.to(o_TVD.dtype).reshape(o_TVD.shape[0], -1), w.out_HC)
