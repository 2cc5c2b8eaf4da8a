"""Each loss, estimator and correction against a value computed by hand on a few tokens."""

import math

import pytest
import torch

from r3rl.train.losses import (
    AdvantageEstimator,
    CorrectionLevel,
    KLType,
    LossAggMode,
    LossConfig,
    entropy_from_logits,
    group_advantages,
    kl_penalty,
    policy_loss,
)

LN = math.log


def _loss(cfg, logp, old, adv, seq=(0, 0, 1), **kw):
    logp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    seq_t = torch.tensor(seq)
    loss, m = policy_loss(logp_T=logp, old_logp_T=torch.tensor(old, dtype=torch.float64),
                          advantages_T=torch.tensor(adv, dtype=torch.float64), seq_idx_T=seq_t,
                          num_seqs=int(seq_t.max()) + 1, cfg=cfg, num_tokens_total=kw.pop("n_tok", len(seq)),
                          num_seqs_total=kw.pop("n_seq", int(seq_t.max()) + 1), **kw)
    return loss, m, logp


def test_ppo_clip_both_sides_by_hand():
    # ratios 1.5 (A=+1: clipped at 1.2), 0.5 (A=-1: clipped at 0.8 -> loss 0.8), 1.0 (A=+2)
    loss, m, _ = _loss(LossConfig(), [LN(1.5), LN(0.5), 0.0], [0.0, 0.0, 0.0], [1.0, -1.0, 2.0])
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.0) / 3)
    assert m["clipfrac"].item() == pytest.approx(2 / 3)
    assert m["ppo_kl"].item() == pytest.approx(-(LN(1.5) + LN(0.5)) / 3)


def test_clip_higher_and_dual_clip():
    loss, _, _ = _loss(LossConfig(eps_clip_high=0.6), [LN(1.5)], [0.0], [1.0], seq=(0,))
    assert loss.item() == pytest.approx(-1.5)  # DAPO: 1.5 < 1.6, not clipped
    # ratio 5 with A = -1: PPO loss 5; dual clip bounds it by c * |A| = 3
    loss, _, _ = _loss(LossConfig(eps_clip_c=3.0), [LN(5.0)], [0.0], [-1.0], seq=(0,))
    assert loss.item() == pytest.approx(3.0)


def test_gspo_uses_the_sequence_ratio():
    # sample 0: log-ratios ln 2 and 0 -> s = sqrt(2) = 1.414 -> clipped to 1.2 (A=+1); sample 1: ratio 1
    cfg = LossConfig(advantage_estimator=AdvantageEstimator.GSPO)
    assert cfg.loss_agg_mode is LossAggMode.SEQ_MEAN_TOKEN_MEAN  # GSPO averages per sequence (paper, verl)
    loss, m, logp = _loss(cfg, [LN(2.0), 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    assert loss.item() == pytest.approx((-1.2 + -1.0) / 2)  # the mean of each sample's token mean
    loss.backward()
    assert logp.grad[:2].abs().sum() == 0 and logp.grad[2].item() == pytest.approx(-1 / 2)  # clipped: no gradient


def test_loss_agg_mode_defaults_per_estimator_and_gspo_token_mean_warns(caplog):
    assert LossConfig().loss_agg_mode is LossAggMode.TOKEN_MEAN
    assert LossConfig(advantage_estimator="reinforce_plus_plus").loss_agg_mode is LossAggMode.TOKEN_MEAN
    with caplog.at_level("WARNING", logger="r3rl.train.losses"):
        LossConfig(advantage_estimator=AdvantageEstimator.GSPO)
        LossConfig(advantage_estimator=AdvantageEstimator.GSPO, loss_agg_mode="seq-mean-token-mean")
        assert not caplog.records  # the paper's aggregation, default or explicit: nothing to say
        cfg = LossConfig(advantage_estimator=AdvantageEstimator.GSPO, loss_agg_mode="token-mean")
    assert cfg.loss_agg_mode is LossAggMode.TOKEN_MEAN  # the user's choice stands, with a warning
    [rec] = caplog.records
    assert "GSPO with --loss-agg-mode token-mean" in rec.getMessage() and "seq-mean-token-mean" in rec.getMessage()


def test_seq_mean_token_sum_norm_divides_token_sums_by_a_constant_by_hand():
    # Dr.GRPO: ratio 1, A = +1 on a 3-token and a 1-token sample, constant length 4:
    # loss = mean over samples of (sum of -A over tokens) / 4 = (-3/4 + -1/4) / 2
    cfg = LossConfig(loss_agg_mode="seq-mean-token-sum-norm", token_sum_norm=4)
    loss, _, logp = _loss(cfg, [0.0] * 4, [0.0] * 4, [1.0] * 4, seq=(0, 0, 0, 1))
    assert loss.item() == pytest.approx((-3 / 4 - 1 / 4) / 2)
    loss.backward()
    # every token weighs the same, whatever its sample's length (seq-mean-token-mean gives 1/6 vs 1/2)
    torch.testing.assert_close(logp.grad, torch.full((4,), -1 / 8, dtype=torch.float64))
    mean_cfg = LossConfig(loss_agg_mode="seq-mean-token-mean")
    loss, _, logp = _loss(mean_cfg, [0.0] * 4, [0.0] * 4, [1.0] * 4, seq=(0, 0, 0, 1))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-1 / 6] * 3 + [-1 / 2], dtype=torch.float64))


