"""Tabulate `bench/gpu_r3_effect.sh` runs: per mode, medians over seeds (with the range) of each metric, per step and
over the run, and the ratios no replay / R3 that issue 22's targets name.

    python bench/r3_effect_table.py /path/to/r3e          # the unpacked r3_effect.tgz: MODE_sSEED/metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

METRICS = ["routing_mismatch", "router_live_mismatch", "train_rollout_k3_kl", "train_rollout_extreme_frac",
           "train_rollout_logprob_abs_diff_p99", "clipfrac", "grad_norm", "reward_mean", "response_len_mean",
           "time/step"]


def load(root: Path) -> dict[str, dict[int, list[dict]]]:
    runs: dict[str, dict[int, list[dict]]] = defaultdict(dict)
    for path in sorted(root.glob("*_s*/metrics.jsonl")):
        m = re.fullmatch(r"([\w.-]+)_s(\d+)", path.parent.name)
        if m:
            runs[m.group(1)][int(m.group(2))] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return runs


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    med = statistics.median(values)
    return f"{med:.3g} [{min(values):.3g}, {max(values):.3g}]" if len(values) > 1 else f"{med:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    args = ap.parse_args()
    runs = load(args.root)
    if not runs:
        raise SystemExit(f"no MODE_sSEED/metrics.jsonl under {args.root}")
    run_means: dict[str, dict[str, list[float]]] = {}
    for mode, seeds in runs.items():
        print(f"\n### {mode} (seeds {sorted(seeds)}; median over seeds [min, max])\n")
        steps = min(len(rows) for rows in seeds.values())
        shown = [k for k in METRICS if any(k in r for rows in seeds.values() for r in rows)]
        print("| step | " + " | ".join(shown) + " |")
        print("|---" * (len(shown) + 1) + "|")
        for s in range(steps):
            cells = [_fmt([rows[s][k] for rows in seeds.values() if k in rows[s]]) for k in shown]
            print(f"| {s} | " + " | ".join(cells) + " |")
        # per run: the mean over steps (step 0's time/step includes CUDA-graph capture: time is taken from step 1)
        run_means[mode] = {k: [statistics.fmean([r[k] for r in rows[(1 if k == "time/step" else 0):steps] if k in r])
                               for rows in seeds.values() if any(k in r for r in rows)] for k in shown}
        per_layer = [r["routing_mismatch_per_layer"] for rows in seeds.values() for r in rows
                     if r.get("routing_mismatch_per_layer")]
        if per_layer:
            layers = [statistics.fmean(col) for col in zip(*per_layer, strict=True)]
            print("\nrouting mismatch per layer (mean over steps and seeds): "
                  + ", ".join(f"L{i} {v:.2%}" for i, v in enumerate(layers)))
    print("\n### run means (median over seeds [min, max])\n")
    keys = [k for k in METRICS if any(k in m for m in run_means.values())]
    print("| mode | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for mode, means in run_means.items():
        print(f"| {mode} | " + " | ".join(_fmt(means.get(k, [])) for k in keys) + " |")
    for mode in run_means:  # "none" against "r3", with the same prefix (e.g. off_none / off_r3)
        if not mode.endswith("none") or mode[:-4] + "r3" not in run_means:
            continue
        r3 = mode[:-4] + "r3"
        for k in ("train_rollout_k3_kl", "train_rollout_extreme_frac", "train_rollout_logprob_abs_diff_p99"):
            a, b = run_means[mode].get(k), run_means[r3].get(k)
            if a and b and statistics.median(b) > 0:
                print(f"\n{k}: {mode} / {r3} = {statistics.median(a) / statistics.median(b):.2f}x (target >= 2x)")

if __name__ == "__main__":
    main()
