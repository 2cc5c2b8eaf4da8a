"""`r3rl serve` under hostile or careless clients (issue 11): huge bodies, disconnects, bad Unicode, idle keep-alive
connections, a second signal, a checkpoint without a tokenizer, and the small protocol edges. Each test goes through
a real server process and fails without its fix.

    pytest tests/rollout/net/test_server_hardening.py -q
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import threading
import time

import httpx
import pytest

MAX_SEQ_LEN = 256


class HealthProbe:
    """Times `GET /health` in a background thread while something else runs."""

    def __init__(self, url: str) -> None:
        self.url, self.latencies, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self._stop.is_set():
                t0 = time.monotonic()
                assert http.get(f"{self.url}/health").status_code == 200
                self.latencies.append(time.monotonic() - t0)
                time.sleep(0.05)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)


# --- 1. big bodies: bounded, length-checked before per-token work, off the loop that answers /health ------------
# (before the fix: a 10 MB text body stalled /health for 15-19 s; the thresholds leave room for a busy CI machine)
@pytest.mark.parametrize(("body", "field"), [
    (b'{"text": "' + b"ab " * 3_500_000 + b'"}', "text"),  # 10.5 MB of text
    (b'{"input_ids": [' + b"1, " * 3_500_000 + b'1]}', "input_ids"),  # 3.5M tokens
])
def test_huge_prompts_are_refused_fast_and_health_stays_responsive(server, body, field):
    with HealthProbe(server.url) as probe:
        time.sleep(0.2)
        t0 = time.monotonic()
        resp = httpx.post(f"{server.url}/generate", content=body, timeout=120)
        elapsed = time.monotonic() - t0
        time.sleep(0.2)
    assert resp.status_code == 400 and resp.json()["error"]["field"] == field, resp.text[:300]
    assert elapsed < 10, f"refusing a {len(body) >> 20} MB prompt took {elapsed:.1f}s"
    assert max(probe.latencies) < 2.0, f"/health stalled {max(probe.latencies):.2f}s"


def test_bodies_over_the_limit_are_413(server_factory):
    srv = server_factory(extra_args=("--max-body-bytes", "100000"))
    resp = httpx.post(f"{srv.url}/generate", content=json.dumps({"input_ids": [1] * 50_000}), timeout=60)
    assert resp.status_code == 413 and resp.json()["error"]["field"] == "body", resp.text[:300]
    assert "max_body_bytes" in resp.json()["error"]["message"]
    assert httpx.get(f"{srv.url}/health").status_code == 200


# --- 2. a client that goes away frees its slots --------------------------------------------------------------------
def test_disconnected_clients_requests_are_cancelled(server_factory):
    srv = server_factory(max_slots=4, max_seq_len=2048)
    body = {"input_ids": [[1 + i, 2, 3] for i in range(4)], "sampling_params": {"max_new_tokens": 2000}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/generate", json=body, timeout=1.0)  # the client gives up and closes the connection
    deadline = time.monotonic() + 5
    while httpx.get(f"{srv.url}/server_info").json()["num_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{srv.url}/server_info").json()["num_running"] == 0
    assert "cancelled 4 requests whose client went away" in srv.log()
    t0 = time.monotonic()
    resp = httpx.post(f"{srv.url}/generate", json={"input_ids": [5], "sampling_params": {"max_new_tokens": 4}})
    assert resp.status_code == 200 and time.monotonic() - t0 < 5


# --- 3. a lone surrogate is a 400 naming the field, and the connection survives ----------------------------------
@pytest.mark.parametrize(("body", "field"), [
    (b'{"text": "a\\ud800b"}', "text"),
    (b'{"text": ["ok", "\\udfff"]}', "text[1]"),
    (b'{"input_ids": [1], "rid": "x\\ud800"}', "rid"),
])
def test_lone_surrogates_are_400_on_a_live_connection(server, body, field):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        resp = http.post("/generate", content=body)
        assert resp.status_code == 400 and resp.json()["error"]["field"] == field, resp.text
        assert http.post("/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 1}}).is_success


# --- 4. keep-alive: the server keeps idle connections longer than any client pool does ----------------------------
def test_idle_keep_alive_connection_outlives_the_client_pool_expiry(server):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().read() == b'{"status":"ok"}'
        sock = conn.sock
        time.sleep(6)  # past httpx's default pool expiry (5 s), uvicorn's default keep-alive (5 s)
        conn.request("GET", "/health")  # on the same socket: raises RemoteDisconnected if the server closed it
        assert conn.getresponse().status == 200 and conn.sock is sock
    finally:
        conn.close()


# --- 5. a second signal aborts in-flight requests with a JSON 503 and exits 128 + signal --------------------------
def test_second_sigint_answers_in_flight_requests_and_exits_cleanly(server_factory):
    srv = server_factory(max_slots=4, max_seq_len=2048)
    results: list = []

    def request(i: int) -> None:
        body = {"input_ids": [1 + i, 2], "sampling_params": {"max_new_tokens": 2000}}
        results.append(httpx.post(f"{srv.url}/generate", json=body, timeout=60))

    threads = [threading.Thread(target=request, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    srv.proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    srv.proc.send_signal(signal.SIGINT)
    for t in threads:
        t.join(60)
    code = srv.proc.wait(30)
    assert code == 128 + signal.SIGINT, srv.log()[-2000:]
    assert [r.status_code for r in results] == [503] * 3
    assert {r.json()["error"]["type"] for r in results} == {"RequestAborted"}
    assert "terminate called" not in srv.log() and "server stopped (forced by a second SIGINT)" in srv.log()


# --- 6. a checkpoint without a tokenizer ---------------------------------------------------------------------------
def test_checkpoint_without_tokenizer_refuses_text(server_factory, tiny_model_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    srv = server_factory(model_dir=bare)
    resp = httpx.post(f"{srv.url}/generate", json={"text": "hello"}, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["field"] == "text", resp.text
    assert "this checkpoint has no tokenizer" in resp.json()["error"]["message"]
    assert "has no usable tokenizer" in srv.log()
    ok = httpx.post(f"{srv.url}/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 2}})
    assert ok.status_code == 200 and ok.json()["text"] == ""


# --- 7. protocol edges ---------------------------------------------------------------------------------------------
def test_empty_rid_is_echoed_and_duplicate_rids_are_refused(server):
    out = httpx.post(f"{server.url}/generate", json={"input_ids": [1], "rid": "", "sampling_params":
                                                    {"max_new_tokens": 1}}).json()
    assert out["meta_info"]["id"] == ""
    resp = httpx.post(f"{server.url}/generate", json={"input_ids": [[1], [2], [3]], "rid": ["a", "b", "a"]})
    assert resp.status_code == 400 and resp.json()["error"]["field"] == "rid[2]", resp.text


def test_null_means_the_default_for_every_field(server):
    body = {"input_ids": [4, 5], "text": None, "rid": None, "return_logprob": None, "return_routed_experts": None,
            "routed_experts_format": None, "logprobs_at_temperature": None,
            "sampling_params": {"max_new_tokens": 3, "temperature": None, "top_p": None, "top_k": None,
                                "stop_token_ids": None, "seed": None, "sampling_seed": None}}
    resp = httpx.post(f"{server.url}/generate", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["meta_info"]["completion_tokens"] == 3 and "routed_experts" not in resp.json()["meta_info"]
    assert httpx.post(f"{server.url}/generate", json={"input_ids": None, "text": None}).status_code == 400


@pytest.mark.parametrize("temperature", [1e300, 1e7])
def test_temperature_beyond_float32_sense_is_refused(server, temperature):
    resp = httpx.post(f"{server.url}/generate", json={"input_ids": [1], "sampling_params": {"temperature":
                                                                                           temperature}})
    assert resp.status_code == 400 and resp.json()["error"]["field"] == "sampling_params.temperature", resp.text


def test_head_health(server):
    assert httpx.head(f"{server.url}/health").status_code == 200


# --- 4. retries: only what provably did not run is resent -----------------------------------------------------------
@pytest.mark.parametrize(("method", "responses", "n_calls", "ok"), [
    ("POST", [httpx.ConnectError("refused"), (200, {})], 2, True),  # never left the client
    ("POST", [(503, {"error": {"message": "stopping", "type": "ServiceUnavailable"}}), (200, {})], 2, True),
    ("POST", [(503, {"error": {"message": "step failed", "type": "EngineStepFailed"}})], 1, False),  # it ran
    ("POST", [(500, {"error": {"message": "bug", "type": "InternalServerError"}})], 1, False),
    ("POST", [httpx.ReadError("reset")], 1, False),  # sent: the server may be generating
    ("POST", [httpx.RemoteProtocolError("closed")], 1, False),
    ("GET", [httpx.ReadError("reset"), (500, {}), (200, {})], 3, True),  # read-only: safe to resend
])
def test_client_resends_only_requests_that_did_not_run(method, responses, n_calls, ok):
    import asyncio

    from r3rl.rollout.net.client import RolloutClient, RolloutServerError

    calls: list = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        item = responses[min(len(calls) - 1, len(responses) - 1)]
        if isinstance(item, Exception):
            raise item
        return httpx.Response(item[0], json=item[1])

    async def run():
        async with RolloutClient("http://mock", max_retries=2, backoff=0.0,
                                 transport=httpx.MockTransport(handler)) as client:
            return await client._request(method, "/generate", {} if method == "POST" else None)

    if ok:
        assert asyncio.run(run()) == {}
    else:
        with pytest.raises(RolloutServerError):
            asyncio.run(run())
    assert len(calls) == n_calls


def test_global_log_level_is_honoured_by_serve(server_factory):
    srv = server_factory(log_level="WARNING")
    body = {"input_ids": [1], "sampling_params": {"max_new_tokens": 1}}
    assert httpx.post(f"{srv.url}/generate", json=body).is_success
    srv.stop()
    log = srv.log()
    assert " INFO " not in log and "INFO:" not in log, log[-2000:]


@pytest.mark.parametrize(("flags", "named"), [
    (["--port", "99999"], "port"),
    (["--max-slots", "0"], "max_slots"),
    (["--dtype", "int8"], "int8"),
    (["--device", "nope"], "device"),
    (["--max-body-bytes", "0"], "max_body_bytes"),
    (["--kv-cache-tokens", "100"], "kv_cache_tokens must hold one request of max_seq_len=1024 tokens: got 100"),
    (["--kv-block-size", "0"], "block_size must be >= 1: got 0"),
    ([], "config.json"),
])
def test_bad_serve_flags_exit_2_before_loading(tmp_path, flags, named):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "r3rl.cli", "serve", "--model", str(tmp_path / "absent"), *flags],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
