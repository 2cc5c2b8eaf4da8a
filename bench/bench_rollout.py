"""Rollout throughput: RolloutEngine vs HF `generate()` on the same MoE model, batch, prompt and output lengths.

    python bench/bench_rollout.py --out bench/rollout.json      # GPU: bench-qwen3-moe + probe-qwen3-moe, bf16,
                                                               # batch 32 and 256, prompt 64, 128 new tokens
    python bench/bench_rollout.py --device cpu --dtype float32 --presets tiny-qwen3-moe --batches 2 4 \
        --prompt-len 8 --new-tokens 8 --out /tmp/rollout.json   # CPU smoke test

Per preset, first a correctness gate: the engine's greedy tokens are scored by one full-sequence HF forward
(teacher forcing) and its routing is compared with the HF router's (RoutingReplay.record). Then per batch size,
after one warm-up run of each, `--rounds` rounds, each running (interleaved, so drift hits all alike) the engine
with routing capture on, the engine with capture off (the two in alternating order) and HF generate (in the first
`--hf-rounds` rounds). Reported as the median over rounds with its range [min, max]:
  - generated tokens/s of the engine (capture on) and of HF generate (sampling at temperature 1 with
    min_new_tokens = max_new_tokens, so every sequence has the same length), and their ratio (median of the
    per-round ratios);
  - the decode step time (median step of a run, the prefill step excluded) against the memory-bandwidth floor: the
    bytes one step must read (every non-expert weight, the experts the batch actually routed to, the KV cache so
    far) over the measured device-to-device copy bandwidth (2 x bytes copied / time);
  - routing capture cost: per round, decode step time with capture on / off (back to back), median over rounds.
HF generates the same number of new tokens as the engine unless --hf-cap-batch is set: from that batch on, it
generates only --hf-cap-tokens tokens and its tokens/s comes from that shorter run (the table says so). Prints a
markdown table; --out writes JSON (every round's numbers included).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import statistics
import time

import numpy as np
import torch
import transformers

from r3rl.models.loading import resolve_dtype
from r3rl.models.presets import PAD_ID, make_model
from r3rl.replay import RoutingReplay
from r3rl.rollout import EngineRequest, RolloutEngine, SamplingParams

logger = logging.getLogger("bench_rollout")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["bench-qwen3-moe", "probe-qwen3-moe"])
    p.add_argument("--batches", nargs="+", type=int, default=[32, 256])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of both (0 = greedy)")
    p.add_argument("--hf-cap-batch", type=int, default=0,
                   help="from this batch on, HF generates --hf-cap-tokens tokens (0: never, HF = engine tokens)")
    p.add_argument("--hf-cap-tokens", type=int, default=32)
    p.add_argument("--moe-kernel", choices=["fused", "grouped_mm"], default="fused",
                   help="the engine's experts (EngineConfig.fused_moe)")
    p.add_argument("--hf-experts", choices=["auto", "grouped_mm"], default="auto",
                   help="HF's experts path in generate: auto = transformers' choice (decode switches grouped_mm to "
                        "batched_mm, which copies the selected experts' weights per token and runs out of memory "
                        "for 256-expert models at batch 32); grouped_mm = keep grouped_mm while decoding")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per (preset, batch)")
    p.add_argument("--hf-rounds", type=int, default=None, help="rounds that also run HF (default: all)")
    p.add_argument("--gate-batch", type=int, default=8)
    p.add_argument("--gate-tokens", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args()


# ---------------------------------------------------------------------------------------------------------------------
def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    bandwidth = copy_bandwidth(device)
    logger.info("device-to-device copy bandwidth: %.0f GB/s", bandwidth / 1e9)
    report = {"device": _device_name(device), "torch": torch.__version__, "transformers": transformers.__version__,
              "args": vars(args), "copy_bandwidth_GBps": bandwidth / 1e9, "gates": {}, "results": []}
    for preset in args.presets:
        model = make_model(preset, seed=args.seed, device=device, dtype=dtype)
        max_seq_len = args.prompt_len + max(args.new_tokens, args.gate_tokens)
        max_slots = max(args.batches + [args.gate_batch])
        fused = args.moe_kernel == "fused"
        engines = {capture: RolloutEngine(model, max_slots=max_slots, max_seq_len=max_seq_len, capture_routing=capture,
                                          fused_moe=fused)
                   for capture in (True, False)}
        report["gates"][preset] = gate = correctness_gate(model, engines[True], args)
        if args.hf_experts == "grouped_mm":
            keep_grouped_mm(model)
        logger.info("%s correctness gate: %s", preset, json.dumps(gate))
        for batch in args.batches:
            row = time_batch(model, engines, preset, batch, bandwidth, args)
            report["results"].append(row)
            logger.info("%s", json.dumps({k: v for k, v in row.items() if k != "rounds"}))
        del engines, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(report, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        logger.info("wrote %s", args.out)


# ---------------------------------------------------------------------------------------------------------------------
def time_batch(model, engines: dict, preset: str, batch: int, bandwidth: float, args) -> dict:
    """Interleaved rounds of engine (capture on, off) and HF generate for one batch size; medians and ranges."""
    device = engines[True].device
    prompts = torch.randint(0, 256, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
    hf_tokens = args.hf_cap_tokens if args.hf_cap_batch and batch >= args.hf_cap_batch else args.new_tokens
    hf_rounds = args.rounds if args.hf_rounds is None else args.hf_rounds
    for capture in (True, False):  # warm-up: CUDA graph capture, allocator
        run_engine(engines[capture], prompts.tolist(), args.new_tokens, args.temperature)
    if hf_rounds > 0:
        run_hf(model, prompts.to(device), 2, args.temperature)
    rounds, outputs = [], None
    for r in range(args.rounds):
        timing = {}
        for capture in ((True, False) if r % 2 == 0 else (False, True)):
            timing[capture], out = run_engine(engines[capture], prompts.tolist(), args.new_tokens, args.temperature)
            outputs = out if capture else outputs
        rnd = {"engine_on": timing[True], "engine_off": timing[False],
               "capture_on_off_ratio": timing[True]["decode_ms"] / timing[False]["decode_ms"]}
        if r < hf_rounds:
            rnd["hf"] = run_hf(model, prompts.to(device), hf_tokens, args.temperature)
            if not rnd["hf"].get("oom"):
                rnd["speedup"] = timing[True]["tok_s"] / rnd["hf"]["tok_s"]
        rounds.append(rnd)
    floor_s = decode_bytes(engines[True], outputs, args.prompt_len) / bandwidth
    on = [r["engine_on"] for r in rounds]
    hf = [r["hf"] for r in rounds if "hf" in r and not r["hf"].get("oom")]
    decode_ms = _mr([o["decode_ms"] for o in on])
    return {
        "preset": preset, "batch": batch, "rounds_n": len(rounds), "hf_rounds_n": len(hf),
        "engine_tok_s": _mr([o["tok_s"] for o in on]), "hf_tok_s": _mr([h["tok_s"] for h in hf]),
        "speedup": _mr([r["speedup"] for r in rounds if "speedup" in r]), "engine_decode_ms": decode_ms,
        "engine_decode_ms_capture_off": _mr([r["engine_off"]["decode_ms"] for r in rounds]),
        "capture_on_off_ratio": _mr([r["capture_on_off_ratio"] for r in rounds]),
        "floor_ms": floor_s * 1e3, "floor_fraction": floor_s * 1e3 / decode_ms["median"],
        "engine_first_step_ms": _mr([o["first_step_ms"] for o in on]), "hf_new_tokens": hf_tokens,
        "engine_new_tokens": args.new_tokens, "moe_kernel": engines[True].model.moe_kernel.value,
        "cuda_graph": engines[True].config.use_cuda_graph, "hf_experts": args.hf_experts,
        "hf_oom": any(r.get("hf", {}).get("oom") for r in rounds), "rounds": rounds,
    }


def _mr(values: list[float]) -> dict:
    """Median and range of per-round values (NaN when there are none)."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run_engine(engine: RolloutEngine, prompts: list[list[int]], new_tokens: int, temperature: float):
    """Time every step (each reads a decode step's sampled tokens back, i.e. a device sync; with the overlap schedule
    the step before the one it launches)."""
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(request_id=str(i), input_ids=prompt, sampling=SamplingParams(
            max_new_tokens=new_tokens, temperature=temperature, seed=i)))
    outputs, step_s = [], []
    _sync(engine.device)
    start = time.perf_counter()
    while engine.has_work():
        t = time.perf_counter()
        outputs += engine.step()
        step_s.append(time.perf_counter() - t)
    _sync(engine.device)
    seconds = time.perf_counter() - start
    assert all(len(o.output_ids) == new_tokens for o in outputs), "every sequence must reach max_new_tokens"
    decode_ms = 1e3 * statistics.median(step_s[1:]) if len(step_s) > 1 else float("nan")  # step 0 holds the prefill
    return {"tok_s": len(prompts) * new_tokens / seconds, "seconds": seconds, "decode_ms": decode_ms,
            "first_step_ms": 1e3 * step_s[0]}, sorted(outputs, key=lambda o: int(o.request_id))


