"""Serving benchmark for `r3rl serve` (or any SGLang-compatible `/generate`), in the manner of SGLang's bench_serving.

    python bench/bench_serving.py --preset tiny-qwen3-moe --quick             # CPU smoke run (~20 s)
    python bench/bench_serving.py --preset probe-qwen3-moe --out serving.json # GPU: starts `r3rl serve` itself
    python bench/bench_serving.py --url http://127.0.0.1:30000                 # an already running server

Two loads, over HTTP on 127.0.0.1:
  - serving: at each `--concurrency` C, `--num-prompts` requests (default 4 x C, at least 8) of random prompts, C in
    flight at any time (a new one starts as one finishes; with `--request-rate`, requests also arrive as a Poisson
    process at that rate). Reported per level: request throughput, output tok/s,
    end-to-end latency, TTFT and inter-token latency p50/p99.
  - rl (GRPO-shaped): `--rl-prompts` P prompts x `--rl-samples` n samples, each prompt's group sent as one batch
    request (n copies of the prompt, distinct seeds) with `return_routed_experts` and `return_logprob`, all P groups
    in flight at once, as the trainer's rollout does. Reported: the rollout's wall time, samples/s, output tok/s, group
    latency p50/p99, and the routing bytes received.

What is measured, honestly: `r3rl serve` does not stream (`/generate` answers once, when the request is done), so
the client never sees a first token. TTFT is therefore reported as the full request latency (an upper bound), and
the inter-token latency as latency / output tokens per request (SGLang calls this TPOT; it includes the prefill
and the queueing). The JSON says so in `streaming: false`. Every request asks for exactly `--output-len` tokens (no
stop tokens). Prints a markdown table; `--out` writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

logger = logging.getLogger("bench_serving")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    p.add_argument("--preset", default="tiny-qwen3-moe", help="model preset for the started server (init-model)")
    p.add_argument("--model", default=None, help="checkpoint directory for the started server (instead of --preset)")
    p.add_argument("--device", default=None, help="started server's device (default: its own, cuda when available)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-slots", type=int, default=None, help="started server's engine slots")
    p.add_argument("--concurrency", nargs="+", type=int, default=None, help="levels (default 1 32 256)")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per level (default 4 x concurrency, >= 8)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 64")
    p.add_argument("--output-len", type=int, default=None, help="default 128")
    p.add_argument("--rl-prompts", type=int, default=None, help="RL load: prompts (default 32; 0 = skip the RL load)")
    p.add_argument("--rl-samples", type=int, default=None, help="RL load: samples per prompt, a GRPO group (default 8)")
    p.add_argument("--rl-prompt-len", type=int, default=None, help="RL load prompt length (default --prompt-len)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="serving load: Poisson arrivals at this many requests/s (default inf: all at once, bounded "
                        "by the concurrency)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--vocab", type=int, default=256, help="prompt token ids are drawn from [0, vocab)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=600.0, help="per HTTP request")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke sizes (explicit flags win): float32 on cpu, concurrency 1 8 32, prompt 16, 8 new "
                        "tokens, RL 4 x 4, 32 slots")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "r3rl_bench_serving.json"))
    args = p.parse_args(argv)
    defaults = dict(concurrency=[1, 32, 256], prompt_len=64, output_len=128, rl_prompts=32, rl_samples=8, max_slots=256)
    if args.quick:
        args.device, args.dtype = args.device or "cpu", args.dtype or "float32"
        defaults.update(concurrency=[1, 8, 32], prompt_len=16, output_len=8, rl_prompts=4, rl_samples=4, max_slots=32)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


@dataclass(kw_only=True)
class RequestResult:
    """One HTTP request (one prompt, or one GRPO group as a batch request)."""

    ok: bool
    """HTTP 200 with a well-formed answer."""
    latency_s: float
    """Client-side wall time from sending to the complete answer."""
    output_tokens: int = 0
    """Generated tokens over every item of the request."""
    prompt_tokens: int = 0
    """Prompt tokens over every item."""
    routed_bytes: int = 0
    """Bytes of `meta_info.routed_experts` received (base64 text)."""
    error: str = ""
    """What went wrong (status and body head), when not ok."""


@dataclass(kw_only=True)
class LevelReport:
    """One load level's numbers."""

    load: str
    """"serving" or "rl"."""
    concurrency: int
    """Requests in flight at a time."""
    requests: int
    """Requests sent."""
    failed: int
    """Requests that did not complete."""
    duration_s: float
    """Wall time from the first send to the last answer."""
    request_throughput: float
    """Completed requests / s (for rl: samples / s)."""
    output_tok_s: float
    """Generated tokens / s over the level."""
    input_tok_s: float
    """Prompt tokens / s over the level."""
    latency_ms: dict = field(default_factory=dict)
    """End-to-end request latency: mean, p50, p99."""
    ttft_ms: dict = field(default_factory=dict)
    """Time to first token. Without streaming: the full latency (see the module docstring)."""
    itl_ms: dict = field(default_factory=dict)
    """Inter-token latency. Without streaming: latency / output tokens per request (TPOT)."""
    routed_mb: float = 0.0
    """Routing payload received (MB of base64), rl load."""


# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = None if args.url else _start_server(args)
    url = args.url or server.url
    try:
        report = asyncio.run(run_all(url, args))
    finally:
        if server is not None:
            server.stop()
    print_table(report)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")
    return report


async def run_all(url: str, args) -> dict:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=max(args.concurrency + [args.rl_prompts, 1]), max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s, limits=limits) as client:
        info = (await client.get("/model_info")).json()
        await _one(client, _prompt(rng, args.prompt_len, args.vocab), args, seed=0)  # warm-up (graphs, allocator)
        levels = []
        for c in args.concurrency:
            n = args.num_prompts or max(4 * c, 8)
            prompts = [_prompt(rng, args.prompt_len, args.vocab) for _ in range(n)]
            levels.append(await serving_level(client, prompts, c, args))
            logger.info("%s", json.dumps(asdict(levels[-1])))
        if args.rl_prompts > 0:
            levels.append(await rl_level(client, rng, args))
            logger.info("%s", json.dumps(asdict(levels[-1])))
    return {"url": url, "model_info": info, "streaming": False,
            "measured": "no streaming: TTFT = full request latency; ITL = latency / output tokens per request",
            "args": {k: (None if v == float("inf") else v) for k, v in vars(args).items()},  # strict JSON
            "levels": [asdict(lv) for lv in levels]}


async def serving_level(client: httpx.AsyncClient, prompts: list[list[int]], concurrency: int, args) -> LevelReport:
    """`len(prompts)` single requests, at most `concurrency` in flight."""
    sem = asyncio.Semaphore(concurrency)
    rng = random.Random(args.seed + concurrency)
    arrivals, t = [], 0.0
    for _ in prompts:  # Poisson process: exponential gaps (all zero at an infinite rate)
        arrivals.append(t)
        t += rng.expovariate(args.request_rate) if args.request_rate != float("inf") else 0.0

    async def bounded(i: int, prompt: list[int]) -> RequestResult:
        await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
        async with sem:
            return await _one(client, prompt, args, seed=i)

    start = time.perf_counter()
    results = await asyncio.gather(*(bounded(i, p) for i, p in enumerate(prompts)))
    return _summarize("serving", concurrency, results, time.perf_counter() - start, samples_per_request=1)


async def rl_level(client: httpx.AsyncClient, rng: random.Random, args) -> LevelReport:
    """P GRPO groups, each one batch request of n samples of the same prompt, all in flight at once."""
    plen = args.rl_prompt_len or args.prompt_len
    groups = [_prompt(rng, plen, args.vocab) for _ in range(args.rl_prompts)]
    start = time.perf_counter()
    results = await asyncio.gather(*(_one(client, p, args, seed=1000 * g, n=args.rl_samples, routes=True)
                                     for g, p in enumerate(groups)))
    return _summarize("rl", args.rl_prompts, results, time.perf_counter() - start, samples_per_request=args.rl_samples)


async def _one(client: httpx.AsyncClient, prompt: list[int], args, *, seed: int, n: int = 1,
               routes: bool = False) -> RequestResult:
    sampling = [{"max_new_tokens": args.output_len, "temperature": args.temperature, "seed": seed + j}
                for j in range(n)]
    body = {"input_ids": [prompt] * n, "sampling_params": sampling}
    if routes:
        body.update(return_routed_experts=True, return_logprob=True)
    t = time.perf_counter()
    try:
        resp = await client.post("/generate", json=body)
        latency = time.perf_counter() - t
        if resp.status_code != 200:
            return RequestResult(ok=False, latency_s=latency, error=f"HTTP {resp.status_code}: {resp.text[:200]}")
        items = resp.json()
    except (httpx.HTTPError, ValueError) as e:
        return RequestResult(ok=False, latency_s=time.perf_counter() - t, error=f"{type(e).__name__}: {e}")
    return RequestResult(ok=True, latency_s=latency, output_tokens=sum(len(it["output_ids"]) for it in items),
                         prompt_tokens=sum(it["meta_info"]["prompt_tokens"] for it in items),
                         routed_bytes=sum(len(it["meta_info"].get("routed_experts") or "") for it in items))


