"""Micro-benchmark: the fused MoE Triton kernels (`r3rl.rollout.model.fused_moe`) vs the engine's sorted grouped_mm path
(`MoEBlock._experts_sorted`) on one MoE layer, both captured in a CUDA graph as the engine runs them.

    python bench/bench_fused_moe.py --out fused_moe.json        # GPU; probe shape: hidden 2048, 128 experts, top-8,
                                                               # I 768, bf16, 32 and 256 decode tokens
    python bench/bench_fused_moe.py --preset probe-gpt-oss      # GPT-OSS experts (hidden 2880, 128 experts, top-4,
                                                               # I 2880, biases, clamped GLU, bf16 gate weights)

Routing: each token's top-k of uniform random logits (K distinct experts). Per token count it prints the time per
layer call of each path (median of --rounds graph replays of --reps calls each), the bytes of the experts the batch
routed to (each read once at best) over that time, as a fraction of the measured device-to-device copy bandwidth,
and each path's max error against a float32 computation from the same bf16 weights, and the fraction of its outputs
bitwise equal to a torch emulation of the fused kernels' rounding (HF's rounding of the weighted sum; only float32
accumulation order differs from it). With --sweep, a few tile configurations of the fused kernels are timed and the
best one is reported with the default's. --preset takes the expert shape and activation of an `r3rl.models.presets`
preset (its real model's MoE layer for the probe presets).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from r3rl.rollout.model import fused_moe as fm
from r3rl.rollout.model.moe import MoEBlock, MoEWeights


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="take hidden/experts/top-k/intermediate and the expert activation "
                   "from this preset (probe-gpt-oss, probe-qwen3-moe, ...); overrides the four shape flags")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--act", choices=[a.value for a in fm.ExpertAct], default=fm.ExpertAct.SWIGLU.value,
                   help="expert activation (gpt_oss: interleaved clamped GLU with expert biases)")
    p.add_argument("--gate-weights-dtype", choices=["auto", "float32", "hidden"], default="auto",
                   help="dtype of the routing weights: auto is the hidden dtype for GPT-OSS (HF's softmax keeps it) "
                   "and float32 otherwise")
    p.add_argument("--tokens", nargs="+", type=int, default=[32, 256])
    p.add_argument("--reps", type=int, default=20, help="calls per graph")
    p.add_argument("--rounds", type=int, default=15, help="graph replays timed")
    p.add_argument("--sweep", action="store_true", help="also time a few tile configurations")
    p.add_argument("--device", default="cuda", help="cpu runs the kernels only under TRITON_INTERPRET=1 (a dry run)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.preset:
        _apply_preset(args)
    return args


def _apply_preset(args: argparse.Namespace) -> None:
    """The preset's MoE layer shape and expert activation (GPT-OSS: its swiglu alpha and limit)."""
    from r3rl.models.presets import make_config

    cfg = make_config(args.preset)
    args.hidden = cfg.hidden_size
    args.experts = next(getattr(cfg, n) for n in ("num_experts", "num_local_experts", "n_routed_experts")
                        if getattr(cfg, n, None))
    args.top_k = cfg.num_experts_per_tok
    args.intermediate = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    gpt_oss = cfg.model_type == "gpt_oss"
    args.act = (fm.ExpertAct.GPT_OSS if gpt_oss else fm.ExpertAct.SWIGLU).value
    args.alpha = float(getattr(cfg, "swiglu_alpha", 1.702))
    args.limit = float(getattr(cfg, "swiglu_limit", 7.0))


SWEEP = [fm.FusedMoEConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s)
         for bm, bn, bk, w, s in [(16, 64, 128, 4, 4), (16, 32, 128, 4, 4), (16, 128, 128, 8, 3), (32, 64, 128, 4, 3),
                                  (32, 32, 128, 4, 3), (32, 128, 64, 4, 4)]]