def keep_grouped_mm(model) -> None:
    """HF generate keeps the grouped_mm experts while decoding (no switch to batched_mm)."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("grouped_mm")
    if hasattr(model, "_optimize_model_for_decode"):
        model._optimize_model_for_decode = contextlib.nullcontext
    logger.info("HF experts: %s while decoding", getattr(model.config, "_experts_implementation", "?"))


def run_hf(model, prompts: torch.Tensor, new_tokens: int, temperature: float) -> dict:
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    kwargs = dict(attention_mask=torch.ones_like(prompts), pad_token_id=PAD_ID, **sampling)
    with torch.no_grad():
        _sync(prompts.device)
        start = time.perf_counter()
        try:
            out = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        except torch.OutOfMemoryError as e:  # reported as such (HF's decode path can copy expert weights per token)
            logger.warning("HF generate ran out of memory at batch %d: %s", prompts.shape[0], str(e).splitlines()[0])
            gc.collect()
            torch.cuda.empty_cache()
            return {"tok_s": float("nan"), "seconds": float("nan"), "oom": True}
        _sync(prompts.device)
    seconds = time.perf_counter() - start
    assert out.shape[1] == prompts.shape[1] + new_tokens, f"HF generated {out.shape[1] - prompts.shape[1]} tokens"
    return {"tok_s": prompts.shape[0] * new_tokens / seconds, "seconds": seconds}


def correctness_gate(model, engine: RolloutEngine, args) -> dict:
    """Engine greedy tokens, teacher-forced through one HF forward: logprob and routing agreement."""
    prompts = torch.randint(0, 256, (args.gate_batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
    outputs = engine.generate([
        EngineRequest(request_id=str(i), input_ids=p, sampling=SamplingParams(max_new_tokens=args.gate_tokens,
                                                                               temperature=0.0))
        for i, p in enumerate(prompts.tolist())])
    tokens = torch.tensor([o.prompt_ids + o.output_ids for o in outputs], device=engine.device)
    with RoutingReplay(model) as replay, replay.record() as rec, torch.no_grad():
        logits = model(tokens).logits.float()
    hf_traces = rec.traces([tokens.shape[1]] * len(outputs), tokens.shape[1])
    P = args.prompt_len
    hf_lp = torch.log_softmax(logits[:, P - 1 : -1], dim=-1)
    out_ids = tokens[:, P:]
    lp_diff = (hf_lp.gather(2, out_ids.unsqueeze(-1)).squeeze(-1).cpu()
               - torch.tensor([o.output_logprobs for o in outputs])).abs()
    ours = np.stack([o.trace.expert_ids for o in outputs]).astype(np.int64)
    theirs = np.stack([t.expert_ids for t in hf_traces]).astype(np.int64)
    exact = (np.sort(ours, -1) == np.sort(theirs, -1)).all(-1)
    overlap = (ours[..., :, None] == theirs[..., None, :]).any(-1).any(-1)
    tol = 1e-3 if engine.dtype == torch.float32 else 0.1
    gate = {
        "logprob_mean_abs_diff": float(lp_diff.mean()), "logprob_max_abs_diff": float(lp_diff.max()),
        "greedy_token_is_hf_argmax": float((hf_lp.argmax(-1) == out_ids).float().mean()),
        "routing_exact_set": float(exact.mean()), "routing_overlap": float(overlap.mean()),
    }
    gate["passed"] = gate["logprob_mean_abs_diff"] < tol and gate["routing_overlap"] >= 0.99
    if not gate["passed"]:
        logger.error("CORRECTNESS GATE FAILED: %s (timings below are not trustworthy)", gate)
    return gate


def decode_bytes(engine: RolloutEngine, outputs, prompt_len: int) -> float:
    """Bytes one decode step must read, averaged over the run's decode steps (see the module docstring)."""
    m = engine.model
    elem = m.embed_VH.element_size()  # the model dtype (independent of the KV cache layout)
    dense_bytes, expert_bytes = m.weight_bytes()  # every non-expert weight once (a tied lm_head counted once)
    if m.lm_head_VH.data_ptr() != m.embed_VH.data_ptr():  # an untied embedding: a step reads only B rows of it
        dense_bytes -= m.embed_VH.numel() * m.embed_VH.element_size()
    ids_BSLK = np.stack([o.trace.expert_ids[prompt_len:] for o in outputs])  # rows fed by decode steps
    active = np.mean([[len(np.unique(ids_BSLK[:, s, layer])) for layer in range(ids_BSLK.shape[2])]
                      for s in range(ids_BSLK.shape[1])]) * m.num_moe_layers
    B, steps = len(outputs), ids_BSLK.shape[1]
    mean_context = prompt_len + (steps + 1) / 2
    kv_bytes = 2 * B * m.num_decoder_layers * m.num_kv_heads * m.head_dim * mean_context * elem
    return dense_bytes + active * expert_bytes + kv_bytes + B * m.embed_VH.shape[1] * elem


