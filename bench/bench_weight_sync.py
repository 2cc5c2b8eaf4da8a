"""Weight sync time vs model size: colocated in-place copy, disk (`/update_weights_from_disk`'s path), and the
bandwidths this machine measures for each leg, side by side in one process.

    python bench/bench_weight_sync.py --presets tiny-qwen3-moe bench-qwen3-moe probe-qwen3-moe --out sync.json

Per preset (bf16 on the GPU):
  colocated   `RolloutEngine.update_weights(model_tensors(model))`: device-to-device, in place, one tensor at a time
              (the torchrun path gathers each FSDP2 shard with `full_tensor()` first; one GPU here, so no gather)
  disk        the trainer's `save_pretrained` (device -> host -> file) then the server's load and check
              (`load_checkpoint_tensors`: file -> host, names and shapes checked) and copy into the engine (host ->
              device), the legs of `/update_weights_from_disk`
Bandwidths measured here: device-to-device copy, pageable host<->device copies (what save/load use), and the file
system's write/read throughput (the page cache included: the file was just written). Each time is the median of
`--rounds`. NCCL (`/update_weights_from_distributed`) needs two GPUs: not measured by this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from r3rl.models.presets import make_model
from r3rl.rollout.engine.engine import RolloutEngine
from r3rl.rollout.engine.weights import load_checkpoint_tensors, model_tensors


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bandwidths(device: str, rounds: int, nbytes: int = 1 << 30) -> dict:
    """GB/s of the legs a weight sync uses, on a 1 GiB buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    host = torch.empty(nbytes, dtype=torch.uint8)
    out = {"d2d_GBps": nbytes / _median_time(lambda: dst.copy_(src), rounds) / 1e9,
           "d2h_pageable_GBps": nbytes / _median_time(lambda: host.copy_(src), rounds) / 1e9,
           "h2d_pageable_GBps": nbytes / _median_time(lambda: src.copy_(host), rounds) / 1e9}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "blob"
        data = host.numpy().tobytes()

        def write() -> None:
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        out["file_write_GBps"] = nbytes / _median_time(write, rounds) / 1e9
        out["file_read_GBps"] = nbytes / _median_time(lambda: path.read_bytes(), rounds) / 1e9
    return out


def measure(preset: str, device: str, dtype: torch.dtype, rounds: int) -> dict:
    model = make_model(preset, seed=0, device=device, dtype=dtype)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    engine = RolloutEngine(model, max_slots=8, max_seq_len=256, device=device, dtype=dtype)
    tensors = model_tensors(model)
    colocated = _median_time(lambda: engine.update_weights(tensors, strict=True), rounds)
    with tempfile.TemporaryDirectory() as d:
        save = _median_time(lambda: model.save_pretrained(Path(d) / "w", safe_serialization=True), rounds)
        loaded: dict = {}

        def load() -> None:
            loaded["t"] = load_checkpoint_tensors(Path(d) / "w", dtype=dtype, expected_shapes=engine.model.shapes)

        load_t = _median_time(load, rounds)
        copy_in = _median_time(lambda: engine.update_weights(loaded["t"], strict=True), rounds)
    gb = nbytes / 1e9
    return {"preset": preset, "params": sum(p.numel() for p in model.parameters()), "GB": gb,
            "colocated_s": colocated, "colocated_GBps": gb / colocated,
            "disk_save_s": save, "disk_load_s": load_t, "disk_copy_in_s": copy_in,
            "disk_total_s": save + load_t + copy_in, "disk_GBps": gb / (save + load_t + copy_in)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny-qwen3-moe", "bench-qwen3-moe", "probe-qwen3-moe"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    bw = bandwidths(args.device, args.rounds)
    print(f"card: {card}; measured GB/s: " + ", ".join(f"{k[:-5]} {v:.1f}" for k, v in bw.items()))
    rows = []
    print(f"{'preset':<18}{'GB':>7}{'colocated s':>13}{'GB/s':>7}{'save s':>9}{'load s':>9}{'copy-in s':>11}"
          f"{'disk s':>9}{'GB/s':>7}")
    for preset in args.presets:
        r = measure(preset, args.device, dtype, args.rounds)
        rows.append(r)
        print(f"{preset:<18}{r['GB']:>7.2f}{r['colocated_s']:>13.4f}{r['colocated_GBps']:>7.1f}{r['disk_save_s']:>9.3f}"
              f"{r['disk_load_s']:>9.3f}{r['disk_copy_in_s']:>11.4f}{r['disk_total_s']:>9.3f}{r['disk_GBps']:>7.2f}")
        torch.cuda.empty_cache() if args.device == "cuda" else None
    if args.out:
        Path(args.out).write_text(json.dumps({"card": card, "bandwidths": bw, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
