"""Where the host's time in one engine decode step goes (cProfile), with CUDA graphs on as in a real run. Without
the overlap schedule the device idles while the host reads tokens back, checks stops, releases slots and reserves
blocks, so that time adds to every decode step; with it (the default on CUDA) that work runs while the next step
decodes, and the wall time per step shows what is left.

    python bench/profile_host.py --preset bench-qwen3-moe --batch 256      # GPU

Prints the wall time per step (no profiler), then the functions by own time over `--steps` profiled steps.
"""

import argparse
import cProfile
import pstats
import time

import torch

from r3rl.models.presets import make_model
from r3rl.rollout import EngineRequest, RolloutEngine, SamplingParams

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="bench-qwen3-moe")
ap.add_argument("--batch", type=int, default=256)
ap.add_argument("--steps", type=int, default=60)
ap.add_argument("--rows", type=int, default=25)
args = ap.parse_args()

model = make_model(args.preset, device="cuda", dtype=torch.bfloat16)
engine = RolloutEngine(model, max_slots=args.batch, max_seq_len=320, device="cuda", dtype="bfloat16")
del model
g = torch.Generator().manual_seed(0)
for b in range(args.batch):
    ids = torch.randint(0, 256, (64,), generator=g).tolist()
    engine.add_request(EngineRequest(request_id=str(b), input_ids=ids,
                                     sampling=SamplingParams(max_new_tokens=250, temperature=1.0, seed=b)))
for _ in range(20):  # prefill, graph captures
    engine.step()
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(args.steps):
    engine.step()
torch.cuda.synchronize()
wall = (time.perf_counter() - t0) / args.steps
prof = cProfile.Profile()
prof.enable()
for _ in range(args.steps):
    engine.step()
torch.cuda.synchronize()
prof.disable()
print(f"{args.preset} batch {args.batch}: {wall * 1e3:.3f} ms per decode step (wall, CUDA graphs)")
pstats.Stats(prof).sort_stats("tottime").print_stats(args.rows)
