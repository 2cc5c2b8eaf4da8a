"""End-to-end decode with the fused MoE Triton kernels: the rollout engine on grouped_mm experts vs the same
engine with `r3rl.rollout.model.fused_moe.fused_moe` in its MoE block (alignment in torch ops, or in Triton kernels), on
one model, interleaved rounds.

    python bench/bench_fused_engine.py --out fused_engine.json     # GPU: probe-qwen3-moe and bench-qwen3-moe, bf16,
                                                                  # batch 32 and 256, prompt 64, 128 new tokens

This is a measurement of the integration before it is made: the fused path is put into one engine's MoE block
instance (an instance attribute shadowing `MoEBlock._experts_sorted`, for that engine only), which is what the
change in `r3rl.rollout.model.moe` would do for CUDA + triton + SwiGLU (SiLU) experts without biases + not
batch-invariant. Per engine: the correctness gate of bench_rollout (greedy tokens teacher-forced through HF: log-prob
and routing agreement), then per batch `--rounds` rounds of both engines (alternating order), each a full
`generate` with routing capture on; medians and ranges of tokens/s and the decode step time, and the decode step
against the memory-bandwidth floor (bench_rollout's definition).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import statistics

import torch
from bench_rollout import copy_bandwidth, correctness_gate, decode_bytes, run_engine

from r3rl.models.loading import resolve_dtype
from r3rl.models.presets import make_model
from r3rl.rollout import RolloutEngine
from r3rl.rollout.model import fused_moe as fm
from r3rl.rollout.model.moe import ExpertAct, MoEKernel

logger = logging.getLogger("bench_fused_engine")

KINDS = ("grouped_mm", "fused", "fused_triton_align")  # today's path; fused with torch / Triton alignment


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["probe-qwen3-moe", "bench-qwen3-moe"])
    p.add_argument("--batches", nargs="+", type=int, default=[32, 256])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--gate-batch", type=int, default=8)
    p.add_argument("--gate-tokens", type=int, default=32)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args()


def use_fused_moe(engine: RolloutEngine, hidden_act: str, *, triton_align: bool) -> None:
    """Run this engine's routed experts through the fused kernels (this engine's MoE block instance only)."""
    block = engine.model.moe
    if block.expert_act is not ExpertAct.SWIGLU or hidden_act != "silu" or block.kernel is not MoEKernel.GROUPED_MM:
        raise ValueError(f"fused_moe replaces the sorted grouped_mm path of SiLU-gated experts: got expert_act="
                         f"{block.expert_act.value}, hidden_act={hidden_act}, kernel={block.kernel.value}")
    num_experts = block.num_experts

    def experts(h_TH, ids_TK, weights_TK, valid_T, w):
        if w.gate_up_bias_EI is not None or w.down_bias_EH is not None:
            raise ValueError(f"fused_moe has no expert biases (MoE layer {w.moe_layer})")
        cfg = dataclasses.replace(fm.default_config(ids_TK.numel(), num_experts), triton_align=triton_align)
        return fm.fused_moe(h_TH, ids_TK, weights_TK, w.gate_up_EIH, w.down_EHI, valid_T=valid_T, config=cfg)

    block._experts_sorted = experts


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    bandwidth = copy_bandwidth(device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "args": vars(args), "copy_bandwidth_GBps": bandwidth / 1e9, "gates": {},
              "results": []}
    for preset in args.presets:
        model = make_model(preset, seed=args.seed, device=device, dtype=dtype)
        max_seq_len = args.prompt_len + max(args.new_tokens, args.gate_tokens)
        max_slots = max(args.batches + [args.gate_batch])
        engines = {}
        for kind in KINDS:
            # every engine starts on grouped_mm (the fused kernels are the CUDA default now); the fused kinds then
            # put this script's own integration of the kernels into their MoE block
            engines[kind] = RolloutEngine(model, max_slots=max_slots, max_seq_len=max_seq_len, capture_routing=True,
                                          batch_invariant=False, fused_moe=False)
            if kind != "grouped_mm":
                use_fused_moe(engines[kind], model.config.hidden_act, triton_align=kind == "fused_triton_align")
            report["gates"][f"{preset}/{kind}"] = correctness_gate(model, engines[kind], args)
            logger.info("%s %s gate: %s", preset, kind, json.dumps(report["gates"][f"{preset}/{kind}"]))
        for batch in args.batches:
            prompts = torch.randint(0, 256, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
            for eng in engines.values():  # warm-up: graph capture, kernel compilation
                run_engine(eng, prompts.tolist(), args.new_tokens, args.temperature)
            rounds = {k: [] for k in engines}
            outputs = None
            for r in range(args.rounds):
                for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):
                    timing, out = run_engine(engines[kind], prompts.tolist(), args.new_tokens, args.temperature)
                    rounds[kind].append(timing)
                    outputs = out if kind == "grouped_mm" else outputs
            floor_ms = decode_bytes(engines["grouped_mm"], outputs, args.prompt_len) / bandwidth * 1e3
            for kind, timings in rounds.items():
                dec = [t["decode_ms"] for t in timings]
                row = {"preset": preset, "batch": batch, "kernel": kind, "floor_ms": floor_ms,
                       "tok_s": _mr([t["tok_s"] for t in timings]), "decode_ms": _mr(dec),
                       "floor_fraction": floor_ms / statistics.median(dec),
                       "decode_speedup_vs_grouped": _mr([g["decode_ms"] / t["decode_ms"]
                                                         for g, t in zip(rounds["grouped_mm"], timings, strict=True)])}
                report["results"].append(row)
                logger.info("%s", json.dumps(row))
        del engines, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _print(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


def _mr(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _print(report: dict) -> None:
    a = report["args"]
    print(f"\n## Engine decode, grouped_mm vs fused MoE ({report['device']}, {a['dtype']}, prompt {a['prompt_len']}, "
          f"{a['new_tokens']} new tokens, {a['rounds']} interleaved rounds)\n")
    for name, g in report["gates"].items():
        print(f"- gate {name}: {'PASS' if g['passed'] else 'FAIL'} (logprob |diff| mean "
              f"{g['logprob_mean_abs_diff']:.2e}, routing exact {g['routing_exact_set']:.3f} overlap "
              f"{g['routing_overlap']:.3f}, greedy=HF argmax {g['greedy_token_is_hf_argmax']:.3f})")
    print("\n| preset | batch | experts kernel | tok/s | decode ms/step | floor ms | % of floor | decode speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["results"]:
        t, d, s = r["tok_s"], r["decode_ms"], r["decode_speedup_vs_grouped"]
        print(f"| {r['preset']} | {r['batch']} | {r['kernel']} | {t['median']:.0f} [{t['min']:.0f}-{t['max']:.0f}] | "
              f"{d['median']:.2f} [{d['min']:.2f}-{d['max']:.2f}] | {r['floor_ms']:.2f} | "
              f"{100 * r['floor_fraction']:.0f}% | {s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}] |")


if __name__ == "__main__":
    main()
