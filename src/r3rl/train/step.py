"""One RL step, readable on one screen: `rl_step()`. The stages are the data flow of ARCHITECTURE.md:

  1. rollout through the RolloutBackend (engine in-process, or `--rollout-url`), traces recorded per token and layer;
  2. rewards and group advantages;
  3. reference log-probs: replay off (the reference routes freely), only when a KL term needs them;
  4. old-policy log-probs: R3 replays the rollout trace, R2 records;
  5. update over micro-batches (gradient accumulation), every forward under replay, activation checkpointing on so
     the recompute in backward replays too (`replay_backward`);
  6. weight sync to the rollout backend; the next rollout checks that it used the new version.

Routing metrics (`r3rl.train.metrics`), in every mode, against the rollout trace as received (before any
`--inject-fault`): `routing_mismatch` reads the experts that the old-policy forward and every update forward really
used at the experts modules' inputs (`r3rl.experts_tap`, never the replay's own record); `router_live_mismatch` is the
live router's choice in the old-policy forward (under R3, the live top-k the replay overrode): what R3 removed.

Log-probs: the trainer's are log_softmax(logits / rollout temperature), the distribution the rollout sampled from;
the rollout log-probs it compares them with (`train_rollout_*` metrics, TIS and mask corrections) are asked of the
engine at that same temperature.

Data parallel (torchrun, `r3rl.train.parallel`): every rank draws the same prompts, keeps its share of whole
groups, rolls them out and trains on them; loss denominators are global, so the optimizer step is the
single-process one on the global batch. Metrics are averaged over ranks; the R3 check's verdict is global.

Tensor suffixes: T response tokens, V vocabulary, P prompts, N samples per prompt, L layers.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from r3rl.check import ReplayCheck
from r3rl.config import Fault, ReplayKind
from r3rl.experts_tap import ExpertsTap
from r3rl.faults import corrupt_trace
from r3rl.models.chat import encode_prompt
from r3rl.replay import Recording, RoutingReplay
from r3rl.rollout.engine.messages import SamplingParams
from r3rl.rollout.net.backend import RolloutBackend
from r3rl.sample import Sample
from r3rl.trace import RoutingTrace, compact_dtype
from r3rl.train.config import LogprobSource, StalePolicy, TrainConfig
from r3rl.train.data import Layout, MicroBatch, make_micro_batches, plan_layout, response_logprobs
from r3rl.train.losses import KLType, group_advantages, kl_penalty, policy_loss
from r3rl.train.metrics import RoutingMismatch, train_rollout_metrics
from r3rl.train.parallel import DistEnv, mean_over_ranks, pad_count, prompt_shard, sum_over_ranks
from r3rl.train.regional_compile import compiled

__all__ = ["StepContext", "rl_step"]

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class StepContext:
    """What a step works on; built once by the Trainer."""

    cfg: TrainConfig
    model: nn.Module
    replay: RoutingReplay
    check: ReplayCheck | None
    rollout: RolloutBackend
    prompts: object  # r3rl.tasks PromptSource: next_batch / reward / state_dict
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ref_model: nn.Module | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    pad_id: int = 0
    env: DistEnv = field(default_factory=DistEnv)
    tap: ExpertsTap | None = None
    """Reads the experts each training forward used; built from `model` on the first step when None."""
    layer_masks: object = None
    """`LayoutPlan.layer_masks`: packed micro-batches of a family whose forward needs r3rl's layer masks."""
    env_factory: object = None
    """Multi-turn: f(prompt_item, tokenizer) -> Environment (r3rl.episodes); None: single-turn samples."""
    max_turns: int = 4