def _summarize(load: str, concurrency: int, results: list[RequestResult], duration: float, *,
               samples_per_request: int) -> LevelReport:
    ok = [r for r in results if r.ok]
    for r in results:
        if not r.ok:
            logger.error("%s request failed: %s", load, r.error)
    lat = np.array([r.latency_s * 1e3 for r in ok]) if ok else np.array([np.nan])
    per_tok = np.array([r.latency_s * 1e3 / (r.output_tokens / samples_per_request) for r in ok if r.output_tokens])
    return LevelReport(
        load=load, concurrency=concurrency, requests=len(results), failed=len(results) - len(ok), duration_s=duration,
        request_throughput=len(ok) * samples_per_request / duration,
        output_tok_s=sum(r.output_tokens for r in ok) / duration,
        input_tok_s=sum(r.prompt_tokens for r in ok) / duration,
        latency_ms=_stats(lat), ttft_ms=_stats(lat), itl_ms=_stats(per_tok if per_tok.size else np.array([np.nan])),
        routed_mb=sum(r.routed_bytes for r in ok) / 1e6)


def _stats(x: np.ndarray) -> dict:
    return {"mean": float(np.mean(x)), "p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99))}


def _prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(length)]


def print_table(report: dict) -> None:
    a, info = report["args"], report["model_info"]
    print(f"\n## Serving: {report['url']} ({info.get('model_path')}, {info.get('device')}, {info.get('dtype')}), "
          f"prompt {a['prompt_len']}, {a['output_len']} new tokens, temperature {a['temperature']}, request rate "
          f"{a['request_rate'] or 'inf'}/s\n")
    print("| load | concurrency | requests | failed | req/s | output tok/s | latency p50 / p99 ms | "
          "TTFT* p50 / p99 ms | ITL* p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for lv in report["levels"]:
        load = "serving" if lv["load"] == "serving" else f"rl ({a['rl_prompts']} x {a['rl_samples']})"
        rate = f"{lv['request_throughput']:.2f}" + (" samples/s" if lv["load"] == "rl" else "")
        print(f"| {load} | {lv['concurrency']} | {lv['requests']} | {lv['failed']} | {rate} | "
              f"{lv['output_tok_s']:.0f} | {lv['latency_ms']['p50']:.0f} / {lv['latency_ms']['p99']:.0f} | "
              f"{lv['ttft_ms']['p50']:.0f} / {lv['ttft_ms']['p99']:.0f} | "
              f"{lv['itl_ms']['p50']:.2f} / {lv['itl_ms']['p99']:.2f} |")
    rl = [lv for lv in report["levels"] if lv["load"] == "rl"]
    if rl:
        print(f"\nrl: one batch request per GRPO group, routes + logprobs returned; rollout wall time "
              f"{rl[0]['duration_s']:.2f} s, routing payload {rl[0]['routed_mb']:.2f} MB.")
    print("\n* not streamed: `r3rl serve` answers /generate once, so TTFT is the full request latency (an upper "
          "bound) and ITL is latency / output tokens per request (TPOT, prefill and queueing included).")


# --- server process ------------------------------------------------------------------------------------------------
@dataclass
class _Server:
    url: str
    proc: subprocess.Popen
    log_path: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start_server(args, startup_timeout: float = 600.0) -> _Server:
    model = args.model
    if model is None:
        from r3rl.models.presets import init_model

        model = str(init_model(args.preset, tempfile.mkdtemp(prefix=f"bench_serving_{args.preset}_")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    max_seq_len = max(args.prompt_len, args.rl_prompt_len or 0) + args.output_len
    cmd = [sys.executable, "-m", "r3rl.cli", "--log-level", "WARNING", "serve", "--model", model, "--host",
           "127.0.0.1", "--port", str(port), "--max-slots", str(args.max_slots), "--max-seq-len", str(max_seq_len)]
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--dtype", args.dtype] if args.dtype else []
    log_path = os.path.join(tempfile.mkdtemp(prefix="bench_serving_log_"), "server.log")
    log = open(log_path, "w")  # noqa: SIM115 - the child writes to it for its whole life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = _Server(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path)
    logger.info("started r3rl serve (pid %d) on %s, log %s", proc.pid, server.url, log_path)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"r3rl serve exited with {proc.returncode} during startup; log tail:\n"
                               f"{_tail(log_path)}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"r3rl serve did not answer /health within {startup_timeout:.0f} s (log {log_path})")


def _tail(path: str, chars: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


if __name__ == "__main__":
    main()