def main() -> None:
    args = parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    H, E, K, n_inter = args.hidden, args.experts, args.top_k, args.intermediate
    act = fm.ExpertAct(args.act)
    gpt_oss = act is fm.ExpertAct.GPT_OSS
    alpha, limit = getattr(args, "alpha", 1.702), getattr(args, "limit", 7.0)
    auto_dtype = dtype if gpt_oss else torch.float32
    weights_dtype = {"auto": auto_dtype, "float32": torch.float32, "hidden": dtype}[args.gate_weights_dtype]
    g = torch.Generator(device=dev).manual_seed(0)
    gate_up_EIH = (torch.randn(E, 2 * n_inter, H, device=dev, generator=g) / H**0.5).to(dtype)
    down_EHI = (torch.randn(E, H, n_inter, device=dev, generator=g) / n_inter**0.5).to(dtype)
    biases = {}
    if gpt_oss:  # GPT-OSS experts carry both biases
        biases = dict(gate_up_bias_EI=(torch.randn(E, 2 * n_inter, device=dev, generator=g) * 0.1).to(dtype),
                      down_bias_EH=(torch.randn(E, H, device=dev, generator=g) * 0.1).to(dtype))
    moe_w = MoEWeights(moe_layer=0, router_spec=None, router_EH=None, router_bias_E=None, correction_E=None,
                       gate_up_EIH=gate_up_EIH, down_EHI=down_EHI, **biases)
    block = MoEBlock(num_experts=E, act=F.silu, expert_act=act, linear=F.linear, batch_invariant=False,
                     probe=moe_w, alpha=alpha, limit=limit, fused=False)  # the grouped_mm path: the baseline
    fused_kw = dict(biases, act=act, alpha=alpha, limit=limit)
    bandwidth = _copy_bandwidth(dev)
    expert_bytes = (3 * n_inter * H + (2 * n_inter + H) * gpt_oss) * gate_up_EIH.element_size()
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "args": vars(args),
              "copy_bandwidth_GBps": bandwidth / 1e9, "moe_kernel_baseline": block.kernel.value,
              "gate_weights_dtype": str(weights_dtype), "rows": []}
    for T in args.tokens:
        x_TH = torch.randn(T, H, device=dev, generator=g).to(dtype)
        weights_TK, ids_TK = torch.randn(T, E, device=dev, generator=g).softmax(-1).topk(K, dim=-1)
        weights_TK = (weights_TK / weights_TK.sum(-1, keepdim=True)).to(weights_dtype)
        want_TH = fm.fused_moe_reference(x_TH, ids_TK, weights_TK, gate_up_EIH, down_EHI, **fused_kw).float()
        emulated_TH = fm.fused_moe_reference(x_TH, ids_TK, weights_TK, gate_up_EIH, down_EHI, emulate_rounding=True,
                                             **fused_kw)
        paths = {block.kernel.value: partial(block._experts_sorted, x_TH, ids_TK, weights_TK, None, moe_w)}
        default = fm.default_config(T * K, E)
        configs = [default, dataclasses.replace(default, triton_align=not default.triton_align)]  # both alignments
        configs += [c for c in SWEEP if c != default] if args.sweep else []
        for cfg in configs:
            paths[_name(cfg)] = partial(fm.fused_moe, x_TH, ids_TK, weights_TK, gate_up_EIH, down_EHI, config=cfg,
                                        **fused_kw)
        active = int(torch.unique(ids_TK).numel())
        floor_us = active * expert_bytes / bandwidth * 1e6
        row = {"tokens": T, "active_experts": active, "floor_us": floor_us, "default_config": _name(default),
               "paths": {}}
        for name, fn in paths.items():
            try:
                out_TH = fn()
                err = (out_TH.float() - want_TH).abs().max().item()
                bitwise = (out_TH == emulated_TH).float().mean().item()
                us = _time_graph(fn, args.reps, args.rounds)
            except Exception as e:  # a tile config that does not compile/fit: report it, keep going
                row["paths"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                continue
            row["paths"][name] = {"us": us, "floor_fraction": floor_us / us, "max_abs_err": err,
                                  "GBps": active * expert_bytes / us / 1e3, "bitwise_vs_emulation": bitwise}
        fused = {k: v for k, v in row["paths"].items() if k.startswith("fused") and "us" in v}
        row["best_fused"] = min(fused, key=lambda k: fused[k]["us"]) if fused else None
        row["ref_scale"] = want_TH.abs().max().item()
        report["rows"].append(row)
    _print(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


def _time_graph(fn, reps: int, rounds: int) -> float:
    """Microseconds per call: `reps` calls captured in one CUDA graph, median over `rounds` replays."""
    for _ in range(2):
        fn()
    if not torch.cuda.is_available():  # CPU dry run: wall clock of single calls
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(times)


def _copy_bandwidth(dev: torch.device) -> float:
    if dev.type != "cuda":
        x, y = torch.empty(64 << 20, dtype=torch.uint8), torch.empty(64 << 20, dtype=torch.uint8)
        t = time.perf_counter()
        y.copy_(x)
        return 2 * x.numel() / (time.perf_counter() - t)
    x, y = torch.empty(1 << 30, dtype=torch.uint8, device=dev), torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    end.synchronize()
    return 2 * x.numel() * 10 / (start.elapsed_time(end) / 1e3)


def _name(cfg: fm.FusedMoEConfig) -> str:
    align = " triton-align" if cfg.triton_align else ""
    return f"fused m{cfg.block_m} n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}{align}"


def _print(report: dict) -> None:
    a = report["args"]
    preset = f"{a['preset']}: " if a["preset"] else ""
    print(f"\n## Fused MoE vs {report['moe_kernel_baseline']}, one layer ({preset}{report['device']}, {a['dtype']}, "
          f"{a['act']} experts, hidden {a['hidden']}, {a['experts']} experts, top-{a['top_k']}, I {a['intermediate']}, "
          f"gate weights {report['gate_weights_dtype']}; copy bandwidth {report['copy_bandwidth_GBps']:.0f} GB/s)\n")
    print("| tokens | active experts | path | µs/layer | GB/s of expert weights | % of floor | max abs err (scale) "
          "| bitwise = emulation |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        for name, p in r["paths"].items():
            if "error" in p:
                print(f"| {r['tokens']} | {r['active_experts']} | {name} | failed: {p['error']} | | | | |")
                continue
            tag = " (default)" if name == r["default_config"] else (" (best)" if name == r["best_fused"] else "")
            print(f"| {r['tokens']} | {r['active_experts']} | {name}{tag} | {p['us']:.1f} | {p['GBps']:.0f} | "
                  f"{100 * p['floor_fraction']:.0f}% | {p['max_abs_err']:.2e} ({r['ref_scale']:.2f}) | "
                  f"{100 * p['bitwise_vs_emulation']:.1f}% |")


if __name__ == "__main__":
    main()