def rl_step(ctx: StepContext, step: int) -> dict:
    cfg, timer = ctx.cfg, _Timer(ctx.cfg.device)
    if ctx.tap is None:
        ctx.tap = ExpertsTap(ctx.model)
    with timer("rollout"):  # 1
        items = ctx.prompts.next_batch(cfg.rollout_batch_size)  # the same on every rank; each keeps its share
        items = [items[i] for i in prompt_shard(len(items), cfg.samples_per_optimizer_step // cfg.n_samples_per_prompt,
                                                ctx.env)]
        if ctx.env_factory is not None:  # multi-turn: one Sample per episode, its trace over every token
            samples = _episodes(ctx, items, step)
        else:
            samples = ctx.rollout.generate([_encode(ctx, it.prompt) for it in items], _sampling(ctx, step),
                                           n_samples_per_prompt=cfg.n_samples_per_prompt)
        stale = _check_samples(samples, ctx.rollout.weight_version, step, cfg.rollout_temperature,
                               max_staleness=cfg.max_staleness, policy=cfg.stale_samples)
        received = [s.trace for s in samples]  # the routing metrics' reference: the trace before any fault
        if cfg.inject_fault is not Fault.NONE and step == 0:
            samples = [_with_trace(s, corrupt_trace(s.trace, cfg.inject_fault)) for s in samples]
        if cfg.release_rollout_memory:  # colocated: the update gets the KV cache's memory
            ctx.rollout.release_memory()
    with timer("reward"):  # 2
        texts = [ctx.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        if ctx.env_factory is not None:  # episodes: the environment gave each its reward
            rewards = torch.tensor([float(s.reward) for s in samples], dtype=torch.float32)
        else:
            rewards = torch.tensor(ctx.prompts.rewards(texts, [items[i // cfg.n_samples_per_prompt]
                                                               for i in range(len(samples))]), dtype=torch.float32)
    mbs = _micro_batches(ctx, samples, [0.0] * len(samples), log_probs=True)
    with timer("ref_logprobs"):  # 3
        ref_logp = _ref_logprobs(ctx, mbs) if ctx.ref_model is not None else None
    ci_diff = _ci_compare_reference(ctx, mbs, ref_logp) if ref_logp is not None and step == 0 and cfg.replay.strict \
        else None
    with timer("old_logprobs"):  # 4
        used, live = RoutingMismatch(), RoutingMismatch()
        train_logp, recorded = _old_logprobs(ctx, mbs, received, used, live)
    old_logp = train_logp if cfg.old_logprobs is LogprobSource.TRAIN else _rollout_logprobs(mbs)
    shaped = rewards - cfg.kl_coef * _per_sample_kl(old_logp, ref_logp, len(samples)) if cfg.kl_coef else rewards
    adv_PN = group_advantages(shaped.view(-1, cfg.n_samples_per_prompt), cfg.loss.advantage_estimator,
                              std_normalization=cfg.grpo_std_normalization,
                              sum_over_ranks=lambda v: sum_over_ranks(v, ctx.env))  # REINFORCE++: the global std
    if cfg.stale_samples is StalePolicy.DROP:  # out of the policy gradient; groups and rank shares keep their shape
        adv_PN = adv_PN.flatten().masked_fill(torch.tensor(stale), 0.0).view_as(adv_PN)
    with timer("update"):  # 5
        update = _update(ctx, samples, adv_PN.flatten().tolist(), old_logp, ref_logp, recorded, received, used)
    # raises above the threshold; the verdict sums every rank's counters, the evidence lines are this rank's
    summary = ctx.check.summary(over_ranks=ctx.env.distributed) if ctx.check is not None else None
    with timer("weight_sync"):  # 6
        if cfg.release_rollout_memory:
            ctx.rollout.resume_memory()
        ctx.rollout.update_weights(ctx.model, version=step + 1)
    metrics = {"step": step, "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
               "solved_frac": (rewards >= 1.0).float().mean().item(),  # full-credit samples (exact match)
               "response_len_mean": sum(len(s.response_ids) for s in samples) / len(samples),
               "lr": ctx.scheduler.get_last_lr()[0], "weight_version": step + 1,
               "stale_frac": sum(stale) / len(stale)}
    if ctx.env_factory is not None:  # episodes: model responses per episode
        metrics["turns_mean"] = sum(s.metadata["turns"] for s in samples) / len(samples)
    rollout_logp = _rollout_logprobs(mbs)  # per sample: micro-batches may hold samples in another order
    metrics |= train_rollout_metrics(torch.cat([train_logp[i] for i in range(len(samples))]),
                                     torch.cat([rollout_logp[i] for i in range(len(samples))]))
    metrics |= used.metrics("routing_mismatch") | live.metrics("router_live_mismatch")
    metrics |= timer.metrics(update_tokens=sum(mb.num_tokens for mb in mbs if not mb.is_padding))
    if ci_diff is not None:
        metrics["ci_ref_logprob_max_abs_diff"] = ci_diff
    metrics = mean_over_ranks(metrics, ctx.env)  # the update's metrics are global already
    if ctx.env.distributed:  # every rank's tokens, over the slowest rank's update time
        metrics["update_tokens_per_s"] *= ctx.env.world_size
    return metrics | update | _check_metrics(summary)


# --- stages -------------------------------------------------------------------------------------------------------
def _micro_batches(ctx: StepContext, samples: list[Sample], advantages: list[float], indices=None, traces=None, *,
                   log_probs: bool = False):
    """The samples' micro-batches on the device; `log_probs`: for a forward without backward (reference, old-policy
    log-probs), under `--log-probs-max-tokens-per-mb` when it is set."""
    cfg = ctx.cfg
    use_traces = cfg.replay.kind is not ReplayKind.NONE or traces is not None
    if cfg.layout is Layout.AUTO:  # the Trainer resolves it; a caller of a stage alone gets it resolved here, once
        plan = plan_layout(ctx.model, Layout.AUTO, log=False)
        ctx.cfg = cfg = replace(cfg, layout=plan.layout)
        ctx.layer_masks = ctx.layer_masks if ctx.layer_masks is not None else plan.layer_masks
    size, budget, flag = cfg.micro_batch_size, cfg.max_tokens_per_mb, "--max-tokens-per-mb"
    if log_probs and cfg.log_probs_max_tokens_per_mb is not None:
        size, budget, flag = None, cfg.log_probs_max_tokens_per_mb, "--log-probs-max-tokens-per-mb"
    mbs = [mb.to(cfg.device) for mb in make_micro_batches(
        samples, advantages=advantages, layout=cfg.layout, micro_batch_size=size, max_tokens=budget,
        pad_id=ctx.pad_id, sample_indices=indices, layer_masks=ctx.layer_masks, budget_name=flag,
        by_length=budget is not None,  # a token budget groups like lengths: fewer, less padded micro-batches
        traces=traces if traces is not None else (None if use_traces else [None] * len(samples)))]
    # ranks run the same number of forwards (FSDP collectives): the short ones repeat their last, as padding
    missing = pad_count(len(mbs), ctx.env) - len(mbs)
    return mbs + [replace(mbs[-1], is_padding=True)] * missing


@torch.no_grad()
def _ref_logprobs(ctx: StepContext, mbs: list[MicroBatch]) -> dict[int, torch.Tensor]:
    out = {}
    for mb in mbs:  # the reference model has no replay attached: it routes freely
        _scatter(out, mb, _logprobs(ctx, mb, ctx.ref_model(**mb.model_inputs()).logits)[0])
    return out


@torch.no_grad()
def _old_logprobs(ctx: StepContext, mbs: list[MicroBatch], received, used: RoutingMismatch, live: RoutingMismatch):
    """Training-forward log-probs per sample before the update, and R2's recordings (per sample, so that the update
    may lay samples out differently and each still replays its own routing). Adds to `used` the experts each sample
    really used (read at the experts' inputs) and to `live` the live router's choice, both against `received`.
    The routing comparisons run on the host after the last forward is queued: no device sync per micro-batch."""
    cfg, replay = ctx.cfg, ctx.replay
    logp, recorded, readings = {}, {}, []
    for mb in mbs:
        live_rec = Recording(replay.num_layers, replay.num_experts) if cfg.replay.kind is ReplayKind.R3 else None
        with ctx.tap.reading() as tapped, (replay.replay(mb.replay, live=live_rec) if live_rec is not None
                                           else replay.record()) as rec:
            logits_BSV = ctx.model(**mb.model_inputs()).logits
        _scatter(logp, mb, _logprobs(ctx, mb, logits_BSV)[0])
        if mb.is_padding:
            continue
        # without replay (and in R2's recording forward) the live router's choice is what the experts used
        live_ids = None if live_rec is None else _stacked(live_rec.ids_per_layer)
        E = replay.num_experts
        readings.append((mb, _to_host(tapped.stacked(), E), None if live_ids is None else _to_host(live_ids, E),
                         _to_host(_stacked(rec.ids_per_layer), E) if cfg.replay.kind is ReplayKind.R2 else None))
    _host_ready(ctx.cfg.device)
    for mb, used_ids, live_ids, recorded_ids in readings:
        used_traces = mb.split_routing(used_ids, replay.num_experts)
        reference = [received[i] for i in mb.sample_indices]
        used.add(reference, used_traces)
        live.add(reference, used_traces if live_ids is None else mb.split_routing(live_ids, replay.num_experts))
        if recorded_ids is not None:
            for i, trace in zip(mb.sample_indices, mb.split_routing(recorded_ids, replay.num_experts), strict=True):
                recorded[i] = trace
    return logp, recorded


def _update(ctx: StepContext, samples, advantages, old_logp, ref_logp, recorded, received,
            used: RoutingMismatch) -> dict:
    """Optimizer steps over the rollout's samples, each accumulated over micro-batches under replay; adds to `used`
    the experts each first-pass forward really used, against `received`.

    One host sync per optimizer step (the gradient norm's finiteness): the metrics add up on the device, the experts
    read at each forward are copied to the host behind its kernels and compared while the optimizer step runs.

    Data parallel: this rank's share of each optimizer step's samples; denominators are global token and sample
    counts and the loss is scaled by the world size (FSDP2 averages gradients), so the gradient is the global one."""
    cfg, model, env = ctx.cfg, ctx.model, ctx.env
    totals: dict[str, float] = defaultdict(float)
    computed = [0, 0]  # tokens, positions computed (padded: samples x longest)
    per_opt = cfg.samples_per_optimizer_step // env.world_size
    if ctx.tap is None:  # rl_step builds it on the first step; a caller of the update alone gets one here
        ctx.tap = ExpertsTap(model)
    model.train()
    for start in range(0, len(samples), per_opt):
        idx = list(range(start, start + per_opt))
        traces = [recorded[i] for i in idx] if cfg.replay.kind is ReplayKind.R2 else None
        mbs = _micro_batches(ctx, [samples[i] for i in idx], [advantages[i] for i in idx], idx, traces)
        n_tok = int(sum_over_ranks([sum(mb.num_response_tokens for mb in mbs if not mb.is_padding)], env)[0])
        n_seq = per_opt * env.world_size
        ctx.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}  # this optimizer step's metrics, on the device
        readings = []
        # FSDP2 reduce-scatters each micro-batch's gradients into the shards (deferring the sync to the last one
        # would hold a full unsharded gradient per rank)
        for mb in mbs:
            with replay_mode(ctx, mb), ctx.tap.reading() as tapped:
                logp_T, entropy_T = _logprobs(ctx, mb, model(**mb.model_inputs()).logits,
                                              entropy="grad" if cfg.loss.entropy_coef else "detached")
                loss, m = policy_loss(
                    logp_T=logp_T, old_logp_T=_gather(old_logp, mb), advantages_T=mb.advantages_T,
                    seq_idx_T=mb.seq_idx_T, num_seqs=mb.num_seqs, cfg=cfg.loss, num_tokens_total=n_tok,
                    num_seqs_total=n_seq, rollout_logp_T=mb.rollout_logp_T,
                    ref_logp_T=_gather(ref_logp, mb) if ref_logp is not None else None, entropy_T=entropy_T)
                weight = 0.0 if mb.is_padding else float(env.world_size)
                (loss * weight).backward()  # the checkpoint recompute replays here (replay_backward)
            if mb.is_padding:
                continue
            readings.append((mb, _to_host(tapped.stacked(), ctx.replay.num_experts)))
            computed[0] += mb.num_tokens
            computed[1] += mb.computed_tokens
            for k, v in (m | {"loss": loss}).items():
                sums[k] = sums[k] + v.detach() if k in sums else v.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        keys = sorted(sums)
        values = torch.stack([grad_norm.float().reshape(()), *(sums[k].float().reshape(()) for k in keys)]).tolist()
        if not math.isfinite(values[0]):  # the one sync of this optimizer step; the tap's copies are done by now
            raise FloatingPointError(f"non-finite gradient norm {values[0]} at optimizer step {start // per_opt}")
        ctx.optimizer.step()
        ctx.scheduler.step()
        for k, v in zip(keys, values[1:], strict=True):
            totals[k] += v
        totals["grad_norm"] += values[0] / env.world_size  # the same on every rank: summed below
        for mb, ids in readings:  # host work while the optimizer's kernels run (tolist above waited for the copies)
            used.add([received[i] for i in mb.sample_indices], mb.split_routing(ids, ctx.replay.num_experts))
    model.eval()
    n_opt = len(samples) // per_opt
    keys = sorted(totals)  # each rank's terms are normalized by the global counts: their sum is the global value
    *sums_global, tokens, positions = sum_over_ranks([*(totals[k] for k in keys), *computed], env)
    summed = dict(zip(keys, sums_global, strict=True))
    return {k: v / n_opt for k, v in summed.items()} | {"optimizer_steps": n_opt,
                                                        "pad_frac": 1.0 - tokens / max(positions, 1)}


def replay_mode(ctx: StepContext, mb: MicroBatch):
    """The update's routing: the rollout trace (R3), the old-policy recording (R2), or the live router."""
    if ctx.cfg.replay.kind is ReplayKind.NONE:
        return ctx.replay.off()
    return ctx.replay.replay(mb.replay)


# --- helpers ------------------------------------------------------------------------------------------------------
def _encode(ctx: StepContext, prompt: str) -> list[int]:
    return encode_prompt(ctx.tokenizer, prompt, chat_template=ctx.cfg.apply_chat_template)


def _episodes(ctx: StepContext, items, step: int) -> list[Sample]:
    """`n_samples_per_prompt` episodes per item (a group shares its environment's setup), run to the end."""
    from r3rl.episodes import run_episodes

    n = ctx.cfg.n_samples_per_prompt
    envs = [ctx.env_factory(items[i // n], ctx.tokenizer) for i in range(len(items) * n)]
    return run_episodes(ctx.rollout, envs, _sampling(ctx, step), max_turns=ctx.max_turns,
                        mixed_versions=ctx.cfg.stale_samples.value)


def _sampling(ctx: StepContext, step: int) -> SamplingParams:
    cfg = ctx.cfg
    return SamplingParams(max_new_tokens=cfg.rollout_max_response_len, temperature=cfg.rollout_temperature,
                          top_p=cfg.rollout_top_p, stop_token_ids=list(ctx.stop_token_ids),
                          seed=(cfg.seed * 1_000_003 + step * ctx.env.world_size + ctx.env.rank) % 2**31)


def _check_samples(samples: list[Sample], version: int, step: int, temperature: float, *, max_staleness: int = 0,
                   policy: StalePolicy = StalePolicy.ERROR) -> list[bool]:
    """The rollout used the weights of the last sync (up to `max_staleness` versions behind), and its log-probs are
    of the distribution the trainer scores. Returns which samples are stale; `policy` ERROR raises on the first."""
    stale = [version - s.weight_version_start > max_staleness or s.weight_version > version
             or s.metadata.get("mixed_weight_versions", False) for s in samples]  # an episode over two versions
    if any(stale) and policy is StalePolicy.ERROR:
        first = stale.index(True)
        s = samples[first]
        raise RuntimeError(f"step {step}: {sum(stale)} sample(s) were generated with weight version "
                           f"{s.weight_version_start}..{s.weight_version}, expected {version} (the weight sync did not "
                           f"reach the rollout engine); first: sample {first} (--stale-samples keep|drop to train on "
                           "or drop them instead)")
    odd = [i for i, s in enumerate(samples) if not math.isclose(s.logprob_temperature, temperature, rel_tol=1e-6)]
    if odd:
        raise ValueError(f"step {step}: sample {odd[0]} carries rollout log-probs at temperature "
                         f"{samples[odd[0]].logprob_temperature}, the trainer scores temperature {temperature}: ask "
                         "the backend for log-probs at the sampling temperature (logprobs_at_temperature)")
    return stale


def _with_trace(s: Sample, trace: RoutingTrace) -> Sample:
    return replace(s, trace=trace)


def _rollout_logprobs(mbs: list[MicroBatch]) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    for mb in mbs:
        _scatter(out, mb, mb.rollout_logp_T)
    return out


def _scatter(out: dict[int, torch.Tensor], mb: MicroBatch, values_T: torch.Tensor) -> None:
    if mb.is_padding:
        return
    for i, values in zip(mb.sample_indices, values_T.detach().split(mb.target_counts), strict=True):
        out[i] = values  # split by host-known counts: no device sync (a boolean mask per sample costs one each)


def _logprobs(ctx: StepContext, mb: MicroBatch, logits_BSV: torch.Tensor, entropy: str | None = None):
    """The head of every training forward: log-probs at the rollout temperature (and the entropy), compiled under
    `--compile`."""
    head = compiled(response_logprobs) if ctx.cfg.compile else response_logprobs
    return head(logits_BSV, mb.target_pos_T, mb.target_ids_T, ctx.cfg.rollout_temperature, entropy)


def _stacked(ids_per_layer: list[list[torch.Tensor]]) -> torch.Tensor:
    """`[N, L, K]` from per-layer call lists (a Recording's), on their device."""
    return torch.stack([torch.cat(calls) for calls in ids_per_layer], dim=1)


def _to_host(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert ids on the host in the trace's compact dtype (uint8 below 255 experts, else int16: 8x less than int64
    to hold for a whole rollout), the copy queued behind the kernels that produce them (pinned, non-blocking) on
    CUDA: valid only after `_host_ready` or another sync of that device's stream."""
    ids = ids.to(_COMPACT[compact_dtype(num_experts).name])
    if ids.device.type != "cuda":
        return ids.cpu()
    out = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
    return out.copy_(ids, non_blocking=True)


_COMPACT = {"uint8": torch.uint8, "int16": torch.int16}


def _host_ready(device) -> None:
    """Wait for the copies `_to_host` queued on `device`'s current stream (one sync, after the micro-batch loop)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _gather(per_sample: dict[int, torch.Tensor], mb: MicroBatch) -> torch.Tensor:
    return torch.cat([per_sample[i] for i in mb.sample_indices])


def _per_sample_kl(old_logp, ref_logp, n: int) -> torch.Tensor:
    """Each sample's summed k1 KL(actor || reference), for the reward penalty (--kl-coef)."""
    return torch.tensor([kl_penalty(old_logp[i], ref_logp[i], KLType.K1).sum().item() for i in range(n)])


def _check_metrics(summary) -> dict:
    if summary is None:
        return {}
    out = {"r3_check_tokens": summary.tokens_checked, "r3_check_mismatch": summary.zero_overlap,
           "r3_check_passed": summary.passed}
    for stage, v in summary.to_dict()["stages"].items():
        out[f"r3_check_{stage}_tokens"] = v["tokens"]
        out[f"r3_check_{stage}_calls"] = v["calls"]
    return out


@torch.no_grad()
def _ci_compare_reference(ctx: StepContext, mbs: list[MicroBatch], ref_logp) -> float:
    """--ci-test, step 0: actor and reference hold the same weights; under the same (free) routing their log-probs
    agree within `ci_logprob_tol` (exact equality trips on routine float differences)."""
    worst = 0.0
    for mb in mbs:
        with ctx.replay.off():
            logp = _logprobs(ctx, mb, ctx.model(**mb.model_inputs()).logits)[0]
        worst = max(worst, (logp - _gather(ref_logp, mb)).abs().max().item())
    if worst > ctx.cfg.ci_logprob_tol:
        raise AssertionError(f"ci-test: step-0 actor and reference log-probs differ under the same routing: max |diff| "
                             f"{worst:.3g} > {ctx.cfg.ci_logprob_tol}")
    return worst


class _Timer:
    def __init__(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()  # note: a sync point, once per stage, so stage times are real
        self.times[name] = time.perf_counter() - t0

    def metrics(self, *, update_tokens: int) -> dict:
        out = {f"time/{k}": v for k, v in self.times.items()} | {"time/step": sum(self.times.values())}
        out["update_tokens_per_s"] = update_tokens / max(self.times.get("update", 0.0), 1e-9)
        return out

