"""`r3rl serve` over real HTTP: protocol, routed experts, replay of the served trace, bad input, load, shutdown.

    pytest tests/rollout/net/test_server.py -q          # about a minute on 2 CPU cores

Every test talks to a real `r3rl serve` process on 127.0.0.1 (conftest.py) serving a tiny random
Qwen3-MoE checkpoint; the client tests at the end also use httpx.MockTransport for retry behaviour.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from r3rl.check import ReplayCheck
from r3rl.models import load_model
from r3rl.replay import RoutingReplay
from r3rl.rollout.net.client import ModelShape, RolloutClient, RolloutRequestError, RolloutServerError
from r3rl.trace import RoutingTrace
from r3rl.train.data import layout_padded

LAYERS, TOP_K, EXPERTS, VOCAB = 4, 4, 16, 320  # tiny-qwen3-moe
MAX_SEQ_LEN = 256  # the `server` fixture's --max-seq-len


def post(server, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}/generate", content=content, timeout=60.0, **kw)


def generate(server, body) -> dict | list:
    resp = post(server, body)
    assert resp.status_code == 200, resp.text
    return resp.json()


# --- protocol -------------------------------------------------------------------------------------------------------
def test_health_and_model_info(server, tiny_model_dir):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    info = httpx.get(f"{server.url}/model_info").json()
    assert (info["num_layers"], info["top_k"], info["num_experts"], info["vocab_size"]) == (LAYERS, TOP_K, EXPERTS,
                                                                                            VOCAB)
    assert info["max_seq_len"] == MAX_SEQ_LEN and info["weight_version"] == 0
    assert info["model_path"] == str(tiny_model_dir) and info["device"] == "cpu" and "float32" in info["dtype"]
    assert httpx.get(f"{server.url}/get_model_info").json() == info  # SGLang's path


def test_seeded_sampling_is_deterministic(server):
    body = {"input_ids": [72, 101, 108], "sampling_params": {"max_new_tokens": 12, "seed": 7}, "return_logprob": True}
    a, b = generate(server, body), generate(server, body)
    assert a["output_ids"] == b["output_ids"] and len(a["output_ids"]) == 12
    assert a["meta_info"]["output_token_logprobs"] == b["meta_info"]["output_token_logprobs"]
    sglang_name = generate(server, {**body, "sampling_params": {"max_new_tokens": 12, "sampling_seed": 7}})
    assert sglang_name["output_ids"] == a["output_ids"]
    other = generate(server, {**body, "sampling_params": {"max_new_tokens": 12, "seed": 8}})
    assert other["output_ids"] != a["output_ids"]
    twins = generate(server, {"input_ids": [[72, 101, 108]] * 2, "sampling_params": {"max_new_tokens": 12, "seed": 7}})
    assert twins[0]["output_ids"] == twins[1]["output_ids"] == a["output_ids"]


def test_list_input_returns_list_single_returns_object(server):
    prompts = [[1, 2, 3], [4], [5, 6]]
    outs = generate(server, {"input_ids": prompts, "rid": ["a", "b", "c"], "sampling_params": {"max_new_tokens": 3}})
    assert isinstance(outs, list) and [o["meta_info"]["id"] for o in outs] == ["a", "b", "c"]
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [3, 1, 2]
    single = generate(server, {"input_ids": [1, 2, 3], "rid": "solo", "sampling_params": {"max_new_tokens": 3}})
    assert isinstance(single, dict) and single["meta_info"]["id"] == "solo"
    assert single["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    per_item = generate(server, {"input_ids": [[1], [2]], "sampling_params": [{"max_new_tokens": 2},
                                                                              {"max_new_tokens": 5}]})
    assert [o["meta_info"]["completion_tokens"] for o in per_item] == [2, 5]


def test_text_input_is_tokenized_and_output_decoded(server, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = generate(server, {"text": "Hello", "sampling_params": {"max_new_tokens": 6, "seed": 1}})
    assert out["meta_info"]["prompt_tokens"] == len(tok.encode("Hello")) == 5
    assert out["text"] == tok.decode(out["output_ids"], skip_special_tokens=True)
    same = generate(server, {"input_ids": tok.encode("Hello"), "sampling_params": {"max_new_tokens": 6, "seed": 1}})
    assert same["output_ids"] == out["output_ids"]
    assert len(generate(server, {"text": ["a", "bc"], "sampling_params": {"max_new_tokens": 2}})) == 2


def test_logprobs_in_sglang_layout(server):
    out = generate(server, {"input_ids": [9, 8, 7], "sampling_params": {"max_new_tokens": 5}, "return_logprob": True})
    entries = out["meta_info"]["output_token_logprobs"]
    assert [e[1] for e in entries] == out["output_ids"]
    assert all(len(e) == 3 and isinstance(e[0], float) and e[0] <= 0.0 and e[2] is None for e in entries)
    plain = generate(server, {"input_ids": [9], "sampling_params": {"max_new_tokens": 1}})
    assert "output_token_logprobs" not in plain["meta_info"]


def test_stop_token_ends_generation(server):
    greedy = {"input_ids": [3, 1, 4], "sampling_params": {"max_new_tokens": 4, "temperature": 0.0}}
    first = generate(server, greedy)["output_ids"][0]
    out = generate(server, {**greedy, "sampling_params": {**greedy["sampling_params"], "stop_token_ids": [first]}})
    assert out["output_ids"] == [first]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}


@pytest.mark.parametrize("fmt", ["base64_int32", "compact"])
def test_routed_experts_decode_to_valid_trace(server, fmt):
    body = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 6, "seed": 3},
            "return_routed_experts": True, "routed_experts_format": fmt}
    meta = generate(server, body)["meta_info"]
    n = meta["prompt_tokens"] + meta["completion_tokens"]
    assert meta["routed_experts_format"] == fmt
    if fmt == "compact":
        trace = RoutingTrace.from_bytes(base64.b64decode(meta["routed_experts"]))
    else:
        trace = RoutingTrace.from_sglang(meta["routed_experts"], num_layers=LAYERS, top_k=TOP_K, num_experts=EXPERTS,
                                         num_tokens=n)
    trace.validate(num_tokens=n, num_layers=LAYERS, top_k=TOP_K, num_experts=EXPERTS)
    assert trace.expert_ids.shape == (n - 1, LAYERS, TOP_K) and not trace.pad_mask().any()
    reference = generate(server, {**body, "routed_experts_format": "base64_int32"})["meta_info"]["routed_experts"]
    assert trace.to_sglang() == reference  # both formats carry the same routing


# --- the served trace replays in a training forward -----------------------------------------------------------------
def test_served_trace_replays_and_shifted_trace_fails_the_check(server, tiny_model_dir):
    async def rollout():
        async with RolloutClient(server.url) as client:
            return await client.generate([[10, 11, 12], [20, 21, 22, 23, 24], [30]],
                                         [{"max_new_tokens": 10, "seed": s} for s in range(3)])

    samples = asyncio.run(rollout())
    seq_len = max(s.num_tokens for s in samples)
    ids_BS = torch.tensor([s.tokens + [0] * (seq_len - s.num_tokens) for s in samples])  # right padding
    model = load_model(tiny_model_dir)
    check = ReplayCheck(LAYERS, TOP_K)
    with RoutingReplay(model, check=check) as replay, torch.no_grad():
        with replay.replay(layout_padded([s.trace for s in samples], seq_len)):
            model(ids_BS)
        summary = check.summary()
        assert summary.passed and summary.tokens_checked == sum(s.num_tokens - 1 for s in samples) * LAYERS

        shifted = [RoutingTrace.from_ids(np.roll(s.trace.expert_ids, 1, axis=0), EXPERTS) for s in samples]
        with replay.replay(layout_padded(shifted, seq_len)):
            model(ids_BS)
        with pytest.raises(AssertionError, match="R3 mismatch tokens"):
            check.summary()


# --- bad input: 400 naming the field, server stays up ---------------------------------------------------------------
BAD_INPUTS = [
    (b'{"input_ids": [1, 2', "body"),
    (b"[1, 2]", "body"),
    ({"input_ids": [1], "bogus": 1}, "bogus"),
    ({"input_ids": [1], "sampling_params": {"max_tokens": 4}}, "sampling_params.max_tokens"),
    ({"input_ids": [1], "sampling_params": {"temperature": "hot"}}, "sampling_params.temperature"),
    ({"input_ids": [1, "a"]}, "input_ids[1]"),
    ({"input_ids": [1], "return_logprob": "yes"}, "return_logprob"),
    ({"sampling_params": {}}, "input_ids"),
    ({"text": "a", "input_ids": [1]}, "input_ids"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": [1] * MAX_SEQ_LEN}, "input_ids"),
    ({"input_ids": [1] * 200, "sampling_params": {"max_new_tokens": 100}}, "sampling_params.max_new_tokens"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 0}}, "sampling_params.max_new_tokens"),
    ({"input_ids": [1, VOCAB]}, "input_ids[1]"),
    ({"input_ids": [-1]}, "input_ids[0]"),
    ({"input_ids": [[1], [2, 999]]}, "input_ids[1][1]"),
    ({"input_ids": [1], "sampling_params": {"temperature": -0.5}}, "sampling_params.temperature"),
    ({"input_ids": [1], "sampling_params": {"top_p": 0.0}}, "sampling_params.top_p"),
    ({"input_ids": [1], "sampling_params": {"top_p": 1.5}}, "sampling_params.top_p"),
    ({"input_ids": [1], "sampling_params": {"top_k": 0}}, "sampling_params.top_k"),
    ({"input_ids": [1], "sampling_params": {"top_k": -2}}, "sampling_params.top_k"),
    ({"input_ids": [1], "sampling_params": {"stop_token_ids": [999]}}, "sampling_params.stop_token_ids[0]"),
    ({"input_ids": [1], "sampling_params": {"seed": -1}}, "sampling_params.seed"),
    ({"input_ids": [1], "sampling_params": {"seed": 1, "sampling_seed": 2}}, "sampling_params.sampling_seed"),
    ({"input_ids": [[1], [2]], "sampling_params": [{}, {"top_k": 0}]}, "sampling_params[1].top_k"),
    ({"input_ids": [[1], [2]], "sampling_params": [{}]}, "sampling_params"),
    ({"input_ids": [[1], [2]], "rid": ["a"]}, "rid"),
    ({"input_ids": [1], "routed_experts_format": "json"}, "routed_experts_format"),
    ({"input_ids": [1], "sampling_params": []}, "sampling_params"),
    (b'{"input_ids": [1], "sampling_params": {"seed": ' + b"9" * 5000 + b"}}", "body"),
]


@pytest.mark.parametrize(("body", "field"), BAD_INPUTS, ids=[f for _, f in BAD_INPUTS])
def test_bad_input_is_400_naming_the_field(server, body, field):
    resp = post(server, body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["field"] == field and error["code"] == 400 and error["message"], error
    assert httpx.get(f"{server.url}/health").status_code == 200


# --- load: every request answered exactly once ----------------------------------------------------------------------
def test_concurrent_load_answers_each_request_once(server):
    n = 256
    bodies = [{"input_ids": [1 + i % 250, 1 + i // 250, *range(2, 2 + i % 7)], "rid": f"load-{i}",
               "sampling_params": {"max_new_tokens": 2 + i % 3, "seed": i}, "return_routed_experts": True}
              for i in range(n)]

    async def fire():
        async with httpx.AsyncClient(timeout=120.0, limits=httpx.Limits(max_connections=n)) as http:
            return await asyncio.gather(*(http.post(f"{server.url}/generate", json=b) for b in bodies))

    resps = asyncio.run(fire())
    assert [r.status_code for r in resps] == [200] * n
    outs = [r.json() for r in resps]
    assert sorted(o["meta_info"]["id"] for o in outs) == sorted(b["rid"] for b in bodies)  # none lost or duplicated
    for body, out in zip(bodies, outs, strict=True):
        meta = out["meta_info"]
        assert meta["id"] == body["rid"] and meta["prompt_tokens"] == len(body["input_ids"])
        assert meta["completion_tokens"] == len(out["output_ids"]) == body["sampling_params"]["max_new_tokens"]
        RoutingTrace.from_sglang(meta["routed_experts"], num_layers=LAYERS, top_k=TOP_K, num_experts=EXPERTS,
                                 num_tokens=meta["prompt_tokens"] + meta["completion_tokens"])
    for i in range(0, n, 37):  # seeded: each answer is its own request's, not a neighbour's
        assert generate(server, bodies[i])["output_ids"] == outs[i]["output_ids"], bodies[i]["rid"]


# --- graceful shutdown ----------------------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_request(server_factory):
    srv = server_factory(max_slots=16)
    body = {"input_ids": [[1 + i, 2, 3] for i in range(16)], "sampling_params": {"max_new_tokens": 240, "seed": 0}}
    result: dict = {}

    def request():
        result["resp"] = post(srv, body)
        result["t_done"] = time.monotonic()

    worker = threading.Thread(target=request)
    worker.start()
    time.sleep(0.5)  # the request is in the engine now
    t_sigterm = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    if worker.is_alive():  # still draining: no new connections are accepted
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{srv.url}/health", timeout=2.0)
    worker.join(60)
    code = srv.proc.wait(30)  # the drain ends the process by itself (a second signal would force it: exit 128 + sig)
    assert result["t_done"] > t_sigterm, "request finished before SIGTERM: make it longer to test the drain"
    assert result["resp"].status_code == 200, result["resp"].text
    assert [o["meta_info"]["completion_tokens"] for o in result["resp"].json()] == [240] * 16
    assert code == 0 and "server stopped" in srv.log(), srv.log()[-3000:]


# --- client ---------------------------------------------------------------------------------------------------------
def test_client_builds_validated_samples(server):
    async def run():
        async with RolloutClient(server.url, routed_experts_format="compact") as client:
            assert await client.health()
            assert await client.model_shape() == ModelShape(num_layers=LAYERS, top_k=TOP_K, num_experts=EXPERTS)
            samples = await client.generate([[1, 2], [3, 4, 5]], {"max_new_tokens": 4, "seed": 11})
            with pytest.raises(RolloutRequestError, match="top_p") as err:
                await client.generate([[1]], {"top_p": 0.0})
            assert err.value.status == 400 and err.value.field == "sampling_params.top_p"
            return samples

    samples = asyncio.run(run())
    for s in samples:
        assert len(s.response_ids) == len(s.rollout_logprobs) == 4 and s.finish_reason == "length"
        assert s.trace.num_rows == s.num_tokens - 1 and s.weight_version == 0


def _mock_client(responses: list, calls: list) -> RolloutClient:
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        item = responses[min(len(calls) - 1, len(responses) - 1)]
        if isinstance(item, Exception):
            raise item
        return httpx.Response(item[0], json=item[1])

    shape = ModelShape(num_layers=LAYERS, top_k=TOP_K, num_experts=EXPERTS)
    return RolloutClient("http://mock", max_retries=2, backoff=0.0, model_shape=shape,
                         transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(("responses", "n_calls", "error"), [
    ([(503, {"error": {"message": "busy"}}), (500, {}), (200, {"status": "ok"})], 3, None),
    ([(400, {"error": {"message": "bad", "field": "input_ids"}})], 1, RolloutRequestError),
    ([httpx.ConnectError("refused")], 3, RolloutServerError),
    ([(502, {})], 3, RolloutServerError),
    ([httpx.ReadTimeout("slow")], 1, RolloutServerError),  # the server may still be generating: never resent
])
def test_client_retries_connect_errors_and_5xx_not_4xx(responses, n_calls, error):
    calls: list = []

    async def run():
        async with _mock_client(responses, calls) as client:
            return await client._request("GET", "/health")

    if error is None:
        assert asyncio.run(run()) == {"status": "ok"}
    else:
        with pytest.raises(error):
            asyncio.run(run())
    assert len(calls) == n_calls


# --- weight updates from disk ---------------------------------------------------------------------------------------
def _broken_checkpoint(src, dst, edit):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _drop_head_and_router(t):
    del t["lm_head.weight"], t["model.layers.0.mlp.gate.weight"]


def _bad_shape(t):
    t["model.norm.weight"] = torch.ones(3)


@pytest.mark.parametrize(("edit", "named"), [
    (_drop_head_and_router, ["missing", "lm_head.weight", "model.layers.0.mlp.gate.weight"]),
    (_bad_shape, ["shape-mismatched", "model.norm.weight", "(3,)"]),
    (lambda t: t.update(extra=torch.ones(2)), ["unexpected", "extra"]),
])
def test_update_from_a_broken_checkpoint_is_refused_naming_the_tensors(server, tiny_model_dir, tmp_path, edit, named):
    ckpt = _broken_checkpoint(tiny_model_dir, tmp_path / "ckpt", edit)
    resp = httpx.post(f"{server.url}/update_weights_from_disk", json={"model_path": str(ckpt)}, timeout=60)
    assert resp.status_code == 400, resp.text
    answer = resp.json()
    assert answer["success"] is False and answer["num_paused_requests"] == 0
    assert all(n in answer["message"] for n in named), answer["message"]
    assert httpx.get(f"{server.url}/get_model_info").json()["weight_version"] == 0


@pytest.mark.parametrize(("body", "named"), [
    ({"model_path": "/nonexistent/ckpt"}, "config.json"),
    ({"model_path": "JUNK"}, "model.safetensors"),
    ({"model_path": "GOOD", "weight_version": "v2"}, "weight_version"),
    ({"model_path": "GOOD", "load_format": "dummy"}, "load_format"),
    ({"model_path": "GOOD", "bogus": 1}, "bogus"),
    ({"model_path": 3}, "model_path"),
])
def test_bad_update_requests_are_refused(server, tiny_model_dir, tmp_path, body, named):
    import shutil

    junk = tmp_path / "junk"
    shutil.copytree(tiny_model_dir, junk)
    (junk / "model.safetensors").write_bytes(b"\x00junk" * 10)
    body = {k: {"JUNK": str(junk), "GOOD": str(tiny_model_dir)}.get(v, v) if k == "model_path" else v
            for k, v in body.items()}
    resp = httpx.post(f"{server.url}/update_weights_from_disk", json=body, timeout=60)
    assert resp.status_code == 400 and resp.json()["success"] is False, resp.text
    assert named in resp.json()["message"], resp.json()["message"]
    assert httpx.get(f"{server.url}/get_model_info").json()["weight_version"] == 0


def test_update_between_steps_keeps_or_aborts_requests_in_flight(server_factory, tiny_model_dir):
    srv = server_factory(max_slots=4, max_seq_len=2048)
    long = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1500}}

    def in_flight(update: dict) -> tuple[httpx.Response, httpx.Response]:
        result: dict = {}
        thread = threading.Thread(target=lambda: result.setdefault("r", httpx.post(f"{srv.url}/generate", json=long,
                                                                                   timeout=120)))
        thread.start()
        while httpx.get(f"{srv.url}/server_info").json()["num_running"] == 0:
            time.sleep(0.02)
        answer = httpx.post(f"{srv.url}/update_weights_from_disk", json={"model_path": str(tiny_model_dir), **update},
                            timeout=60)
        thread.join(120)
        return answer, result["r"]

    answer, resp = in_flight({"weight_version": "1"})
    assert answer.status_code == 200 and answer.json()["success"] and answer.json()["weight_version"] == 1
    meta = resp.json()["meta_info"]  # it went on with the new weights: its tokens come from two versions
    assert (meta["weight_version_start"], meta["weight_version"], meta["completion_tokens"]) == (0, 1, 1500)
    answer, resp = in_flight({"abort_all_requests": True})
    assert answer.json()["success"] and answer.json()["weight_version"] == 2
    assert resp.status_code == 503 and resp.json()["error"]["type"] == "RequestAborted", resp.text
    assert httpx.get(f"{srv.url}/get_model_info").json()["weight_version"] == 2


def test_admission_holding_is_a_server_flag_checked_before_the_model_loads(tmp_path):
    """`serve --max-hold-steps` (default 0: admit at once) reaches ServerConfig; a negative value is refused."""
    from r3rl.rollout.net.config import ServerConfig

    (tmp_path / "config.json").write_text("{}")
    assert ServerConfig(model=str(tmp_path)).max_hold_steps == 0
    with pytest.raises(ValueError, match="max_hold_steps must be >= 0: got -1"):
        ServerConfig(model=str(tmp_path), max_hold_steps=-1)


def test_disable_overlap_schedule_reaches_the_engine_config(tmp_path, monkeypatch):
    from r3rl import cli
    from r3rl.rollout.net import server as server_module

    (tmp_path / "config.json").write_text("{}")
    seen = []
    monkeypatch.setattr(server_module, "serve", lambda cfg: seen.append(cfg) or 0)
    assert cli.main(["serve", "--model", str(tmp_path)]) == 0
    assert cli.main(["serve", "--model", str(tmp_path), "--disable-overlap-schedule"]) == 0
    assert [c.engine.overlap_schedule for c in seen] == [None, False]  # None: on with CUDA graphs


def test_server_info_reports_the_engine_workers_counters(server):
    before = httpx.get(f"{server.url}/server_info").json()["engine_stats"]
    resp = httpx.post(f"{server.url}/generate", json={"input_ids": [[1, 2], [3]], "sampling_params":
                                                      {"max_new_tokens": 5}}, timeout=60)
    after = httpx.get(f"{server.url}/server_info").json()["engine_stats"]
    assert resp.status_code == 200 and [len(o["output_ids"]) for o in resp.json()] == [5, 5]
    assert after["finished"] - before["finished"] == 2 and after["generated_tokens"] - before["generated_tokens"] == 10
    assert after["steps"] - before["steps"] >= 4 and after["max_hold_steps"] == 0
