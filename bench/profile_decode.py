"""Kernel-time breakdown of one engine decode step (eager, so each kernel is visible), for tuning.

    python bench/profile_decode.py --preset probe-qwen3-moe --batch 32      # GPU
    python bench/profile_decode.py --preset probe-qwen3-moe --batch 256 --rows 40

Prints the kernels sorted by total CUDA time (the top `--rows`), then the total per decode step. The engine runs as
configured by default (fused MoE kernels and paged decode attention on CUDA); `--moe-kernel grouped_mm` profiles the
torch grouped_mm experts instead.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from r3rl.models.presets import make_model
from r3rl.rollout import EngineRequest, RolloutEngine, SamplingParams

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="probe-qwen3-moe")
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--rows", type=int, default=30, help="kernels listed (the largest first)")
ap.add_argument("--moe-kernel", choices=["fused", "grouped_mm"], default="fused")
ap.add_argument("--torch-router", action="store_true", help="the fused experts with the torch router (A/B of the "
                "fused router kernel, r3rl.rollout.model.router_kernel)")
args = ap.parse_args()

model = make_model(args.preset, device="cuda", dtype=torch.bfloat16)
engine = RolloutEngine(model, max_slots=args.batch, max_seq_len=192, device="cuda", dtype="bfloat16",
                       use_cuda_graph=False, fused_moe=args.moe_kernel == "fused")
del model
if args.torch_router:
    engine.model.moe.fused_router = False
g = torch.Generator().manual_seed(0)
for b in range(args.batch):
    ids = torch.randint(0, 256, (64,), generator=g).tolist()
    engine.add_request(EngineRequest(request_id=str(b), input_ids=ids,
                                     sampling=SamplingParams(max_new_tokens=100, seed=b)))
for _ in range(4):
    engine.step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
averages = prof.key_averages()
print(averages.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
total_us = sum(e.self_device_time_total for e in averages)
print(f"moe kernel {engine.model.moe_kernel.value}, fused router {engine.model.moe.fused_router}; "
      f"CUDA time per decode step: {total_us / args.steps / 1e3:.3f} ms "
      f"(eager: the CUDA graph removes launch gaps, not kernel time)")
