"""Routing arithmetic of every supported MoE family, on plain tensors: written once, used by the training model's
router adapter (`r3rl.models.adapters.routed_forward`, under replay or not) and by the rollout engine's forward.

A router's constants are read once from its module into a frozen `RouterSpec`; the tensors (weight, biases) are
passed in, so the same function runs on the HF module's parameters and on the engine's own copy of them.

    logits_TE = router_logits(spec, hidden_TH, weight_EH, logit_bias_E)
    weights_TK, ids_TK = route(spec, logits_TE, correction_E)                  # live selection
    weights_TK, ids_TK = route(spec, logits_TE, correction_E, select=replayed)  # replay: only the ids change

Routing splits into scores (`scores`), the ranking the live top-k runs on (`choice_scores`: scores plus a
selection-only correction bias, with group-limited masking), the selection itself (`select_live`, or replayed ids),
and the gate weights (`gate_weights`: read from the scores *without* the correction bias, at the selected ids,
normalized and scaled the family's way). With the live selection each function applies the same operations in the
same order as the family's transformers router, so the result is bitwise identical to it.

Tensor suffixes: T tokens, H hidden, E experts, K top-k, G expert groups.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Scoring", "RouterSpec", "router_logits", "scores", "choice_scores", "select_live", "gate_weights",
           "route", "Selection"]

Selection = Callable[[torch.Tensor], torch.Tensor]  # choice_TE -> ids_TK (live top-k, or replayed ids)
Linear = Callable[..., torch.Tensor]  # F.linear, or the engine's batch-invariant row-wise linear


class Scoring(enum.Enum):
    """How a family turns router logits into the scores it selects on and gates with."""

    SOFTMAX = "softmax"  # float32 softmax over all experts, top-k of the probabilities (Qwen, Mixtral, OLMoE)
    SIGMOID = "sigmoid"  # float32 sigmoid; top-k of scores + correction bias, group-limited (DeepSeek-V3, GLM, MiniMax)
    TOPK_SOFTMAX = "topk_softmax"  # top-k of the logits, then a softmax over the chosen ones (GPT-OSS)


@dataclass(frozen=True, kw_only=True)
class RouterSpec:
    """The constants of one router: everything routing needs besides its tensors."""

    num_experts: int
    """Routed experts E (the router's output width)."""
    top_k: int
    """Experts per token K."""
    scoring: Scoring = Scoring.SOFTMAX
    """Scores and selection rule, see `Scoring`."""
    logits_fp32: bool = False
    """Logits as `linear(hidden.float(), weight.float())` (DeepSeek-V3, GLM-4.5), else in the weight's dtype."""
    upcast_logits: bool = False
    """SOFTMAX: `softmax(logits.float())` (Mixtral) instead of `softmax(logits, dtype=float32)`."""
    renormalize: bool = False
    """Divide the top-k gate weights by their sum."""
    renorm_eps: float = 0.0
    """Added to that sum (DeepSeek-V3 and GLM add 1e-20)."""
    cast_to_logits_dtype: bool = False
    """Cast the gate weights back to the logits' dtype (Qwen, OLMoE)."""
    n_group: int = 1
    """SIGMOID: expert groups; a token picks from its `topk_group` best groups only (group score: sum of its top 2)."""
    topk_group: int = 1
    """SIGMOID: groups a token may pick from."""
    scaling_factor: float = 1.0
    """Routed scaling factor applied to the gate weights (DeepSeek-V3 2.5, GLM-4.5 1.0 to 2.5)."""
    sorted_topk: bool = True
    """`torch.topk(..., sorted=)` of the live selection, as the family calls it (its order is the k order)."""

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"RouterSpec: top_k must be in [1, num_experts={self.num_experts}]: got {self.top_k}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(f"RouterSpec: n_group must divide num_experts={self.num_experts}: got {self.n_group}")
        if self.n_group > 1 and not (1 <= self.topk_group <= self.n_group
                                     and self.topk_group * self.num_experts // self.n_group >= self.top_k):
            raise ValueError(f"RouterSpec: topk_group must be in [1, n_group={self.n_group}] and its groups must hold "
                             f"top_k={self.top_k} experts: got topk_group={self.topk_group}")
        if self.n_group > 1 and self.scoring is not Scoring.SIGMOID:
            raise ValueError(f"RouterSpec: group-limited routing is defined for sigmoid scoring: got {self.scoring}")


def router_logits(spec: RouterSpec, hidden_TH: torch.Tensor, weight_EH: torch.Tensor,
                  logit_bias_E: torch.Tensor | None = None, *, linear: Linear = F.linear) -> torch.Tensor:
    """`[T, E]` router logits: float32 for `logits_fp32` families, else in the weight's dtype."""
    if spec.logits_fp32:
        return linear(hidden_TH.float(), weight_EH.float())
    return linear(hidden_TH.to(weight_EH.dtype), weight_EH, logit_bias_E)


def scores(spec: RouterSpec, logits_TE: torch.Tensor, *, batch_invariant: bool = False) -> torch.Tensor:
    """What the gate weights are read from: softmax probabilities or sigmoid scores (float32), or the logits.

    `batch_invariant` (the CPU rollout engine): sigmoid as 1 / (1 + exp(-x)), since torch.sigmoid's CPU kernel
    rounds an element differently depending on the tensor's size (a row's scores would depend on the batch)."""
    if spec.scoring is Scoring.SOFTMAX:
        if spec.upcast_logits:
            return torch.softmax(logits_TE.float(), dim=-1)
        return torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    if spec.scoring is Scoring.SIGMOID:
        if batch_invariant:
            return torch.reciprocal(1 + torch.exp(-logits_TE.float()))
        return torch.sigmoid(logits_TE.float())
    return logits_TE


def choice_scores(spec: RouterSpec, scores_TE: torch.Tensor, correction_E: torch.Tensor | None = None) -> torch.Tensor:
    """What the live top-k ranks: the scores, plus the selection-only correction bias, with every expert outside a
    token's `topk_group` best groups at -inf. Its top-k is the family's live selection."""
    if correction_E is None and spec.n_group == 1:
        return scores_TE
    choice_TE = scores_TE + correction_E if correction_E is not None else scores_TE
    if spec.n_group == 1:
        return choice_TE
    T, E, G = choice_TE.shape[0], spec.num_experts, spec.n_group
    group_TG = choice_TE.view(T, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
    best_TG = torch.topk(group_TG, k=spec.topk_group, dim=-1, sorted=False)[1]
    keep_TG = torch.zeros_like(group_TG).scatter_(1, best_TG, 1)
    keep_TE = keep_TG.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
    return choice_TE.masked_fill(~keep_TE.bool(), float("-inf"))


def select_live(spec: RouterSpec, choice_TE: torch.Tensor, *, sorted_topk: bool | None = None) -> torch.Tensor:
    """The family's own selection: top-k of the choice scores. `sorted_topk` overrides the family's order (the
    engine sorts: with `sorted=False` the k order may depend on how many rows the call has)."""
    return torch.topk(choice_TE, spec.top_k, dim=-1,
                      sorted=spec.sorted_topk if sorted_topk is None else sorted_topk).indices


def gate_weights(spec: RouterSpec, logits_TE: torch.Tensor, scores_TE: torch.Tensor,
                 ids_TK: torch.Tensor) -> torch.Tensor:
    """`[T, K]` weights of the selected experts, from the scores without any correction bias."""
    weights_TK = scores_TE.gather(1, ids_TK)
    if spec.scoring is Scoring.TOPK_SOFTMAX:
        return torch.softmax(weights_TK, dim=1, dtype=weights_TK.dtype)
    if spec.renormalize:
        denominator_T1 = weights_TK.sum(dim=-1, keepdim=True)
        if spec.renorm_eps:
            denominator_T1 = denominator_T1 + spec.renorm_eps
        weights_TK = weights_TK / denominator_T1
    if spec.scaling_factor != 1.0:
        weights_TK = weights_TK * spec.scaling_factor
    if spec.cast_to_logits_dtype:
        weights_TK = weights_TK.to(logits_TE.dtype)
    return weights_TK


def route(spec: RouterSpec, logits_TE: torch.Tensor, correction_E: torch.Tensor | None = None,
          select: Selection | None = None, *, sorted_topk: bool | None = None,
          batch_invariant: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK, ids_TK): the live selection, or `select(choice_TE)` (replay), gated the family's way.
    `sorted_topk` and `batch_invariant`: see `select_live` and `scores` (the engine's choices)."""
    scores_TE = scores(spec, logits_TE, batch_invariant=batch_invariant)
    choice_TE = choice_scores(spec, scores_TE, correction_E)
    ids_TK = select_live(spec, choice_TE, sorted_topk=sorted_topk) if select is None else select(choice_TE)
    return gate_weights(spec, logits_TE, scores_TE, ids_TK), ids_TK
