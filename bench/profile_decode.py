"""Kernel-time breakdown of one engine decode step (eager, so each kernel is visible), for tuning.

    python bench/profile_decode.py --preset probe-qwen3-moe --batch 32     # GPU
    python bench/profile_decode.py --preset probe-qwen3-moe --batch 32 --fused-moe   # experts through fused_moe
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
ap.add_argument("--fused-moe", action="store_true", help="run the experts through r3rl.rollout.fused_moe (Triton)")
args = ap.parse_args()

model = make_model(args.preset, device="cuda", dtype=torch.bfloat16)
engine = RolloutEngine(model, max_slots=args.batch, max_seq_len=192, device="cuda", dtype="bfloat16",
                       use_cuda_graph=False)
if args.fused_moe:
    from bench_fused_engine import use_fused_moe  # bench/ is on the path when this script runs

    use_fused_moe(engine, model.config.hidden_act, triton_align=True)
del model
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
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
