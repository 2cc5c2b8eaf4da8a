"""The rollout engine's MoE block, shared by every family: routing (the family's arithmetic, from
`r3rl.models.routing`, on the engine's copy of the router tensors; on GPU with the fused experts, the same arithmetic
in one Triton kernel, `r3rl.rollout.model.router_kernel`), routed experts, and an optional shared expert.

Experts run as fused Triton kernels (CUDA with triton installed, SwiGLU with SiLU or GPT-OSS experts:
`r3rl.rollout.model.fused_moe`), a sorted grouped matmul, a per-row gather (batch-invariant, CPU) or a per-expert loop
(where grouped_mm is unavailable). The expert MLP is SwiGLU on HF's fused `[E, 2I, H]` gate-then-up layout, or
GPT-OSS's clamped GLU on interleaved gate/up columns with biases. Used by
`r3rl.rollout.model.forward`; not a public API.

Tensor suffixes: T tokens, H hidden, E experts, K top-k, I intermediate (2I: fused gate and up), R rows of a
flattened (token, k) product.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r3rl.models.routing import RouterSpec, route, router_logits
from r3rl.rollout.model import fused_moe, router_kernel
from r3rl.rollout.model.fused_moe import ExpertAct  # defined next to the kernels that switch on it; public here
from r3rl.rollout.model.kv_cache import RouteTarget

__all__ = ["MoEKernel", "ExpertAct", "MoEWeights", "MoEBlock"]

logger = logging.getLogger(__name__)


class MoEKernel(enum.Enum):
    """How the engine runs the experts (chosen once, at construction)."""

    FUSED = "fused"  # Triton (model.fused_moe): alignment, gate/up + act, down + gate weight (CUDA default)
    GROUPED_MM = "grouped_mm"  # sort (token, k) rows by expert, one grouped GEMM per projection
    GATHER = "gather"  # one small matmul per (token, k) on gathered expert weights: batch-invariant (CPU)
    LOOP = "loop"  # per-expert loop with a host sync: the fallback where grouped_mm is unavailable


@dataclass
class MoEWeights:
    """One MoE layer: router tensors and constants, routed experts, optional shared expert (engine copies)."""

    moe_layer: int  # index on the trace's layer axis
    router_spec: RouterSpec
    router_EH: torch.Tensor
    router_bias_E: torch.Tensor | None  # added to the logits (GPT-OSS)
    correction_E: torch.Tensor | None  # selection-only correction bias (sigmoid families), float32
    gate_up_EIH: torch.Tensor  # [E, 2I, H]
    down_EHI: torch.Tensor  # [E, H, I]
    gate_up_bias_EI: torch.Tensor | None = None  # GPT-OSS expert biases
    down_bias_EH: torch.Tensor | None = None
    shared_gate_up_IH: torch.Tensor | None = None  # shared expert (Qwen2-MoE, DeepSeek-V3, GLM-4.5)
    shared_down_HI: torch.Tensor | None = None
    shared_gate_1H: torch.Tensor | None = None  # Qwen2-MoE's sigmoid gate on the shared expert


class MoEBlock:
    """Routing and experts of every MoE layer of one engine (the kernel is chosen once)."""

    def __init__(self, *, num_experts: int, act: Callable, expert_act: ExpertAct, linear: Callable,
                 batch_invariant: bool, probe: MoEWeights, alpha: float = 1.702, limit: float = 7.0,
                 fused: bool = True) -> None:
        self.num_experts, self.act, self.expert_act, self.linear = num_experts, act, expert_act, linear
        self.alpha, self.limit = alpha, limit
        self._expert_ends_E = torch.arange(1, num_experts + 1, device=probe.gate_up_EIH.device)
        if batch_invariant:
            self.kernel, self._expert_mlp = MoEKernel.GATHER, None
        elif fused and self._fused_fits(probe):  # _expert_mlp stays set: __call__ takes the sorted path
            self.kernel, self._expert_mlp = MoEKernel.FUSED, self._expert_mlp_grouped
        elif self._grouped_mm_works(probe):
            self.kernel, self._expert_mlp = MoEKernel.GROUPED_MM, self._expert_mlp_grouped
        else:
            self.kernel, self._expert_mlp = MoEKernel.LOOP, self._expert_mlp_loop
        # the fused experts' router in one Triton kernel (scores, top-k, gate weights, capture write, expert counts)
        self._counts_E = torch.zeros(num_experts, dtype=torch.int32, device=probe.gate_up_EIH.device)  # reused by
        # every layer, left zeroed by each call
        self.fused_router = self.kernel is MoEKernel.FUSED and self._fused_router_fits(probe)

    def __call__(self, w: MoEWeights, h_TH: torch.Tensor, valid_T: torch.Tensor | None,
                 target: RouteTarget | None = None,
                 residual_TH: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, top-k ids). `valid_T` False marks padding rows, kept out of the experts. `target`: where the
        routing capture takes this layer's ids (every token's, padding included). `residual_TH`: the output is
        `residual_TH + moe(h_TH)` (the fused kernels add it in their last pass)."""
        logits_TE = router_logits(w.router_spec, h_TH, w.router_EH, w.router_bias_E, linear=self.linear)
        if self.fused_router and w.correction_E is None:  # (every layer of a family routes alike; this one surely)
            (T, K), E = (h_TH.shape[0], w.router_spec.top_k), self.num_experts
            cfg = fused_moe.default_config(T * K, E)
            weights_TK, ids_TK, align = router_kernel.route_align(w.router_spec, logits_TE, self._counts_E,
                                                                  block_m=cfg.block_m, valid_T=valid_T, target=target)
            out_TH = fused_moe.fused_moe(h_TH, ids_TK, weights_TK, w.gate_up_EIH, w.down_EHI, valid_T=valid_T,
                                         gate_up_bias_EI=w.gate_up_bias_EI, down_bias_EH=w.down_bias_EH,
                                         act=self.expert_act, alpha=self.alpha, limit=self.limit, config=cfg,
                                         align=align, residual_TH=residual_TH if w.shared_gate_up_IH is None else None)
            if w.shared_gate_up_IH is None:
                return out_TH, ids_TK
            return _plus(residual_TH, self._add_shared(w, h_TH, out_TH)), ids_TK
        # sorted: a family's sorted=False top-k may order the k ids differently with the number of rows, which would
        # change the sum over k and break batch invariance; the set of experts is the family's
        weights_TK, ids_TK = route(w.router_spec, logits_TE, w.correction_E, sorted_topk=True,
                                   batch_invariant=self._expert_mlp is None)
        if target is not None:
            target.write(ids_TK)
        if self._expert_mlp is None:
            out_TH = self._experts_gather(h_TH, ids_TK, weights_TK, w)
        else:
            out_TH = self._experts_sorted(h_TH, ids_TK, weights_TK, valid_T, w)
        return _plus(residual_TH, self._add_shared(w, h_TH, out_TH)), ids_TK

    def _add_shared(self, w: MoEWeights, h_TH: torch.Tensor, out_TH: torch.Tensor) -> torch.Tensor:
        if w.shared_gate_up_IH is None:
            return out_TH
        shared_TH = self.dense_mlp(h_TH, w.shared_gate_up_IH, w.shared_down_HI)
        if w.shared_gate_1H is not None:  # Qwen2-MoE: a sigmoid gate on the shared expert
            shared_TH = torch.sigmoid(self.linear(h_TH, w.shared_gate_1H)) * shared_TH
        return out_TH + shared_TH

    def dense_mlp(self, h_TH: torch.Tensor, gate_up_IH: torch.Tensor, down_HI: torch.Tensor) -> torch.Tensor:
        gate_TI, up_TI = self.linear(h_TH, gate_up_IH).chunk(2, dim=-1)
        return self.linear(self.act(gate_TI) * up_TI, down_HI)

    # --- expert MLP pieces --------------------------------------------------------------------------------------------
    def _glu(self, gate_up_RI: torch.Tensor) -> torch.Tensor:
        if self.expert_act is ExpertAct.SWIGLU:
            gate_RI, up_RI = gate_up_RI.chunk(2, dim=-1)
            return self.act(gate_RI) * up_RI
        return fused_moe.gpt_oss_glu(gate_up_RI, self.alpha, self.limit)

    def _experts_gather(self, h_TH, ids_TK, weights_TK, w: MoEWeights) -> torch.Tensor:
        """Batch-invariant experts: one matmul per (token, k) against its gathered expert weights."""
        (T, K), H = ids_TK.shape, h_TH.shape[1]
        flat_R = ids_TK.reshape(-1)
        x_R1H = h_TH.unsqueeze(1).expand(T, K, H).reshape(T * K, 1, H)
        gate_up_R1I = torch.bmm(x_R1H, w.gate_up_EIH[flat_R].transpose(1, 2))
        if w.gate_up_bias_EI is not None:
            gate_up_R1I = gate_up_R1I + w.gate_up_bias_EI[flat_R].unsqueeze(1)
        y_R1H = torch.bmm(self._glu(gate_up_R1I), w.down_EHI[flat_R].transpose(1, 2))
        if w.down_bias_EH is not None:
            y_R1H = y_R1H + w.down_bias_EH[flat_R].unsqueeze(1)
        return _weighted_sum(y_R1H.view(T, K, H), weights_TK)

    def _experts_sorted(self, h_TH, ids_TK, weights_TK, valid_T, w: MoEWeights) -> torch.Tensor:
        """Sort (token, k) rows by expert, run each expert on its rows, unsort, weight and sum over k.

        Padding rows get the sentinel expert E: they sort last, past every group, and cost no expert compute."""
        if self.kernel is MoEKernel.FUSED:
            return fused_moe.fused_moe(h_TH, ids_TK, weights_TK, w.gate_up_EIH, w.down_EHI, valid_T=valid_T,
                                       gate_up_bias_EI=w.gate_up_bias_EI, down_bias_EH=w.down_bias_EH,
                                       act=self.expert_act, alpha=self.alpha, limit=self.limit)
        (T, K), E = ids_TK.shape, self.num_experts
        if valid_T is not None:
            ids_TK = ids_TK.masked_fill(~valid_T.unsqueeze(1), E)
        sorted_R, order_R = ids_TK.reshape(-1).sort()
        y_RH = self._expert_mlp(h_TH[order_R // K], sorted_R, w)
        if valid_T is not None:  # rows past the last group are left unwritten by grouped_mm
            y_RH = torch.where((sorted_R < E).unsqueeze(1), y_RH, 0)
        unsorted_RH = torch.empty_like(y_RH)
        unsorted_RH[order_R] = y_RH
        return _weighted_sum(unsorted_RH.view(T, K, -1), weights_TK)

    def _fused_fits(self, probe: MoEWeights) -> bool:
        """The Triton kernels apply: CUDA, triton installed, and GPT-OSS experts or SwiGLU with SiLU (expert biases,
        optional, either way)."""
        if not (fused_moe.available() and probe.gate_up_EIH.is_cuda):
            return False
        if self.expert_act is not ExpertAct.GPT_OSS:
            x = torch.linspace(-6, 6, 64, device=probe.gate_up_EIH.device)
            if not torch.allclose(self.act(x), F.silu(x)):  # ACT2FN's class names vary across versions
                return False
        # compile and run the kernels once on two tokens (the installed triton must build them for this GPU); a
        # failure falls back to grouped_mm with a warning rather than failing the first rollout
        dev, H = probe.gate_up_EIH.device, probe.gate_up_EIH.shape[2]
        return _kernel_trial("fused MoE kernels", "grouped_mm", dev, lambda: fused_moe.fused_moe(
            torch.zeros(2, H, dtype=probe.gate_up_EIH.dtype, device=dev),
            torch.zeros(2, 1, dtype=torch.int64, device=dev),
            torch.ones(2, 1, dtype=probe.gate_up_EIH.dtype, device=dev), probe.gate_up_EIH, probe.down_EHI,
            gate_up_bias_EI=probe.gate_up_bias_EI, down_bias_EH=probe.down_bias_EH, act=self.expert_act,
            alpha=self.alpha, limit=self.limit))

    def _fused_router_fits(self, probe: MoEWeights) -> bool:
        """The router kernel computes this family's routing and builds for this GPU (run once on two tokens; a
        failure keeps the torch router, with a warning)."""
        if probe.router_spec is None or not router_kernel.fits(probe.router_spec, probe.correction_E,
                                                               probe.gate_up_EIH.device):
            return False
        dev = probe.router_EH.device
        return _kernel_trial("fused router kernel", "the torch router", dev, lambda: router_kernel.route_align(
            probe.router_spec, torch.zeros(2, self.num_experts, dtype=probe.router_EH.dtype, device=dev),
            self._counts_E, block_m=16))

    def _expert_mlp_grouped(self, x_RH, sorted_R, w: MoEWeights) -> torch.Tensor:
        ends_E = torch.searchsorted(sorted_R, self._expert_ends_E, out_int32=True)  # on device: graph-safe
        gate_up_RI = _grouped_mm(x_RH, w.gate_up_EIH.transpose(1, 2), offs=ends_E)
        rows_R = sorted_R.clamp(max=self.num_experts - 1)  # padding rows (sentinel E) are zeroed by the caller
        if w.gate_up_bias_EI is not None:
            gate_up_RI = gate_up_RI + w.gate_up_bias_EI[rows_R]
        y_RH = _grouped_mm(self._glu(gate_up_RI), w.down_EHI.transpose(1, 2), offs=ends_E)
        return y_RH if w.down_bias_EH is None else y_RH + w.down_bias_EH[rows_R]

    def _expert_mlp_loop(self, x_RH, sorted_R, w: MoEWeights) -> torch.Tensor:
        """Fallback where grouped_mm is unavailable: a loop over experts (host sync; CUDA graphs are turned off)."""
        counts = torch.bincount(sorted_R, minlength=self.num_experts + 1).tolist()
        y_RH = x_RH.new_zeros(x_RH.shape[0], w.down_EHI.shape[1])
        start = 0
        for e in range(self.num_experts):
            end = start + counts[e]
            if end > start:
                gate_up_RI = self.linear(x_RH[start:end], w.gate_up_EIH[e],
                                         None if w.gate_up_bias_EI is None else w.gate_up_bias_EI[e])
                y_RH[start:end] = self.linear(self._glu(gate_up_RI), w.down_EHI[e],
                                              None if w.down_bias_EH is None else w.down_bias_EH[e])
            start = end
        return y_RH

    def _grouped_mm_works(self, w: MoEWeights) -> bool:
        x_RH = torch.zeros(2, w.gate_up_EIH.shape[2], dtype=w.gate_up_EIH.dtype, device=w.gate_up_EIH.device)
        try:
            self._expert_mlp_grouped(x_RH, torch.zeros(2, dtype=torch.int64, device=x_RH.device), w)
            return True
        except (RuntimeError, NotImplementedError, TypeError) as e:
            logger.warning("grouped_mm is unavailable for %s on %s (%s); using the per-expert loop and no CUDA "
                           "graphs", x_RH.dtype, x_RH.device, str(e).splitlines()[0])
            return False


def _kernel_trial(what: str, fallback: str, device: torch.device, run: Callable[[], object]) -> bool:
    """Run a Triton kernel once (the installed triton must build it for this GPU); False, with a warning, on any
    build or launch error, so the engine falls back rather than failing its first rollout."""
    try:
        run()
    except Exception as e:  # noqa: BLE001 - any triton build or launch error
        logger.warning("%s unavailable on %s (%s: %s); using %s", what, device, type(e).__name__,
                       str(e).splitlines()[0] if str(e) else "", fallback)
        return False
    return True


def _plus(residual_TH: torch.Tensor | None, out_TH: torch.Tensor) -> torch.Tensor:
    return out_TH if residual_TH is None else residual_TH + out_TH


def _weighted_sum(y_TKH: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Sum over k of each expert output times its gate weight, rounded as HF's experts (grouped_mm, the default)
    round it: the product in the promoted dtype (bfloat16 gate weights, GPT-OSS and Qwen: each product rounded to
    bfloat16; float32 gate weights, the sigmoid families: exact), the sum over k accumulated in float32, then one cast
    to the hidden dtype. A bmm would keep the products unrounded (and round float32 weights to bfloat16 first). The
    fused kernels (`fused_moe`, MoEKernel.FUSED) round the same way."""
    return (y_TKH * weights_TK.unsqueeze(-1)).sum(dim=1).to(y_TKH.dtype)


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, *, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm  # F.grouped_mm from torch 2.10
    return fn(x, w, offs=offs)
