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

The client is a minimal asyncio HTTP/1.1 keep-alive client (`RawClient`), not httpx: httpx's pool costs ~20 ms of
CPU per request at 256 connections, which capped every level at ~45 requests/s (5.4k tok/s at 128 tokens) whatever
the server did. The client's own CPU time is reported (`client_cpu_s` per level) so a client bottleneck shows.
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
import urllib.parse
from dataclasses import asdict, dataclass, field

import numpy as np

from r3rl.rollout.net.client import wait_until_healthy

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
    p.add_argument("--max-hold-steps", type=int, default=None,
                   help="started server: engine steps a new request may be held so admissions come in batches "
                        "(serve --max-hold-steps; default: the server's, 0 = off)")
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
    client_cpu_s: float = 0.0
    """CPU seconds the benchmark client itself spent on the level; near duration_s means the client was the limit."""
    server: dict = field(default_factory=dict)
    """The server's engine worker over the level (`r3rl serve`'s /server_info engine_stats, differenced; empty for
    a server without them): steps/s, mean decode batch, share of steps that prefilled, step times, idle share."""


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
    client = RawClient(url, timeout_s=args.timeout_s)
    try:
        status, payload = await client.request("GET", "/model_info")
        if status != 200:
            raise HttpError(f"GET /model_info answered HTTP {status}: {payload[:200]!r}")
        info = json.loads(payload)
        await _one(client, _prompt(rng, args.prompt_len, args.vocab), args, seed=0)  # warm-up (graphs, allocator)
        levels = []
        for c in args.concurrency:
            n = args.num_prompts or max(4 * c, 8)
            prompts = [_prompt(rng, args.prompt_len, args.vocab) for _ in range(n)]
            before = await _engine_stats(client)
            levels.append(await serving_level(client, prompts, c, args))
            levels[-1].server = server_delta(before, await _engine_stats(client))
            logger.info("%s", json.dumps(asdict(levels[-1])))
        if args.rl_prompts > 0:
            before = await _engine_stats(client)
            levels.append(await rl_level(client, rng, args))
            levels[-1].server = server_delta(before, await _engine_stats(client))
            logger.info("%s", json.dumps(asdict(levels[-1])))
    finally:
        await client.close()
    return {"url": url, "model_info": info, "streaming": False,
            "measured": "no streaming: TTFT = full request latency; ITL = latency / output tokens per request",
            "args": {k: (None if v == float("inf") else v) for k, v in vars(args).items()},  # strict JSON
            "levels": [asdict(lv) for lv in levels]}


async def serving_level(client: RawClient, prompts: list[list[int]], concurrency: int, args) -> LevelReport:
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

    start, cpu = time.perf_counter(), time.process_time()
    results = await asyncio.gather(*(bounded(i, p) for i, p in enumerate(prompts)))
    return _summarize("serving", concurrency, results, time.perf_counter() - start, samples_per_request=1,
                      client_cpu_s=time.process_time() - cpu)


async def rl_level(client: RawClient, rng: random.Random, args) -> LevelReport:
    """P GRPO groups, each one batch request of n samples of the same prompt, all in flight at once."""
    plen = args.rl_prompt_len or args.prompt_len
    groups = [_prompt(rng, plen, args.vocab) for _ in range(args.rl_prompts)]
    start, cpu = time.perf_counter(), time.process_time()
    results = await asyncio.gather(*(_one(client, p, args, seed=1000 * g, n=args.rl_samples, routes=True)
                                     for g, p in enumerate(groups)))
    return _summarize("rl", args.rl_prompts, results, time.perf_counter() - start, samples_per_request=args.rl_samples,
                      client_cpu_s=time.process_time() - cpu)


