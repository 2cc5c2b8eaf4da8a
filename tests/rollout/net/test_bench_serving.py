"""bench/bench_serving.py on CPU: a real `r3rl serve` of the tiny preset, started by the benchmark, answers every
request of each load with the asked number of tokens; a request that fails is counted as failed, not dropped.

    pytest tests/rollout/net/test_bench_serving.py -q
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[3] / "bench" / "bench_serving.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_serving", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_serving"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_against_a_started_server(tmp_path, capsys):
    out = tmp_path / "serving.json"
    report = _bench().main(["--preset", "tiny-qwen3-moe", "--quick", "--concurrency", "1", "4", "--num-prompts", "6",
                            "--rl-prompts", "2", "--rl-samples", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == report and report["streaming"] is False
    serving = [lv for lv in report["levels"] if lv["load"] == "serving"]
    rl = [lv for lv in report["levels"] if lv["load"] == "rl"]
    assert [lv["concurrency"] for lv in serving] == [1, 4] and len(rl) == 1
    for lv in serving:
        assert lv["failed"] == 0 and lv["requests"] == 6
        assert round(lv["output_tok_s"] * lv["duration_s"]) == 6 * 8  # every request got --output-len tokens
        assert lv["ttft_ms"] == lv["latency_ms"]  # not streamed: said, not hidden
    assert rl[0]["failed"] == 0 and round(rl[0]["output_tok_s"] * rl[0]["duration_s"]) == 2 * 3 * 8
    assert rl[0]["routed_mb"] > 0, "the RL load asks for the routes"
    for lv in report["levels"]:  # the server's own view of each level, from /server_info engine_stats
        sv = lv["server"]
        assert sv["steps"] >= 7 and sv["mean_batch"] >= 1 and sv["mean_step_ms"] > 0, sv
        assert 0 < sv["prefill_step_share"] <= 1 and sv["max_hold_steps"] == 0  # CPU: no holding
    assert report["levels"][1]["server"]["mean_batch"] > report["levels"][0]["server"]["mean_batch"]
    table = capsys.readouterr().out
    assert "| rl (2 x 3) |" in table and "not streamed" in table and "Server's engine worker" in table


def test_server_delta_needs_both_snapshots():
    bench = _bench()
    snap = {"steps": 10, "prefill_steps": 2, "admitted": 4, "finished": 4, "generated_tokens": 40, "step_s": 0.1,
            "prefill_step_s": 0.04, "decoded_rows": 40, "idle_s": 0.5, "uptime_s": 1.0}
    later = {**snap, "steps": 20, "prefill_steps": 3, "step_s": 0.3, "prefill_step_s": 0.09, "decoded_rows": 60,
             "uptime_s": 2.0}
    d = bench.server_delta(snap, later)
    assert d["steps"] == 10 and d["mean_batch"] == 2.0 and abs(d["mean_prefill_step_ms"] - 50.0) < 1e-9
    assert abs(d["mean_decode_only_step_ms"] - 1e3 * (0.2 - 0.05) / 9) < 1e-9
    assert bench.server_delta({}, later) == {} and bench.server_delta(snap, {"steps": 1}) == {}


def test_failed_requests_are_counted():
    bench = _bench()
    args = bench.parse_args(["--url", "http://127.0.0.1:9", "--output-len", "4", "--timeout-s", "2"])

    async def go():
        client = bench.RawClient(args.url, timeout_s=2)
        try:
            return await bench.serving_level(client, [[1, 2, 3]] * 3, 2, args)
        finally:
            await client.close()

    level = asyncio.run(go())
    assert level.failed == 3 and level.requests == 3 and level.output_tok_s == 0


def test_raw_client_reads_both_framings_reuses_connections_and_fails_clearly():
    """The benchmark's HTTP client against a real socket server: Content-Length and chunked bodies, keep-alive reuse
    (one connection for sequential requests), `Connection: close` honored, and a malformed answer -> HttpError."""
    bench = _bench()
    answers = [b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{\"a\":1}",
               b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n"
               b"3\r\n{\"b\r\n4\r\n\":2}\r\n0\r\n\r\n",
               b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n[]",
               b"garbage\r\n\r\n"]
    connections = []

    async def handle(reader, writer):
        connections.append(writer)
        while answers:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            answer = answers.pop(0)
            writer.write(answer)
            await writer.drain()
            if b"connection: close" in answer:
                writer.close()
                return

    async def go():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = bench.RawClient(f"http://127.0.0.1:{port}", timeout_s=5)
        got = [await client.request("POST", "/generate", {"x": 1}) for _ in range(3)]
        assert len(connections) == 1, "keep-alive: sequential requests share one connection"
        with pytest.raises(bench.HttpError, match="not an HTTP/1.x status line"):
            await client.request("GET", "/model_info")
        assert len(connections) == 2, "the closed connection was not reused"
        await client.close()
        server.close()
        return got

    assert asyncio.run(go()) == [(200, b'{"a":1}'), (503, b'{"b":2}'), (200, b"[]")]
    with pytest.raises(ValueError, match="url must be"):
        bench.RawClient("https://x", timeout_s=1)
