"""RL losses and advantages: PPO-clip (GRPO, DAPO clip-higher, dual clip), GSPO, KL estimators, entropy, and the
rollout corrections (TIS, IcePop-style mask), at token or sequence level.

Losses never know the batch layout. A micro-batch reaches them as flat response-token tensors: `logp_T` (new
policy, requires grad), `old_logp_T`, `advantages_T` (the sample's advantage on each of its tokens), `seq_idx_T`
(the sample of each token, 0..num_seqs-1) and optionally `rollout_logp_T`, `ref_logp_T`, `entropy_T`.

Gradient accumulation: the step sums `loss.backward()` over micro-batches, so every micro-batch normalizes by the
GLOBAL denominators of its optimizer step (`num_tokens_total`, `num_seqs_total`); the sum over micro-batches is then
exactly the global-batch loss, and so are the metrics (detached scalars that sum to the global mean).

Aggregation (`loss_agg_mode`, verl's names):
  token-mean                sum over all tokens / num_tokens_total (DAPO; the default of GRPO and REINFORCE++)
  seq-mean-token-mean       per sample mean over its tokens, then sum / num_seqs_total (GSPO's default, as in the
                            paper and verl)
  seq-mean-token-sum-norm   per sample sum over its tokens / a constant length (`token_sum_norm`, the rollout's max
                            response length), then sum / num_seqs_total (Dr.GRPO: no length bias)

Rollout corrections use the ratio old / rollout (train policy before the update vs the engine that sampled):
  TIS   multiply each token's policy-gradient term by clamp(ratio, tis_clip_low, tis_clip), detached (slime --use-tis)
  MASK  IcePop-style: drop tokens whose ratio leaves [mask_low, mask_high]
At sequence level the ratio is the geometric mean over the sample's tokens (exp of the mean log-ratio), as verl's
`seq_mean` modes and SkyRL's geometric mask do: a product over hundreds of tokens would be all-or-nothing.

Tensor suffixes: T response tokens, V vocabulary, S samples in the micro-batch, P prompts, N samples per prompt.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "AdvantageEstimator", "KLType", "LossAggMode", "CorrectionLevel", "LossConfig", "group_advantages",
    "kl_penalty", "entropy_from_logits", "rollout_correction", "policy_loss",
]

logger = logging.getLogger(__name__)


class AdvantageEstimator(enum.StrEnum):
    GRPO = "grpo"
    GSPO = "gspo"
    REINFORCE_PLUS_PLUS = "reinforce_plus_plus"


class KLType(enum.StrEnum):
    K1 = "k1"
    K2 = "k2"
    K3 = "k3"
    LOW_VAR_KL = "low_var_kl"


class LossAggMode(enum.StrEnum):
    TOKEN_MEAN = "token-mean"
    SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
    SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"


class CorrectionLevel(enum.StrEnum):
    TOKEN = "token"
    SEQUENCE = "sequence"


@dataclass(kw_only=True)
class LossConfig:
    advantage_estimator: AdvantageEstimator = AdvantageEstimator.GRPO
    """grpo / reinforce_plus_plus: token-level PPO clip; gspo: sequence-level ratio and clip."""
    eps_clip: float = 0.2
    """Lower clip range: ratio >= 1 - eps_clip (slime --eps-clip)."""
    eps_clip_high: float | None = None
    """Upper clip range, DAPO clip-higher (slime --eps-clip-high); None: eps_clip."""
    eps_clip_c: float | None = None
    """Dual-clip constant (> 1) bounding the loss of negative-advantage tokens (slime --eps-clip-c); None: off."""
    use_kl_loss: bool = False
    """Compute KL(actor || reference) and add kl_loss_coef * KL to the loss (0: logged only, as slime does)."""
    kl_loss_type: KLType = KLType.LOW_VAR_KL
    """Estimator of the KL term (k1, k2, k3, low_var_kl = k3 clamped as verl does)."""
    kl_loss_coef: float = 0.0
    """Weight of the KL term in the loss (slime --kl-loss-coef)."""
    entropy_coef: float = 0.0
    """Entropy bonus: loss -= entropy_coef * entropy."""
    use_tis: bool = False
    """Truncated importance sampling on old/rollout ratios (slime --use-tis)."""
    tis_clip: float = 2.0
    """Upper bound of the TIS weight (slime --tis-clip)."""
    tis_clip_low: float = 0.0
    """Lower bound of the TIS weight (slime --tis-clip-low); tis_clipfrac counts weights clipped at either bound."""
    rollout_mask: bool = False
    """IcePop-style mask: tokens (or samples) whose old/rollout ratio leaves [mask_low, mask_high] get no gradient."""
    mask_low: float = 0.5
    """Lowest old/rollout ratio kept by the mask."""
    mask_high: float = 2.0
    """Highest old/rollout ratio kept by the mask."""
    correction_level: CorrectionLevel = CorrectionLevel.TOKEN
    """TIS and mask per token, or per sample on its geometric-mean ratio."""
    loss_agg_mode: LossAggMode | None = None
    """How token terms become the loss (see the module docstring). None: the estimator's own, seq-mean-token-mean
    for GSPO (the paper's and verl's), token-mean otherwise."""
    token_sum_norm: int | None = None
    """seq-mean-token-sum-norm's constant divisor (Dr.GRPO); None: the rollout's max response length (the trainer
    sets it)."""

    def __post_init__(self) -> None:
        self.advantage_estimator = AdvantageEstimator(self.advantage_estimator)
        self.kl_loss_type = KLType(self.kl_loss_type)
        self.correction_level = CorrectionLevel(self.correction_level)
        gspo = self.advantage_estimator is AdvantageEstimator.GSPO
        if self.loss_agg_mode is None:
            self.loss_agg_mode = LossAggMode.SEQ_MEAN_TOKEN_MEAN if gspo else LossAggMode.TOKEN_MEAN
        else:
            self.loss_agg_mode = LossAggMode(self.loss_agg_mode)
            if gspo and self.loss_agg_mode is not LossAggMode.SEQ_MEAN_TOKEN_MEAN:
                logger.warning("GSPO with --loss-agg-mode %s: the GSPO paper and verl average per sequence "
                               "(seq-mean-token-mean, GSPO's default here)", self.loss_agg_mode.value)
        if self.token_sum_norm is not None and self.token_sum_norm < 1:
            raise ValueError(f"token_sum_norm must be >= 1: got {self.token_sum_norm}")
        for name in ("eps_clip", "eps_clip_high", "kl_loss_coef", "entropy_coef", "tis_clip_low", "mask_low"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v < 0):
                raise ValueError(f"{name} must be a finite number >= 0: got {v}")
        if self.eps_clip_c is not None and not (math.isfinite(self.eps_clip_c) and self.eps_clip_c > 1):
            raise ValueError(f"eps_clip_c (dual clip) must be > 1: got {self.eps_clip_c}")
        if not self.tis_clip > self.tis_clip_low:
            raise ValueError(f"tis_clip must be > tis_clip_low: got tis_clip={self.tis_clip}, "
                             f"tis_clip_low={self.tis_clip_low}")
        if not self.mask_high > self.mask_low:
            raise ValueError(f"mask_high must be > mask_low: got [{self.mask_low}, {self.mask_high}]")

    @property
    def clip_high(self) -> float:
        return self.eps_clip if self.eps_clip_high is None else self.eps_clip_high


def group_advantages(rewards_PN: torch.Tensor, estimator: AdvantageEstimator, *, std_normalization: bool = True,
                     eps: float = 1e-6, sum_over_ranks: Callable[[list[float]], list[float]] | None = None
                     ) -> torch.Tensor:
    """Per-sample advantages `[P, N]` from rewards `[P, N]` (N samples per prompt).

    GRPO/GSPO: (r - group mean) / (group std + eps); without std normalization it is Dr.GRPO's r - group mean.
    REINFORCE++-baseline: r - group mean, then divided by the std of those over the whole batch. The std is the
    unbiased one (torch's default, as verl and slime compute it). A group whose rewards are all equal gets 0.
    Data parallel: each rank holds whole groups, so only REINFORCE++'s batch std needs the other ranks;
    `sum_over_ranks` sums its statistics (count, sum, sum of squares) over them: the global batch's std.
    """
    rewards_PN = rewards_PN.float()
    centered = rewards_PN - rewards_PN.mean(dim=-1, keepdim=True)
    if AdvantageEstimator(estimator) is AdvantageEstimator.REINFORCE_PLUS_PLUS:
        if not std_normalization:
            return centered
        x = centered.double()
        stats = [float(x.numel()), x.sum().item(), x.square().sum().item()]
        n, s1, s2 = sum_over_ranks(stats) if sum_over_ranks is not None else stats
        var = (s2 - s1 * s1 / n) / (n - 1) if n > 1 else 0.0
        return centered / (math.sqrt(max(var, 0.0)) + eps)
    if not std_normalization:
        return centered
    n = rewards_PN.shape[-1]
    std = rewards_PN.std(dim=-1, keepdim=True) if n > 1 else torch.zeros_like(centered[..., :1])
    return centered / (std + eps)


def kl_penalty(logp_T: torch.Tensor, ref_logp_T: torch.Tensor, kind: KLType) -> torch.Tensor:
    """Per-token estimate of KL(actor || reference) from samples of the actor (Schulman's k1, k2, k3)."""
    kind = KLType(kind)
    log_ratio = logp_T - ref_logp_T
    if kind is KLType.K1:
        return log_ratio
    if kind is KLType.K2:
        return 0.5 * log_ratio.square()
    neg = -log_ratio  # log ref/actor
    if kind is KLType.LOW_VAR_KL:  # verl clamps the exponent and the value for stability
        neg = neg.clamp(-20, 20)
        return (neg.exp() - neg - 1).clamp(-10, 10)
    return neg.exp() - neg - 1


def entropy_from_logits(logits_TV: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per row, in float32: logsumexp(z) - sum softmax(z) * z."""
    z = logits_TV.float()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


def rollout_correction(old_logp_T: torch.Tensor, rollout_logp_T: torch.Tensor, seq_idx_T: torch.Tensor,
                       num_seqs: int, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Detached weights `[T]` (TIS; 1 when off) and a keep mask `[T]` (mask mode; all True when off), from the
    ratio old / rollout at token or sequence level. Metrics are per-token means over this micro-batch's tokens."""
    log_ratio = (old_logp_T - rollout_logp_T).detach().float()
    if cfg.correction_level is CorrectionLevel.SEQUENCE:
        mean_S = _seq_mean(log_ratio, seq_idx_T, num_seqs)
        log_ratio = mean_S[seq_idx_T]  # geometric mean ratio of each sample, on each of its tokens
    ratio = log_ratio.clamp(max=20).exp()
    weights = torch.ones_like(ratio)
    keep = torch.ones_like(ratio, dtype=torch.bool)
    metrics: dict[str, torch.Tensor] = {}
    if cfg.use_tis:
        weights = ratio.clamp(cfg.tis_clip_low, cfg.tis_clip)
        metrics["tis_clipfrac"] = ((ratio > cfg.tis_clip) | (ratio < cfg.tis_clip_low)).float().sum()
        metrics["tis_mean"] = weights.sum()
    if cfg.rollout_mask:
        keep = (ratio >= cfg.mask_low) & (ratio <= cfg.mask_high)
        metrics["mask_frac"] = (~keep).float().sum()
    return weights, keep, metrics


def policy_loss(*, logp_T: torch.Tensor, old_logp_T: torch.Tensor, advantages_T: torch.Tensor,
                seq_idx_T: torch.Tensor, num_seqs: int, cfg: LossConfig, num_tokens_total: int, num_seqs_total: int,
                rollout_logp_T: torch.Tensor | None = None, ref_logp_T: torch.Tensor | None = None,
                entropy_T: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The micro-batch's share of the step's loss, and its share of each metric (see the module docstring).

    Metric keys: pg_loss, ppo_kl (mean of old - new log-prob), clipfrac, kl_loss, entropy, and with a rollout
    correction tis_mean, tis_clipfrac, mask_frac.
    """
    if num_tokens_total <= 0 or num_seqs_total <= 0:
        raise ValueError(f"global denominators must be positive: got num_tokens_total={num_tokens_total}, "
                         f"num_seqs_total={num_seqs_total}")
    old_logp_T = old_logp_T.detach()
    log_ratio = logp_T - old_logp_T
    adv = advantages_T.to(logp_T.dtype)
    lo, hi = 1.0 - cfg.eps_clip, 1.0 + cfg.clip_high
    if cfg.advantage_estimator is AdvantageEstimator.GSPO:
        # GSPO (arXiv 2507.18071): sequence ratio s = exp(mean_t log ratio), clipped per sequence; the token form
        # sg[s] * exp(logp - sg[logp]) carries the gradient of s. The paper's clip ranges are ~1e-3 wide.
        seq_log_ratio = _seq_mean(log_ratio, seq_idx_T, num_seqs)[seq_idx_T]
        ratio = (seq_log_ratio.detach() + logp_T - logp_T.detach()).exp()
    else:
        ratio = log_ratio.exp()
    surr1 = -adv * ratio
    surr2 = -adv * ratio.clamp(lo, hi)
    pg_T = torch.maximum(surr1, surr2)
    clipped_T = surr2 > surr1
    if cfg.eps_clip_c is not None:  # dual clip: bound the loss of negative-advantage tokens by -c * A
        pg_dual = torch.minimum(pg_T, -adv * cfg.eps_clip_c)
        pg_T = torch.where(adv < 0, pg_dual, pg_T)
    metrics: dict[str, torch.Tensor] = {}
    if cfg.use_tis or cfg.rollout_mask:
        if rollout_logp_T is None:
            raise ValueError("use_tis / rollout_mask need the rollout log-probs (rollout_logp_T)")
        weights_T, keep_T, corr = rollout_correction(old_logp_T, rollout_logp_T, seq_idx_T, num_seqs, cfg)
        pg_T = pg_T * weights_T * keep_T
        metrics |= {k: v / num_tokens_total for k, v in corr.items()}
    loss = _aggregate(pg_T, seq_idx_T, num_seqs, cfg, num_tokens_total, num_seqs_total)
    metrics["pg_loss"] = loss.detach()
    if cfg.use_kl_loss:
        if ref_logp_T is None:
            raise ValueError("use_kl_loss needs the reference log-probs (ref_logp_T)")
        kl = _aggregate(kl_penalty(logp_T, ref_logp_T.detach(), cfg.kl_loss_type), seq_idx_T, num_seqs, cfg,
                        num_tokens_total, num_seqs_total)
        loss = loss + cfg.kl_loss_coef * kl
        metrics["kl_loss"] = kl.detach()
    if entropy_T is not None:
        ent = _aggregate(entropy_T, seq_idx_T, num_seqs, cfg, num_tokens_total, num_seqs_total)
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * ent
        metrics["entropy"] = ent.detach()
    metrics["ppo_kl"] = (-log_ratio.detach()).sum() / num_tokens_total
    metrics["clipfrac"] = clipped_T.float().sum() / num_tokens_total
    return loss, metrics


# --- private ------------------------------------------------------------------------------------------------------
def _seq_mean(values_T: torch.Tensor, seq_idx_T: torch.Tensor, num_seqs: int) -> torch.Tensor:
    sums = torch.zeros(num_seqs, dtype=values_T.dtype, device=values_T.device).index_add(0, seq_idx_T, values_T)
    # index_add, not bincount: bincount's output size depends on the data, a device sync on CUDA
    counts = torch.zeros(num_seqs, dtype=values_T.dtype, device=values_T.device).index_add(
        0, seq_idx_T, torch.ones_like(values_T)).clamp_min(1)
    return sums / counts


def _aggregate(values_T: torch.Tensor, seq_idx_T: torch.Tensor, num_seqs: int, cfg: LossConfig,
               num_tokens_total: int, num_seqs_total: int) -> torch.Tensor:
    mode = cfg.loss_agg_mode
    if mode is LossAggMode.TOKEN_MEAN:
        return values_T.sum() / num_tokens_total
    if mode is LossAggMode.SEQ_MEAN_TOKEN_SUM_NORM:  # sum over samples of (token sum / constant), / samples
        if cfg.token_sum_norm is None:
            raise ValueError("seq-mean-token-sum-norm needs LossConfig.token_sum_norm (the constant length)")
        return values_T.sum() / (cfg.token_sum_norm * num_seqs_total)
    return _seq_mean(values_T, seq_idx_T, num_seqs).sum() / num_seqs_total
