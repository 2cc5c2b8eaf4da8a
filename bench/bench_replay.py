"""Replay and check overhead: forward+backward step time for plain, replay and replay+check, side by side.

    python bench/bench_replay.py --preset probe-qwen3-moe --batch 32 --seq 192 --out $OUT/replay.json   # GPU
    python bench/bench_replay.py --preset tiny-qwen3-moe --batch 4 --seq 32 --device cpu              # smoke

One process, one model, one batch. The three modes are timed in interleaved rounds (plain, replay, replay+check,
plain, ...) so clock and thermal drift hit all of them alike; each number is a median. The step is a training
micro-batch: forward with activation checkpointing (so routers run twice: forward and recompute), a
policy-gradient-shaped loss, backward. The replayed trace is the model's own routing, so every mode sends the same
tokens to the same experts and only the routing code differs. The trace takes a rollout's path: per-sample uint8
RoutingTraces laid out with `layout_padded` (pinned upload, pad-slot fill for the last token of each sample).
replay+check includes the check's once-per-step `summary()` (its one host sync).

Targets (issue 2): replay <= 1.02x plain, replay+check <= 1.05x plain. Also prints trace bytes per token vs
SGLang's int32 wire format (target: 1 byte per layer per k).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

from r3rl.check import ReplayCheck, Stage
from r3rl.models import find_routers
from r3rl.models.loading import set_activation_checkpointing
from r3rl.models.presets import make_model
from r3rl.replay import RoutingReplay
from r3rl.train.data import layout_padded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="probe-qwen3-moe")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.getLogger("r3rl").setLevel(logging.WARNING)  # evidence lines would flood the bench output

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = make_model(args.preset, device=device, dtype=dtype).train()
    set_activation_checkpointing(model, True)
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, 256, (args.batch, args.seq), generator=g).to(device)

    # The trace goes the way a rollout's does: per-sample RoutingTraces (uint8, seq - 1 rows: the last token has
    # none), laid out for the padded forward. So replay runs its real path: pinned upload, pad-slot fill.
    replay = RoutingReplay(model)
    with torch.no_grad(), replay.record() as rec:
        model(tokens)
    recorded = rec.batch()  # on the device, no pads: the R2 path
    traces = rec.traces(lengths=[args.seq] * args.batch, seq_len=args.seq)
    batch = layout_padded(traces, seq_len=args.seq, lengths=[args.seq] * args.batch)
    num_layers, top_k = replay.num_layers, replay.top_k
    replay.close()

    def step_plain():
        _step(model, tokens)

    r_replay = RoutingReplay(model)

    def step_replay():
        with r_replay.replay(batch):
            _step(model, tokens)

    check = ReplayCheck(num_layers, top_k, device=device)

    def step_check():
        with r_replay.replay(batch):
            _step(model, tokens)
        check.summary()

    def step_recorded():
        with r_replay.replay(recorded):
            _step(model, tokens)

    modes = {"plain": step_plain, "replay": step_replay, "replay+check": step_check,
             "replay (R2: device batch, no pads)": step_recorded}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(args.warmup + args.rounds):
        for name, fn in modes.items():
            if name == "plain":
                r_replay.close()
            elif not r_replay._patched:
                r_replay = RoutingReplay(model)
            r_replay.check = check if name == "replay+check" else None
            t = _timed(fn, device)
            if i >= args.warmup:
                times[name].append(t)
    r_replay.close()

    med = {m: statistics.median(v) for m, v in times.items()}
    parts = _micro(batch, model, device)
    spread = {m: (min(v), max(v)) for m, v in times.items()}
    trace = traces[0]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "preset": args.preset, "dtype": args.dtype, "batch": args.batch, "seq": args.seq, "rounds": args.rounds,
        "activation_checkpointing": True,
        "median_ms": {m: 1e3 * v for m, v in med.items()},
        "min_max_ms": {m: [1e3 * a, 1e3 * b] for m, (a, b) in spread.items()},
        "ratio_vs_plain": {m: med[m] / med["plain"] for m in med},
        "per_call_us": parts,
        "trace_bytes_per_token": trace.nbytes / trace.num_rows,
        "sglang_int32_bytes_per_token": num_layers * top_k * 4,
        "trace_bytes_per_layer_per_k": trace.nbytes / (trace.num_rows * num_layers * top_k),
    }
    print(json.dumps(result, indent=2))
    print("\n| mode | median step (ms) | ratio vs plain | min-max (ms) |\n|---|---|---|---|")
    for m in modes:
        lo, hi = result["min_max_ms"][m]
        print(f"| {m} | {result['median_ms'][m]:.1f} | {result['ratio_vs_plain'][m]:.3f} | {lo:.1f}-{hi:.1f} |")
    print(f"\ntrace: {result['trace_bytes_per_token']:.0f} B/token ({result['trace_bytes_per_layer_per_k']:.0f} B per "
          f"layer per k) vs SGLang int32 {result['sglang_int32_bytes_per_token']} B/token")
    print("per router call / per step, microseconds (median of 50): " + ", ".join(f"{k}={v:.1f}" for k, v in
                                                                                  parts.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


def _micro(batch, model, device: torch.device) -> dict[str, float]:
    """Attribute the replay cost: each piece of the replayed router call timed alone on one layer's shapes."""
    from r3rl.replay import fill_pad_slots

    site = find_routers(model)[0]
    on_dev = batch.to(device)
    T, E = on_dev.num_tokens, site.num_experts
    probs_TE = torch.rand(T, E, device=device).softmax(-1)
    ids_TK = on_dev.expert_ids[:, 0, :]
    valid_TK = ids_TK != on_dev.pad_value
    check = ReplayCheck(1, on_dev.top_k, device=device)
    live_TK = torch.topk(probs_TE, on_dev.top_k, dim=-1).indices
    pieces = {
        "upload_batch_per_step": lambda: batch.to(device),
        "live_topk": lambda: torch.topk(probs_TE, on_dev.top_k, dim=-1),
        "pad_fill": lambda: fill_pad_slots(ids_TK, valid_TK, probs_TE),
        "check_observe": lambda: check.observe(Stage.REPLAY_FORWARD, 0, live_TK, ids_TK, valid_TK),
    }
    out = {}
    for name, fn in pieces.items():
        samples = []
        for _ in range(60):
            samples.append(_timed(fn, device))
        out[name] = 1e6 * statistics.median(samples[10:])
    check.summary(raise_on_fail=False)
    return out


def _step(model, tokens) -> None:
    model.zero_grad(set_to_none=True)
    logits = model(tokens).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])
    (-logp.mean()).backward()


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
