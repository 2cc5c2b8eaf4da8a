"""`r3rl serve` against a caller who is not its trainer (issue 20): nobody takes over the weights. Every test goes
through a real server process on 127.0.0.1 and fails on the code before the fix.

- The update group: a server only joins (rank 0 is the trainer), values are checked before any rendezvous, one
  rendezvous at a time, bounded, and a stop does not wait for it.
- `--api-key`: the admin endpoints require it; `/generate` too with `--require-api-key-for-generate`.
- `/update_weights_from_disk` checks config.json and the safetensors headers before it allocates the model.
- Hygiene: a disconnect mid-upload is one log line, a stalled body is a 408, `weight_version` is ASCII int64.

    pytest tests/rollout/net/test_server_security.py -q
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from r3rl.rollout.net.client import RolloutClient

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DIST_TIMEOUT_S = 3.0
BODY_TIMEOUT_S = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def srv(request, tiny_model_dir, tmp_path_factory):
    """A server with an API key that /generate does not need, short sync and body timeouts."""
    here = str(Path(__file__).parents[1] / "conftest.py")  # tests/rollout/conftest.py, whatever name it got
    conftest = next(p for p in request.config.pluginmanager.get_plugins() if getattr(p, "__file__", None) == here)
    s = conftest.start_server(tiny_model_dir, tmp_path_factory.mktemp("secure") / "server.log",
                     extra_args=("--api-key", KEY, "--dist-timeout-s", str(DIST_TIMEOUT_S),
                                 "--body-read-timeout-s", str(BODY_TIMEOUT_S)))
    yield s
    s.stop()


def _init_body(**kw) -> dict:
    return {"master_address": "127.0.0.1", "master_port": free_port(), "rank_offset": 1, "world_size": 2,
            "backend": "gloo", **kw}


def _model_names(url: str) -> list[str]:
    return list(load_file(str(_model_file(url))))


def _model_file(url: str) -> Path:
    return Path(httpx.get(f"{url}/model_info").json()["model_path"]) / "model.safetensors"


def _greedy(url: str) -> list[int]:
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    resp = httpx.post(f"{url}/generate", json=body, headers=AUTH, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


# --- 1. the update group ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("edit", "field"), [
    ({"rank_offset": 0, "world_size": 1}, "world_size"),  # the take-over of issue 20: root of a group of one
    ({"rank_offset": 0, "world_size": 2}, "rank_offset"),  # rank 0 hosts the store: the trainer's
    ({"rank_offset": 2, "world_size": 2}, "rank_offset"),
    ({"backend": "mpi"}, "backend"),  # hung before the fix: refused before any rendezvous
    ({"backend": "nccl"}, "backend"),  # a CPU engine cannot join an NCCL group
    ({"master_port": 0}, "master_port"),
    ({"master_port": "29500"}, "master_port"),  # raw pydantic dumps before the fix
    ({"master_address": None}, "master_address"),
    ({"tp_size": 2}, "tp_size"),
])
def test_a_server_only_joins_a_valid_group_and_says_why_not(srv, edit, field):
    body = {k: v for k, v in _init_body(**edit).items() if v is not None}
    t0 = time.monotonic()
    resp = httpx.post(f"{srv.url}/init_weights_update_group", json=body, headers=AUTH, timeout=60)
    assert resp.status_code == 400 and not resp.json()["success"], resp.text
    message = resp.json()["message"]
    assert f"init_weights_update_group: {field}: " in message and "\n" not in message, message
    assert "validation error" not in message, message
    assert time.monotonic() - t0 < 2.0, "refused before any rendezvous"
    if edit.get("rank_offset") == 0:  # the server did not become the root: nothing listens on the port
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", body["master_port"]), 1):
            pass


def test_without_a_group_weights_cannot_be_pushed(srv):
    before = _greedy(srv.url)
    httpx.post(f"{srv.url}/init_weights_update_group", json=_init_body(rank_offset=0, world_size=1), headers=AUTH)
    names = _model_names(srv.url)
    body = {"names": names, "dtypes": ["float32"] * len(names), "shapes": [[1]] * len(names)}
    resp = httpx.post(f"{srv.url}/update_weights_from_distributed", json=body, headers=AUTH, timeout=60)
    assert resp.status_code == 400 and "group_name: no update group" in resp.json()["message"], resp.text
    assert _greedy(srv.url) == before


def test_one_bounded_rendezvous_at_a_time_and_the_pool_stays_free(srv):
    """Before the fix, seven calls with an unreachable master held request threads for >= 600 s."""
    port = free_port()  # nobody listens: the rendezvous waits for its timeout
    results: dict[int, tuple[httpx.Response, float]] = {}

    def join(i: int) -> None:
        t0 = time.monotonic()
        r = httpx.post(f"{srv.url}/init_weights_update_group", json=_init_body(master_port=port), headers=AUTH,
                       timeout=60)
        results[i] = (r, time.monotonic() - t0)

    threads = [threading.Thread(target=join, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    time.sleep(0.5)
    # a big body goes through the request thread pool: answered while a rendezvous waits
    big = json.dumps({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}).encode() + b" " * 100_000
    t0 = time.monotonic()
    assert httpx.post(f"{srv.url}/generate", content=big, timeout=30).status_code == 200
    assert time.monotonic() - t0 < DIST_TIMEOUT_S
    for t in threads:
        t.join(60)
    codes = sorted(r.status_code for r, _ in results.values())
    assert codes == [409, 409, 409, 409, 504], [r.text for r, _ in results.values()]
    for r, elapsed in results.values():
        if r.status_code == 409:
            assert elapsed < 2.0 and "one at a time" in r.json()["message"], r.text
        else:
            assert elapsed < DIST_TIMEOUT_S + 10, elapsed
            assert f"127.0.0.1:{port}" in r.json()["message"] and "dist_timeout_s" in r.json()["message"]
            assert "\n" not in r.json()["message"]


def test_sigterm_ends_a_server_stuck_in_a_rendezvous(server_factory):
    """Before the fix, SIGTERM took 19.7 minutes: the drain and the interpreter waited for the rendezvous."""
    s = server_factory(extra_args=("--dist-timeout-s", "300"))
    out: list = []
    t = threading.Thread(target=lambda: out.append(httpx.post(
        f"{s.url}/init_weights_update_group", json=_init_body(), timeout=60)))
    t.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    code = s.proc.wait(30)
    t.join(10)
    assert time.monotonic() - t0 < 10, f"SIGTERM took {time.monotonic() - t0:.1f}s"
    assert code == 0, s.log()[-2000:]
    assert out and out[0].status_code == 503 and "server is stopping" in out[0].json()["message"]


# --- 2. the API key ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/update_weights_from_disk", "/init_weights_update_group",
                                  "/update_weights_from_distributed"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_admin_endpoints_require_the_api_key(srv, path, headers):
    resp = httpx.post(f"{srv.url}{path}", json={}, headers=headers, timeout=60)
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["type"] == "AuthenticationError" and resp.headers["www-authenticate"] == "Bearer"
    assert KEY not in resp.text


def test_the_api_key_opens_the_admin_endpoints_and_is_never_shown(srv, tiny_model_dir):
    resp = httpx.post(f"{srv.url}/update_weights_from_disk", json={"model_path": str(tiny_model_dir)}, headers=AUTH,
                      timeout=120)
    assert resp.status_code == 200 and resp.json()["success"], resp.text
    info = httpx.get(f"{srv.url}/server_info").json()
    assert info["api_key_set"] is True and KEY not in json.dumps(info)
    # /generate, /health and /model_info stay open without --require-api-key-for-generate
    assert httpx.post(f"{srv.url}/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 1}})\
        .status_code == 200
    assert httpx.get(f"{srv.url}/health").status_code == 200
    assert httpx.get(f"{srv.url}/model_info").status_code == 200

    async def push() -> dict:  # the trainer's client sends the key ($R3RL_API_KEY or api_key=)
        async with RolloutClient(srv.url, api_key=KEY, max_retries=0) as client:
            return await client._request("POST", "/update_weights_from_disk",
                                         {"model_path": str(tiny_model_dir), "weight_version": "41"}, idempotent=False)

    assert asyncio.run(push())["weight_version"] == 41


def test_generate_can_require_the_api_key(server_factory, monkeypatch):
    monkeypatch.setenv("R3RL_API_KEY", KEY)  # the key from the environment (kept out of the process list)
    s = server_factory(extra_args=("--require-api-key-for-generate",))
    body = {"input_ids": [1], "sampling_params": {"max_new_tokens": 1}}
    assert httpx.post(f"{s.url}/generate", json=body).status_code == 401
    assert httpx.post(f"{s.url}/generate", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.post(f"{s.url}/generate", json=body, headers=AUTH).status_code == 200
    assert httpx.post(f"{s.url}/update_weights_from_disk", json={}).status_code == 401
    assert httpx.get(f"{s.url}/health").status_code == 200


# --- 3. /update_weights_from_disk checks before it allocates ----------------------------------------------------------
def _checkpoint(src, dst, *, config=None, tensors=None):
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    if tensors is not None:
        save_file(tensors(load_file(str(dst / "model.safetensors"))), str(dst / "model.safetensors"))
    return dst


def _grow(name):
    def edit(sd):
        sd[name] = torch.zeros(sd[name].shape[0] * 50, *sd[name].shape[1:])
        return sd
    return edit


@pytest.mark.parametrize(("config", "tensors", "named"), [
    # the config of a far bigger model next to tiny weights: 75 s and 6.8 GB before the fix (smaller here)
    ({"hidden_size": 512, "vocab_size": 20_000}, None, ["config.json", "hidden_size (got 512, expected 64)",
                                                        "vocab_size (got 20000, expected 320)"]),
    ({"num_hidden_layers": 40}, None, ["num_hidden_layers (got 40, expected 4)"]),
    ({"model_type": "mixtral"}, None, ["model_type (got 'mixtral', expected 'qwen3_moe')"]),
    (None, lambda sd: {**sd, "junk": torch.zeros(4_000_000)}, ["safetensors files must hold at most"]),
    (None, _grow("model.embed_tokens.weight"), ["safetensors headers", "model.embed_tokens.weight (got (16000, 64)"]),
])
def test_a_checkpoint_that_is_not_the_served_model_is_refused_before_loading(srv, tiny_model_dir, tmp_path, config,
                                                                            tensors, named):
    path = _checkpoint(tiny_model_dir, tmp_path / "ckpt", config=config, tensors=tensors)
    version = httpx.get(f"{srv.url}/model_info").json()["weight_version"]
    resp = httpx.post(f"{srv.url}/update_weights_from_disk", json={"model_path": str(path)}, headers=AUTH,
                      timeout=120)
    assert resp.status_code == 400 and not resp.json()["success"], resp.text
    for part in named:
        assert part in resp.json()["message"], resp.json()["message"]
    assert httpx.get(f"{srv.url}/model_info").json()["weight_version"] == version


# --- 4. hygiene -------------------------------------------------------------------------------------------------------
def _raw(url: str, data: bytes, *, close: bool) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=15)
    sock.sendall(data)
    if close:
        sock.close()
    return sock


@pytest.mark.parametrize("path", ["/generate", "/update_weights_from_disk"])
def test_a_disconnect_during_the_upload_is_one_log_line(srv, path):
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 100000\r\n\r\n").encode()
    before = srv.log()
    for _ in range(3):
        _raw(srv.url, head + b'{"input_ids": [1, 2', close=True)
    time.sleep(1.0)
    new = srv.log()[len(before):]
    assert new.count(f"client went away during the body upload of {path}") == 3, new[-3000:]
    assert "Traceback" not in new and "ERROR" not in new, new[-3000:]
    assert httpx.get(f"{srv.url}/health").status_code == 200


def test_a_stalled_body_is_408_and_the_connection_closed(srv):
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    t0 = time.monotonic()
    sock = _raw(srv.url, head + b'{"input_ids": [1', close=False)
    try:
        data = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            data += chunk
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:300]
    assert b"body_read_timeout_s" in data
    assert BODY_TIMEOUT_S - 0.5 < time.monotonic() - t0 < BODY_TIMEOUT_S + 8


@pytest.mark.parametrize("version", ["\u0663", "1" + "0" * 30, str(2**63), "-1", "", " 7", "7.0", "\uff17"])
def test_weight_version_is_ascii_digits_within_int64(srv, tiny_model_dir, version):
    before = httpx.get(f"{srv.url}/model_info").json()["weight_version"]
    resp = httpx.post(f"{srv.url}/update_weights_from_disk", json={"model_path": str(tiny_model_dir),
                                                                     "weight_version": version},
                      headers=AUTH, timeout=120)
    assert resp.status_code == 400 and "weight_version" in resp.json()["message"], resp.text
    names = _model_names(srv.url)
    body = {"names": names, "dtypes": ["float32"] * len(names), "shapes": [[1]] * len(names),
            "weight_version": version}
    resp = httpx.post(f"{srv.url}/update_weights_from_distributed", json=body, headers=AUTH, timeout=60)
    assert resp.status_code == 400 and "weight_version" in resp.json()["message"], resp.text
    assert httpx.get(f"{srv.url}/model_info").json()["weight_version"] == before


def test_the_largest_int64_weight_version_is_accepted(srv, tiny_model_dir):
    resp = httpx.post(f"{srv.url}/update_weights_from_disk", json={"model_path": str(tiny_model_dir),
                                                                     "weight_version": str(2**63 - 1)},
                      headers=AUTH, timeout=120)
    assert resp.status_code == 200 and resp.json()["weight_version"] == 2**63 - 1, resp.text
