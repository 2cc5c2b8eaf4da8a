"""Where the training update's time goes on a GPU, and what each lever buys, side by side in one process.

    python bench/profile_train_step.py --preset probe-qwen3-moe --out profile.json

Builds the same trainer and batch as `bench_train_step.py` (bf16, R3 + check on), then
1. times the update (forward + backward with activation checkpointing, R3 + check) for each lever, interleaved
   round by round (medians): layout (packed rows or padded), samples per micro-batch, attention implementation
   (`sdpa` over the packed row's dense block-diagonal mask, O(T^2) in the row's length, against
   `flex_attention`'s document mask, which skips the masked blocks), and the experts path with or without r3rl's
   regional compile (`grouped_mm`, `lean`, each optionally `+compile`: `r3rl train --compile`, the training head
   included); a lever is a spec `layout/samples per micro-batch/attention[/experts[+compile]]`;
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
    # "gpu_kernel_impl_nocast" is ATen's generic (strided / broadcast) elementwise kernel, not a cast: before this
    # line, "cast" matched it and the 2026-12-07 session-3 profile booked mul/add/silu on strided views as copies
    low = name.lower().replace("gpu_kernel_impl_nocast", "gpu_kernel_impl")
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
    # the same GPU time by the aten op that launched it (self time: an op's own kernels, not its children's)
    ops = []
    for avg in prof.key_averages():
        s = getattr(avg, "self_device_time_total", None)
        s = avg.self_cuda_time_total if s is None else s
        if s > 0:
            ops.append({"op": avg.key[:90], "s": s / 1e6, "calls": avg.count})
    ops.sort(key=lambda o: -o["s"])
    return {"wall_s": wall, "gpu_kernel_s": gpu_busy, "gpu_busy_frac": gpu_busy / wall,
            "by_category_s": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "top_ops": ops[:30], "top_kernels": [{"name": n, "s": t, "calls": counts[n]} for n, t in top]}


def lean_grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """An experiment (lever "lean"): transformers' grouped_mm experts path without what a single-GPU, gated, bias-free
    layer does not need: no expert-parallel sentinel masks (three full copies forward and three in backward on
    transformers 5.17), the routing weight applied to the [S, I] activation before the down projection instead of the
    [S, H] output (I < H). Same grouped GEMMs; falls back to transformers' path for biased / ungated experts."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    if getattr(self, "has_bias", False) or not getattr(self, "has_gate", True) \
            or getattr(self, "is_transposed", False) or not getattr(self, "is_concatenated", True) \
            or getattr(self, "has_post_expert_norm", False):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    num_tokens, k = top_k_index.shape
    expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))
    x_g = hidden_states[perm // k]
    counts = torch.zeros(self.num_experts, dtype=torch.int32, device=expert_ids_g.device).scatter_add_(
        0, expert_ids_g, torch.ones_like(expert_ids_g, dtype=torch.int32))  # static size (bincount's is data-dependent)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gate_up = torch._grouped_mm(x_g, self.gate_up_proj.transpose(-2, -1), offs=offsets)
    h = self._apply_gate(gate_up) * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(gate_up.dtype)
    y_g = torch._grouped_mm(h, self.down_proj.transpose(-2, -1), offs=offsets)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    return y_g[inv_perm].view(num_tokens, k, -1).sum(dim=1).to(hidden_states.dtype)


def _set_experts(model, impl: str) -> None:
    """grouped_mm | batched_mm | lean, each with an optional "+compile": r3rl's regional compile (`--compile`:
    attention, norms and experts of every decoder layer; routers, where replay patches in, and hooks eager)."""
    from r3rl.train.regional_compile import compile_regions, compiled_regions, uncompile_regions

    impl, _, compiled = impl.partition("+")
    if compiled and not compiled_regions(model):
        compile_regions(model)
    elif not compiled:
        uncompile_regions(model)
    if impl == "lean":
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        ALL_EXPERTS_FUNCTIONS.register("r3rl_lean_grouped_mm", lean_grouped_mm_experts_forward)
        impl = "r3rl_lean_grouped_mm"
    model.set_experts_implementation(impl)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="probe-qwen3-moe")
    ap.add_argument("--rollout-batch-size", type=int, default=16)
    ap.add_argument("--n-samples-per-prompt", type=int, default=8)
    ap.add_argument("--response-len", type=int, default=128)
    ap.add_argument("--variants", default="padded/32/sdpa,padded/32/sdpa/grouped_mm+compile,padded/32/sdpa/lean,"
                    "padded/32/sdpa/lean+compile,padded/64/sdpa/grouped_mm+compile,"
                    "packed/32/flex_attention/grouped_mm+compile",
                    help="layout/samples per micro-batch/attention[/experts[+compile]], comma-separated; experts: "
                    "grouped_mm (default), batched_mm, or lean (this file's experiment; compiles in bf16 only: "
                    "torch's fake-tensor rule for _grouped_mm); +compile: r3rl's regional compile")
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
        layout, mbsize, attn, *experts = spec.split("/")
        ctx.cfg.layout, ctx.cfg.micro_batch_size = Layout(layout), int(mbsize)
        variants[spec] = (_micro_batches(ctx, samples, [1.0] * len(samples)), attn,
                          experts[0] if experts else "grouped_mm")
    ctx.cfg.layout, ctx.cfg.micro_batch_size = Layout.PACKED, 32
    times: dict[str, list[float]] = {k: [] for k in variants}
    errors: dict[str, str] = {}
    for _ in range(args.rounds + 1):
        for name, (mbs, attn, experts) in variants.items():
            if name in errors:
                continue
            try:
                model.set_attn_implementation(attn)
                _set_experts(model, experts)
                ctx.cfg.compile = experts.endswith("+compile")  # the training head too
                times[name].append(_update_time(ctx, mbs, "r3+check"))
            except Exception as e:  # a lever this stack cannot run is reported, not fatal
                errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
        ctx.check.summary(raise_on_fail=False)
    model.set_attn_implementation("sdpa")
    _set_experts(model, "grouped_mm")
    tokens = sum(mb.num_tokens for mb in variants[next(iter(variants))][0])
    peak = 989e12
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"card": card, "preset": args.preset, "tokens": tokens, "active_params": active,
              "levers": {k: {"median_s": statistics.median(v[1:]), "mfu": 8 * active * tokens
                             / statistics.median(v[1:]) / peak} for k, v in times.items() if len(v) > 1},
              "errors": errors,  # and the compile counters: a lever that recompiles every round shows here
              "dynamo_stats": {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if k in ("stats",)}}
    ok = {k: v["median_s"] for k, v in result["levers"].items()}
    for name in dict.fromkeys([next(iter(variants)), min(ok, key=ok.get)] if ok else []):  # baseline and fastest
        model.set_attn_implementation(variants[name][1])
        _set_experts(model, variants[name][2])
        ctx.cfg.compile = variants[name][2].endswith("+compile")
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
