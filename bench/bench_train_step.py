"""One RL step of `r3rl train` on a GPU: the time of each stage, update tokens/s and model FLOPs utilisation, and the
update's cost under R3 and R3 + check against no replay, measured side by side on the same batch in one process.

    python bench/bench_train_step.py --preset probe-qwen3-moe --rounds 7 --out train_step.json

The update (forward + backward with activation checkpointing over the step's micro-batches, optimizer step
excluded) runs for the same samples under three routings, interleaved round by round so that clock and thermal
drift hit all three alike: `off` (live router, no replay), `r3` (replay the rollout trace) and `r3+check`. Reported:
median and range per mode, and the ratios of the medians. Targets: R3 <= 1.02x and R3 + check <= 1.05x of `off`.
A fourth mode, `update`, times `r3rl train`'s own update function on the same samples (R3 + check, the policy loss,
the experts tap and routing metrics, gradient clipping and the AdamW step): the number a run sees.
MFU counts 6 * active params * tokens for forward + backward plus 2 * active params * tokens for the recompute,
against the card's dense bf16 peak (H200: 989 TFLOP/s). `--compile`: r3rl's regional compile (`r3rl train
--compile`), compiled during the first whole step (its stage times include the compile) and warmed by the first round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from r3rl.config import ReplayConfig
from r3rl.train.config import TrainConfig
from r3rl.train.metrics import RoutingMismatch
from r3rl.train.step import _logprobs, _micro_batches, _rollout_logprobs, _update, rl_step
from r3rl.train.trainer import Trainer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the recipe, no numbers


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="probe-qwen3-moe")
    ap.add_argument("--rollout-batch-size", type=int, default=16)
    ap.add_argument("--n-samples-per-prompt", type=int, default=8)
    ap.add_argument("--response-len", type=int, default=128)
    ap.add_argument("--micro-batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--compile", action="store_true", help="regional torch.compile (r3rl train --compile)")
    ap.add_argument("--layout", default="auto", choices=["auto", "packed", "padded"])
    ap.add_argument("--optimizer", default="auto", choices=["auto", "foreach", "fused"],
                    help="AdamW implementation (auto: torch's default, the trainer's)")
    ap.add_argument("--profile-update", action="store_true",
                    help="also profile one `update` (r3rl train's update) and report its top ops by GPU time")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    trainer, ctx, samples, stages = build(args.preset, args.rollout_batch_size, args.n_samples_per_prompt,
                                          args.response_len, micro_batch_size=args.micro_batch_size,
                                          compile=args.compile, layout=args.layout,
                                          optimizer_fused={"auto": None, "foreach": False, "fused": True}[
                                              args.optimizer])
    mbs = _micro_batches(ctx, samples, [1.0] * len(samples))
    tokens = sum(mb.num_tokens for mb in mbs)
    # the `update` mode runs the real AdamW step: at lr 0 it does all the work and leaves the weights (and so the
    # other modes' routing) as they are from round to round
    ctx.scheduler.base_lrs = [0.0] * len(ctx.scheduler.base_lrs)
    for group in ctx.optimizer.param_groups:
        group["lr"] = 0.0
    check = ctx.check
    times: dict[str, list[float]] = {"off": [], "r3": [], "r3+check": [], "update": []}
    for _ in range(args.rounds + 1):  # the first round warms up (allocator, autotuning) and is dropped
        for mode in times:
            ctx.replay.check = check if mode in ("r3+check", "update") else None
            times[mode].append(_train_update_time(ctx, samples) if mode == "update" else _update_time(ctx, mbs, mode))
        if check is not None:
            check.summary(raise_on_fail=False)
    times = {k: v[1:] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    active = _active_params(trainer.model)
    flops = 8 * active * tokens  # fwd 2 + bwd 4 + recompute 2, per active parameter and token
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    result = {
        "card": name, "preset": args.preset, "compile": args.compile, "layout": ctx.cfg.layout.value,
        "tokens_per_update": tokens, "micro_batches": len(mbs),
        "stage_times_s": {k: v for k, v in stages.items() if k.startswith("time/")},  # the second step's
        "first_step_stage_times_s": {k[len("first_step_"):]: v for k, v in stages.items()
                                     if k.startswith("first_step_")},
        "update_median_s": med, "update_range_s": {k: [min(v), max(v)] for k, v in times.items()},
        "ratio_r3": med["r3"] / med["off"], "ratio_r3_check": med["r3+check"] / med["off"],
        "update_tokens_per_s": tokens / med["r3"], "active_params": active,
        "mfu_r3": flops / med["r3"] / peak if peak else None,
        "mfu_r3_check": flops / med["r3+check"] / peak if peak else None,
        "mfu_train_update": flops / med["update"] / peak if peak else None,
        "optimizer": type(ctx.optimizer).__name__ + (" fused" if ctx.optimizer.defaults.get("fused") else ""),
    }
    if args.profile_update:
        result["profile_update"] = _profile_update(ctx, samples)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


def build(preset: str, rollout_batch_size: int, n_samples_per_prompt: int, response_len: int, *,
          micro_batch_size: int, compile: bool = False, layout: str = "auto", optimizer_fused: bool | None = None):
    """The trainer (bf16, R3 + check) after two whole RL steps, and the samples of a third rollout."""
    from r3rl.train.data import Layout

    cfg = TrainConfig(compile=compile, layout=Layout(layout), optimizer_fused=optimizer_fused,
        replay=ReplayConfig(use_rollout_routing_replay=True, enable_r3_correctness_check=True), preset=preset,
        device=DEVICE, dtype="bfloat16" if DEVICE == "cuda" else "float32", sft_steps=0, num_rollout=2,
        rollout_batch_size=rollout_batch_size,
        n_samples_per_prompt=n_samples_per_prompt, rollout_max_response_len=response_len,
        micro_batch_size=micro_batch_size, progress=False, run_dir="/tmp/r3rl-bench-train")
    trainer = Trainer(cfg)
    ctx = trainer.ctx
    first = rl_step(ctx, 0)  # whole steps: the first pays allocation, autotuning and (--compile) the compile
    stages = rl_step(ctx, 1) | {f"first_step_{k}": v for k, v in first.items() if k.startswith("time/")}
    samples = ctx.rollout.generate([[65 + i % 26] * 8 for i in range(cfg.rollout_batch_size)],
                                   _sampling(cfg), n_samples_per_prompt=cfg.n_samples_per_prompt)
    return trainer, ctx, samples, stages


def _update_time(ctx, mbs, mode: str) -> float:
    model = ctx.model
    model.train()
    _sync()
    t0 = time.perf_counter()
    for mb in mbs:
        routing = ctx.replay.off() if mode == "off" else ctx.replay.replay(mb.replay)
        with routing:
            logp = _logprobs(ctx, mb, model(**mb.model_inputs()).logits)[0]
            (-(logp * mb.advantages_T).sum() / 1e4).backward()
    _sync()
    elapsed = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    model.eval()
    return elapsed


def _train_update_time(ctx, samples) -> float:
    """`r3rl train`'s update (step.py `_update`) on `samples`, R3 (+ check when attached), advantages +-1."""
    advantages = [1.0 if i % 2 else -1.0 for i in range(len(samples))]
    old_logp = _rollout_logprobs(_micro_batches(ctx, samples, advantages))
    received = [s.trace for s in samples]
    _sync()
    t0 = time.perf_counter()
    _update(ctx, samples, advantages, old_logp, None, {}, received, RoutingMismatch())
    _sync()
    return time.perf_counter() - t0


def _profile_update(ctx, samples) -> dict:
    """One `update` under torch.profiler: wall time, GPU kernel time, and the top aten ops by their own GPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = _train_update_time(ctx, samples)
    ops = []
    for avg in prof.key_averages():
        s = getattr(avg, "self_device_time_total", None)
        s = avg.self_cuda_time_total if s is None else s
        if s > 0:
            ops.append({"op": avg.key[:90], "s": s / 1e6, "calls": avg.count, "cpu_s": avg.self_cpu_time_total / 1e6})
    ops.sort(key=lambda o: -o["s"])
    return {"wall_s": wall, "gpu_kernel_s": sum(o["s"] for o in ops), "top_ops": ops[:30]}


def _active_params(model) -> int:
    """Parameters a token passes through: everything but the experts, plus top_k of each layer's experts."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    per_layer_experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    return total - experts + experts * cfg.num_experts_per_tok // per_layer_experts


def _sampling(cfg):
    from r3rl.rollout.engine.messages import SamplingParams

    return SamplingParams(max_new_tokens=cfg.rollout_max_response_len, temperature=1.0, seed=1)


if __name__ == "__main__":
    main()
