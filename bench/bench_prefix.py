"""Prefill of a GRPO group with shared prompt blocks: one sample vs a group of n sharing its prompt vs n distinct
prompts (the control: no sharing), on the rollout engine.

    python bench/bench_prefix.py --out prefix.json                    # GPU: probe-qwen3-moe, bf16, prompt 1024, n 8
    python bench/bench_prefix.py --device cpu --dtype float32 --preset tiny-qwen3-moe --prompt-len 64 --rounds 3

Each run is `generate()` with max_new_tokens=1: admission, the prefill and the first sampled token (no decode step).
Rounds are interleaved (one, group, distinct, in rotating order), after one warm-up run of each; reported as the
median over rounds with its range. Target (issue 10): the group's prefill time <= 1.3 x one sample's.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

from r3rl.models.loading import resolve_dtype
from r3rl.models.presets import make_model
from r3rl.rollout import EngineRequest, RolloutEngine, SamplingParams

logger = logging.getLogger("bench_prefix")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="probe-qwen3-moe")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--n", type=int, default=8, help="samples per prompt (the GRPO group)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    model = make_model(args.preset, seed=0, device=device, dtype=resolve_dtype(args.dtype))
    engine = RolloutEngine(model, max_slots=args.n, max_seq_len=args.prompt_len + 8)
    gen = torch.Generator().manual_seed(0)
    vocab = min(model.config.vocab_size, 256)

    def prompt() -> list[int]:
        return torch.randint(1, vocab, (args.prompt_len,), generator=gen).tolist()

    counter = iter(range(10**9))

    def requests(prompts: list[list[int]]) -> list[EngineRequest]:
        return [EngineRequest(request_id=f"r{next(counter)}", input_ids=p,
                              sampling=SamplingParams(max_new_tokens=1, seed=i, temperature=1.0))
                for i, p in enumerate(prompts)]

    loads = {"one": lambda: [prompt()], "group": lambda: [prompt()] * args.n,
             "distinct": lambda: [prompt() for _ in range(args.n)]}
    times: dict[str, list[float]] = {k: [] for k in loads}
    for r in range(args.rounds + 1):  # round 0: warm-up
        names = list(loads)
        names = names[r % 3 :] + names[: r % 3]
        for name in names:
            reqs = requests(loads[name]())
            _sync(device)
            t0 = time.perf_counter()
            outs = engine.generate(reqs)
            _sync(device)
            if r:
                times[name].append(time.perf_counter() - t0)
            assert all(len(o.output_ids) == 1 and o.trace.expert_ids.shape[0] == args.prompt_len for o in outs)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "args": vars(args),
              "seconds": times, "median_s": med, "group_over_one": med["group"] / med["one"],
              "distinct_over_one": med["distinct"] / med["one"]}
    print(f"\n## Prefill of a GRPO group ({report['device']}, {args.preset}, {args.dtype}, prompt {args.prompt_len}, "
          f"n={args.n}; median of {args.rounds} interleaved rounds [min-max])\n")
    print("| load | prefill + first token ms | / one sample |")
    print("|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {1e3 * med[k]:.1f} [{1e3 * min(v):.1f}-{1e3 * max(v):.1f}] | {med[k] / med['one']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