async def _one(client: RawClient, prompt: list[int], args, *, seed: int, n: int = 1,
               routes: bool = False) -> RequestResult:
    sampling = [{"max_new_tokens": args.output_len, "temperature": args.temperature, "seed": seed + j}
                for j in range(n)]
    body = {"input_ids": [prompt] * n, "sampling_params": sampling}
    if routes:
        body.update(return_routed_experts=True, return_logprob=True)
    t = time.perf_counter()
    try:
        status, payload = await client.request("POST", "/generate", body)
        latency = time.perf_counter() - t
        if status != 200:
            return RequestResult(ok=False, latency_s=latency, error=f"HTTP {status}: {payload[:200]!r}")
        items = json.loads(payload)
    except (HttpError, ValueError) as e:
        return RequestResult(ok=False, latency_s=time.perf_counter() - t, error=f"{type(e).__name__}: {e}")
    return RequestResult(ok=True, latency_s=latency, output_tokens=sum(len(it["output_ids"]) for it in items),
                         prompt_tokens=sum(it["meta_info"]["prompt_tokens"] for it in items),
                         routed_bytes=sum(len(it["meta_info"].get("routed_experts") or "") for it in items))


def _summarize(load: str, concurrency: int, results: list[RequestResult], duration: float, *,
               samples_per_request: int, client_cpu_s: float = 0.0) -> LevelReport:
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
        routed_mb=sum(r.routed_bytes for r in ok) / 1e6, client_cpu_s=client_cpu_s)


async def _engine_stats(client: RawClient) -> dict:
    """`engine_stats` of /server_info, or {} (another server, or an older r3rl)."""
    try:
        status, payload = await client.request("GET", "/server_info")
        if status != 200:
            return {}
        return json.loads(payload).get("engine_stats") or {}
    except (HttpError, ValueError, AttributeError):
        return {}