def test_seq_mean_token_sum_norm_takes_the_rollout_budget_and_refuses_none():
    from r3rl.cli import build_parser, train_config_from_args
    from r3rl.train.config import TrainConfig

    assert TrainConfig(rollout_max_response_len=9).loss.token_sum_norm == 9
    args = build_parser().parse_args(["train", "--loss-agg-mode", "seq-mean-token-sum-norm",
                                      "--rollout-max-response-len", "7"])
    cfg = train_config_from_args(args)
    assert (cfg.loss.loss_agg_mode, cfg.loss.token_sum_norm) == (LossAggMode.SEQ_MEAN_TOKEN_SUM_NORM, 7)
    gspo = train_config_from_args(build_parser().parse_args(["train", "--advantage-estimator", "gspo"]))
    assert gspo.loss.loss_agg_mode is LossAggMode.SEQ_MEAN_TOKEN_MEAN
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm needs LossConfig.token_sum_norm"):
        _loss(LossConfig(loss_agg_mode="seq-mean-token-sum-norm"), [0.0], [0.0], [1.0], seq=(0,))
    with pytest.raises(ValueError, match="token_sum_norm must be >= 1: got 0"):
        LossConfig(token_sum_norm=0)


def test_tis_weights_and_mask_mode():
    # old/rollout ratios 3 (TIS clip 2), 0.5, 1; ratio new/old = 1, A = 1 -> pg per token -1
    old, rollout = [LN(3.0), LN(0.5), 0.0], [0.0, 0.0, 0.0]
    cfg = LossConfig(use_tis=True, tis_clip=2.0)
    loss, m, _ = _loss(cfg, old, old, [1.0, 1.0, 1.0], rollout_logp_T=torch.tensor(rollout, dtype=torch.float64))
    assert loss.item() == pytest.approx(-(2.0 + 0.5 + 1.0) / 3)
    assert m["tis_clipfrac"].item() == pytest.approx(1 / 3) and m["tis_mean"].item() == pytest.approx(3.5 / 3)
    cfg = LossConfig(rollout_mask=True, mask_low=0.6, mask_high=2.0)
    loss, m, _ = _loss(cfg, old, old, [1.0, 1.0, 1.0], rollout_logp_T=torch.tensor(rollout, dtype=torch.float64))
    assert loss.item() == pytest.approx(-1 / 3) and m["mask_frac"].item() == pytest.approx(2 / 3)
    # sequence level: sample 0's geometric mean ratio sqrt(3 * 0.5) = 1.22 is in band; sample 1's is 1
    cfg = LossConfig(rollout_mask=True, mask_low=0.6, mask_high=2.0, correction_level=CorrectionLevel.SEQUENCE)
    loss, m, _ = _loss(cfg, old, old, [1.0, 1.0, 1.0], rollout_logp_T=torch.tensor(rollout, dtype=torch.float64))
    assert loss.item() == pytest.approx(-1.0) and m["mask_frac"].item() == 0
    with pytest.raises(ValueError, match="need the rollout log-probs"):
        _loss(LossConfig(use_tis=True), old, old, [1.0, 1.0, 1.0])


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([LN(0.5)]), torch.tensor([LN(0.25)])  # log ratio ln 2
    assert kl_penalty(logp, ref, KLType.K1).item() == pytest.approx(LN(2))
    assert kl_penalty(logp, ref, KLType.K2).item() == pytest.approx(0.5 * LN(2) ** 2)
    assert kl_penalty(logp, ref, KLType.K3).item() == pytest.approx(0.5 - 1 + LN(2))  # e^-x - 1 + x
    assert kl_penalty(logp, ref, KLType.LOW_VAR_KL).item() == pytest.approx(0.5 - 1 + LN(2))
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([-100.0]), KLType.LOW_VAR_KL).item() == 10.0  # clamped
    cfg = LossConfig(use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type=KLType.K1)
    loss, m, _ = _loss(cfg, [LN(0.5)], [LN(0.5)], [0.0], seq=(0,), ref_logp_T=ref.double())
    assert loss.item() == pytest.approx(0.5 * LN(2)) and m["kl_loss"].item() == pytest.approx(LN(2))