def copy_bandwidth(device: torch.device) -> float:
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    x, y = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    y.copy_(x)
    _sync(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        y.copy_(x)
    _sync(device)
    return 2 * n * reps / (time.perf_counter() - start)


def print_table(report: dict, args) -> None:
    print(f"\n## Rollout: RolloutEngine vs HF generate ({report['device']}, {args.dtype}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, temperature {args.temperature})\n")
    for preset, gate in report["gates"].items():
        print(f"- gate {preset}: {'PASS' if gate['passed'] else 'FAIL'} (logprob |diff| mean "
              f"{gate['logprob_mean_abs_diff']:.2e} max {gate['logprob_max_abs_diff']:.2e}, routing exact "
              f"{gate['routing_exact_set']:.3f} overlap {gate['routing_overlap']:.3f}, greedy=HF argmax "
              f"{gate['greedy_token_is_hf_argmax']:.3f})")
    print(f"\nMedian over {args.rounds} interleaved rounds, [min-max] across rounds.\n")
    print("| preset | batch | engine tok/s | HF tok/s | speedup | decode ms/step | floor ms/step | % of floor | "
          "capture on/off | HF new tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["results"]:
        capped = "" if r["hf_new_tokens"] == args.new_tokens else " (capped)"
        hf = "OOM" if r.get("hf_oom") and r["hf_tok_s"]["n"] == 0 else _fmt(r["hf_tok_s"], ".0f")
        print(f"| {r['preset']} | {r['batch']} | {_fmt(r['engine_tok_s'], '.0f')} | {hf} | "
              f"{_fmt(r['speedup'], '.1f')}x | {_fmt(r['engine_decode_ms'], '.2f')} | {r['floor_ms']:.2f} | "
              f"{100 * r['floor_fraction']:.0f}% | {_fmt(r['capture_on_off_ratio'], '.3f')} | "
              f"{r['hf_new_tokens']}{capped} |")
    print(f"\ncopy bandwidth {report['copy_bandwidth_GBps']:.0f} GB/s; floor = bytes read per decode step / that "
          "bandwidth (% of floor from the median decode step); speedup = engine tok/s / HF tok/s per round (HF capped "
          "runs: tok/s of the shorter run); capture on/off = decode step time ratio per round, back to back.")


def _fmt(mr: dict, spec: str) -> str:
    if mr["n"] == 0:
        return "-"
    return f"{mr['median']:{spec}} [{mr['min']:{spec}}-{mr['max']:{spec}}]"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    main()
