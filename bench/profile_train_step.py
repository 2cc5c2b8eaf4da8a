"""Where the training update's time goes on a GPU, and what each lever buys, side by side in one process.

    python bench/profile_train_step.py --preset probe-qwen3-moe --out profile.json

Builds the same trainer and batch as `bench_train_step.py` (bf16, R3 + check on), then
1. times the update (forward + backward with activation checkpointing, R3 + check) for each lever, interleaved
   round by round (medians): layout (packed rows or padded), samples per micro-batch, attention implementation
   (`sdpa` over the packed row's dense block-diagonal mask, O(T^2) in the row's length, against
   `flex_attention`'s document mask, which skips the masked blocks);
2. profiles one update of the baseline and of the fastest lever with `torch.profiler` and sums self CUDA time by
   category (experts GEMMs, attention, dense GEMMs, routing/top-k, log-softmax, elementwise, copies,
   communication), with the top kernels.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics

import torch
from bench_train_step import _active_params, _update_time, build

CATEGORIES = [  # first match wins; matched against the lower-cased kernel / op name
    ("attention", ("flash", "fmha", "attention", "sdpa", "flex", "efficient_attention", "cutlass_mem")),
    ("experts_grouped_gemm", ("grouped", "group_gemm", "_grouped_mm")),
    ("gemm", ("gemm", "matmul", "sm90_xmma", "cublas", "nvjet", "cutlass", "ampere_", "sm80_")),
    ("topk_sort_routing", ("topk", "sort", "radix", "scatter", "gather", "index", "bincount", "histc", "cumsum")),
    ("softmax_logsoftmax", ("softmax",)),
    ("reduce", ("reduce", "norm", "sum", "mean")),
    ("copy_cast", ("copy", "cast", "memcpy", "memset", "fill", "cat")),
    ("nccl", ("nccl",)),
    ("elementwise", ("elementwise", "vectorized", "mul", "add", "silu", "exp", "where")),
]


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def _profile(ctx, mbs) -> dict:
    from torch.profiler import ProfilerActivity, profile

    _update_time(ctx, mbs, "r3+check")  # warm
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = _update_time(ctx, mbs, "r3+check")
    by_cat: dict[str, float] = collections.defaultdict(float)
    kernels = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            by_cat[_category(ev.name)] += ev.device_time_total / 1e6 if hasattr(ev, "device_time_total") \
                else ev.cuda_time_total / 1e6
            kernels.append(ev)
    per_name: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    for ev in kernels:
        t = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        per_name[ev.name[:110]] += t / 1e6
        counts[ev.name[:110]] += 1
    gpu_busy = sum(by_cat.values())
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:25]
    return {"wall_s": wall, "gpu_kernel_s": gpu_busy, "gpu_busy_frac": gpu_busy / wall,
            "by_category_s": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": n, "s": t, "calls": counts[n]} for n, t in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="probe-qwen3-moe")
    ap.add_argument("--rollout-batch-size", type=int, default=16)
    ap.add_argument("--n-samples-per-prompt", type=int, default=8)
    ap.add_argument("--response-len", type=int, default=128)
    ap.add_argument("--variants", default="packed/32/sdpa,packed/32/flex_attention,packed/64/flex_attention,"
                    "packed/16/sdpa,padded/32/sdpa", help="layout/samples per micro-batch/attention, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    trainer, ctx, samples, _ = build(args.preset, args.rollout_batch_size, args.n_samples_per_prompt,
                                     args.response_len, micro_batch_size=32)
    from r3rl.train.step import _micro_batches

    model = trainer.model
    active = _active_params(model)
    from r3rl.train.data import Layout

    variants = {}
    for spec in args.variants.split(","):  # layout/samples per micro-batch/attention
        layout, mbsize, attn = spec.split("/")
        ctx.cfg.layout, ctx.cfg.micro_batch_size = Layout(layout), int(mbsize)
        variants[spec] = (_micro_batches(ctx, samples, [1.0] * len(samples)), attn)
    ctx.cfg.layout, ctx.cfg.micro_batch_size = Layout.PACKED, 32
    times: dict[str, list[float]] = {k: [] for k in variants}
    errors: dict[str, str] = {}
    for _ in range(args.rounds + 1):
        for name, (mbs, attn) in variants.items():
            if name in errors:
                continue
            try:
                model.set_attn_implementation(attn)
                times[name].append(_update_time(ctx, mbs, "r3+check"))
            except Exception as e:  # a lever this stack cannot run is reported, not fatal
                errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
        ctx.check.summary(raise_on_fail=False)
    model.set_attn_implementation("sdpa")
    tokens = sum(mb.num_tokens for mb in variants[next(iter(variants))][0])
    peak = 989e12
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"card": card, "preset": args.preset, "tokens": tokens, "active_params": active,
              "levers": {k: {"median_s": statistics.median(v[1:]), "mfu": 8 * active * tokens
                             / statistics.median(v[1:]) / peak} for k, v in times.items() if len(v) > 1},
              "errors": errors}
    ok = {k: v["median_s"] for k, v in result["levers"].items()}
    for name in dict.fromkeys([next(iter(variants)), min(ok, key=ok.get)] if ok else []):  # baseline and fastest
        model.set_attn_implementation(variants[name][1])
        try:
            result[f"profile {name}"] = _profile(ctx, variants[name][0])
        except Exception as e:
            result[f"profile {name}"] = f"{type(e).__name__}: {str(e)[:300]}"
        ctx.check.summary(raise_on_fail=False)
    model.set_attn_implementation("sdpa")
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
