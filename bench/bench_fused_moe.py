"""Micro-benchmark: the fused MoE Triton kernels (`r3rl.rollout.fused_moe`) vs the engine's sorted grouped_mm path
(`MoEBlock._experts_sorted`) on one MoE layer, both captured in a CUDA graph as the engine runs them.

    python bench/bench_fused_moe.py --out fused_moe.json        # GPU; probe shape: hidden 2048, 128 experts, top-8,
                                                               # I 768, bf16, 32 and 256 decode tokens

Routing: each token's top-k of uniform random logits (K distinct experts). Per token count it prints the time per
layer call of each path (median of --rounds graph replays of --reps calls each), the bytes of the experts the batch
routed to (each read once at best) over that time, as a fraction of the measured device-to-device copy bandwidth,
and each path's max error against a float32 computation from the same bf16 weights. With --sweep, a few tile
configurations of the fused kernels are timed and the best one is reported with the default's.
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

from r3rl.rollout import fused_moe as fm
from r3rl.rollout.moe import ExpertAct, MoEBlock, MoEWeights


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--tokens", nargs="+", type=int, default=[32, 256])
    p.add_argument("--reps", type=int, default=20, help="calls per graph")
    p.add_argument("--rounds", type=int, default=15, help="graph replays timed")
    p.add_argument("--sweep", action="store_true", help="also time a few tile configurations")
    p.add_argument("--device", default="cuda", help="cpu runs the kernels only under TRITON_INTERPRET=1 (a dry run)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None)
    return p.parse_args()


SWEEP = [fm.FusedMoEConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s)
         for bm, bn, bk, w, s in [(16, 64, 128, 4, 4), (16, 32, 128, 4, 4), (16, 128, 128, 8, 3), (32, 64, 128, 4, 3),
                                  (32, 32, 128, 4, 3), (32, 128, 64, 4, 4)]]


def main() -> None:
    args = parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    H, E, K, n_inter = args.hidden, args.experts, args.top_k, args.intermediate
    g = torch.Generator(device=dev).manual_seed(0)
    gate_up_EIH = (torch.randn(E, 2 * n_inter, H, device=dev, generator=g) / H**0.5).to(dtype)
    down_EHI = (torch.randn(E, H, n_inter, device=dev, generator=g) / n_inter**0.5).to(dtype)
    moe_w = MoEWeights(moe_layer=0, router_spec=None, router_EH=None, router_bias_E=None, correction_E=None,
                       gate_up_EIH=gate_up_EIH, down_EHI=down_EHI)
    block = MoEBlock(num_experts=E, act=F.silu, expert_act=ExpertAct.SWIGLU, linear=F.linear, batch_invariant=False,
                     probe=moe_w)
    bandwidth = _copy_bandwidth(dev)
    expert_bytes = 3 * n_inter * H * gate_up_EIH.element_size()
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "args": vars(args),
              "copy_bandwidth_GBps": bandwidth / 1e9, "moe_kernel_engine": block.kernel.value, "rows": []}
    for T in args.tokens:
        x_TH = torch.randn(T, H, device=dev, generator=g).to(dtype)
        weights_TK, ids_TK = torch.randn(T, E, device=dev, generator=g).softmax(-1).topk(K, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        want_TH = fm.fused_moe_reference(x_TH, ids_TK, weights_TK, gate_up_EIH, down_EHI).float()
        paths = {"grouped_mm": partial(block._experts_sorted, x_TH, ids_TK, weights_TK, None, moe_w)}
        default = fm.default_config(T * K, E)
        configs = [default, dataclasses.replace(default, triton_align=True)]
        configs += [c for c in SWEEP if c != default] if args.sweep else []
        for cfg in configs:
            paths[_name(cfg)] = partial(fm.fused_moe, x_TH, ids_TK, weights_TK, gate_up_EIH, down_EHI, config=cfg)
        active = int(torch.unique(ids_TK).numel())
        floor_us = active * expert_bytes / bandwidth * 1e6
        row = {"tokens": T, "active_experts": active, "floor_us": floor_us, "default_config": _name(default),
               "paths": {}}
        for name, fn in paths.items():
            try:
                err = (fn().float() - want_TH).abs().max().item()
                us = _time_graph(fn, args.reps, args.rounds)
            except Exception as e:  # a tile config that does not compile/fit: report it, keep going
                row["paths"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                continue
            row["paths"][name] = {"us": us, "floor_fraction": floor_us / us, "max_abs_err": err,
                                  "GBps": active * expert_bytes / us / 1e3}
        fused = {k: v for k, v in row["paths"].items() if k != "grouped_mm" and "us" in v}
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
    print(f"\n## Fused MoE vs grouped_mm, one layer ({report['device']}, {a['dtype']}, hidden {a['hidden']}, "
          f"{a['experts']} experts, top-{a['top_k']}, I {a['intermediate']}; copy bandwidth "
          f"{report['copy_bandwidth_GBps']:.0f} GB/s)\n")
    print("| tokens | active experts | path | µs/layer | GB/s of expert weights | % of floor | max abs err (scale) |")
    print("|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        for name, p in r["paths"].items():
            if "error" in p:
                print(f"| {r['tokens']} | {r['active_experts']} | {name} | failed: {p['error']} | | | |")
                continue
            tag = " (default)" if name == r["default_config"] else (" (best)" if name == r["best_fused"] else "")
            print(f"| {r['tokens']} | {r['active_experts']} | {name}{tag} | {p['us']:.1f} | {p['GBps']:.0f} | "
                  f"{100 * p['floor_fraction']:.0f}% | {p['max_abs_err']:.2e} ({r['ref_scale']:.2f}) |")


if __name__ == "__main__":
    main()