def test_entropy_matches_direct_computation_and_bonus_sign():
    logits = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    assert entropy_from_logits(logits)[0].item() == pytest.approx(LN(2))
    ent = torch.tensor([LN(2)], dtype=torch.float64)
    loss, m, _ = _loss(LossConfig(entropy_coef=0.1), [0.0], [0.0], [0.0], seq=(0,), entropy_T=ent)
    assert loss.item() == pytest.approx(-0.1 * LN(2)) and m["entropy"].item() == pytest.approx(LN(2))


@pytest.mark.parametrize("mode", list(LossAggMode))
def test_two_micro_batches_with_global_denominators_equal_one_batch(mode):
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(7, generator=gen, dtype=torch.float64) * 0.1
    old = logp + torch.randn(7, generator=gen, dtype=torch.float64) * 0.1
    adv = torch.randn(7, generator=gen, dtype=torch.float64)
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    cfg = LossConfig(loss_agg_mode=mode, token_sum_norm=5)

    def run(sl, seq_local):
        x = logp[sl].clone().requires_grad_(True)
        loss, _ = policy_loss(logp_T=x, old_logp_T=old[sl], advantages_T=adv[sl], seq_idx_T=seq_local,
                              num_seqs=int(seq_local.max()) + 1, cfg=cfg, num_tokens_total=7, num_seqs_total=3)
        loss.backward()
        return loss.item(), x.grad

    full, g_full = run(slice(0, 7), seq)
    a, g_a = run(slice(0, 3), seq[:3])
    b, g_b = run(slice(3, 7), seq[3:] - 1)
    assert a + b == pytest.approx(full)
    torch.testing.assert_close(torch.cat([g_a, g_b]), g_full)


def test_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()  # unbiased: 0.577
    a = group_advantages(r, AdvantageEstimator.GRPO)
    torch.testing.assert_close(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert torch.equal(a[1], torch.zeros(4))  # equal rewards: zero advantage, no NaN
    torch.testing.assert_close(group_advantages(r, AdvantageEstimator.GRPO, std_normalization=False)[0],
                               torch.tensor([0.5, -0.5, -0.5, 0.5]))
    c = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(r, AdvantageEstimator.REINFORCE_PLUS_PLUS).flatten(),
                               c / (c.std() + 1e-6))


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps_clip=-0.1), "eps_clip must be a finite number >= 0"),
    (dict(eps_clip_c=0.5), "eps_clip_c \\(dual clip\\) must be > 1"),
    (dict(tis_clip=0.1, tis_clip_low=0.2), "tis_clip must be > tis_clip_low"),
    (dict(mask_low=2.0, mask_high=1.0), "mask_high must be > mask_low"),
    (dict(advantage_estimator="ppo"), "'ppo' is not a valid AdvantageEstimator"),
])
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)