def server_delta(before: dict, after: dict) -> dict:
    """What the server's engine worker did between two `engine_stats` snapshots."""
    keys = ("steps", "prefill_steps", "admitted", "finished", "generated_tokens", "step_s", "prefill_step_s",
            "decoded_rows", "idle_s", "uptime_s")
    if not before or not after or any(k not in before or k not in after for k in keys):
        return {}
    d = {k: after[k] - before[k] for k in keys}
    steps, prefills, rows, prefill_s = d["steps"], d["prefill_steps"], d["decoded_rows"], d["prefill_step_s"]
    return {
        "steps": steps, "steps_per_s": steps / d["uptime_s"] if d["uptime_s"] else 0.0,
        "mean_batch": rows / steps if steps else 0.0,
        "prefill_step_share": prefills / steps if steps else 0.0,
        "admitted_per_prefill": d["admitted"] / prefills if prefills else 0.0,
        "mean_step_ms": 1e3 * d["step_s"] / steps if steps else 0.0,
        "mean_decode_only_step_ms": 1e3 * (d["step_s"] - prefill_s) / (steps - prefills) if steps > prefills else 0.0,
        "mean_prefill_step_ms": 1e3 * prefill_s / prefills if prefills else 0.0,
        "engine_busy_share": d["step_s"] / d["uptime_s"] if d["uptime_s"] else 0.0,
        "idle_share": d["idle_s"] / d["uptime_s"] if d["uptime_s"] else 0.0,
        "max_hold_steps": after.get("max_hold_steps"),
    }


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
          "TTFT* p50 / p99 ms | ITL* p50 / p99 ms | client CPU s / wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for lv in report["levels"]:
        load = "serving" if lv["load"] == "serving" else f"rl ({a['rl_prompts']} x {a['rl_samples']})"
        rate = f"{lv['request_throughput']:.2f}" + (" samples/s" if lv["load"] == "rl" else "")
        print(f"| {load} | {lv['concurrency']} | {lv['requests']} | {lv['failed']} | {rate} | "
              f"{lv['output_tok_s']:.0f} | {lv['latency_ms']['p50']:.0f} / {lv['latency_ms']['p99']:.0f} | "
              f"{lv['ttft_ms']['p50']:.0f} / {lv['ttft_ms']['p99']:.0f} | "
              f"{lv['itl_ms']['p50']:.2f} / {lv['itl_ms']['p99']:.2f} | "
              f"{lv['client_cpu_s']:.1f} / {lv['duration_s']:.1f} |")
    if any(lv.get("server") for lv in report["levels"]):
        print("\nServer's engine worker per level (/server_info engine_stats): steps/s, mean decode batch, steps "
              "that also prefilled, step ms (all / decode only / with prefill), engine busy share (in engine.step)")
        print("\n| load | concurrency | steps/s | mean batch | prefill steps | admitted per prefill | step ms | "
              "decode-only ms | prefill-step ms | engine busy | max hold steps |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for lv in report["levels"]:
            sv = lv.get("server") or {}
            if sv:
                print(f"| {lv['load']} | {lv['concurrency']} | {sv['steps_per_s']:.0f} | {sv['mean_batch']:.1f} | "
                      f"{100 * sv['prefill_step_share']:.0f}% | {sv['admitted_per_prefill']:.1f} | "
                      f"{sv['mean_step_ms']:.2f} | {sv['mean_decode_only_step_ms']:.2f} | "
                      f"{sv['mean_prefill_step_ms']:.2f} | {100 * sv['engine_busy_share']:.0f}% | "
                      f"{sv['max_hold_steps']} |")
    rl = [lv for lv in report["levels"] if lv["load"] == "rl"]
    if rl:
        print(f"\nrl: one batch request per GRPO group, routes + logprobs returned; rollout wall time "
              f"{rl[0]['duration_s']:.2f} s, routing payload {rl[0]['routed_mb']:.2f} MB.")
    print("\n* not streamed: `r3rl serve` answers /generate once, so TTFT is the full request latency (an upper "
          "bound) and ITL is latency / output tokens per request (TPOT, prefill and queueing included).")


# --- HTTP client ---------------------------------------------------------------------------------------------------
class HttpError(RuntimeError):
    """The connection failed or the answer was not HTTP/1.1 (refused, reset, timed out, malformed)."""


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: one connection per request in flight, reused.

    The benchmark's own cost must stay far below the server's: httpx spends about 20 ms of CPU per request at 256
    connections (its pool's bookkeeping), which on a small host made the client, not the server, the bottleneck.
    This one costs a header parse and a `json.loads` per answer."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"url must be http://host[:port]: got {url!r}")
        self.host, self.port, self.timeout_s = u.hostname, u.port or 80, timeout_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(self, method: str, path: str, body: object = None) -> tuple[int, bytes]:
        """(status, body bytes); raises HttpError."""
        data = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout_s)
            conn[1].write(head + data)
            status, payload, keep = await asyncio.wait_for(_read_response(conn[0]), self.timeout_s)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
            if conn is not None:
                conn[1].close()
            raise HttpError(f"{method} {path}: {type(e).__name__}: {e}") from None
        if keep:
            self._idle.append(conn)
        else:
            conn[1].close()
        return status, payload

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """One HTTP/1.1 response: (status, body, the connection can be reused)."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        payload = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")  # no trailers sent by uvicorn: the empty line
        payload = b"".join(chunks)
    else:
        raise ValueError("response has neither Content-Length nor chunked encoding")
    return int(parts[1]), payload, headers.get("connection", "").lower() != "close"


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
    cmd += ["--max-hold-steps", str(args.max_hold_steps)] if args.max_hold_steps is not None else []
    log_path = os.path.join(tempfile.mkdtemp(prefix="bench_serving_log_"), "server.log")
    log = open(log_path, "w")  # noqa: SIM115 - the child writes to it for its whole life
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = _Server(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path)
    logger.info("started r3rl serve (pid %d) on %s, log %s", proc.pid, server.url, log_path)
    try:
        wait_until_healthy(server.url, timeout_s=startup_timeout, proc=proc)
    except RuntimeError as e:
        server.stop()
        raise RuntimeError(f"{e}; log {log_path} ends:\n{_tail(log_path)}") from None
    return server


def _tail(path: str, chars: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


if __name__ == "__main__":
    main()
