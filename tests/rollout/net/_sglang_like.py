"""A real HTTP server on 127.0.0.1 that answers as SGLang (`--enable-return-routed-experts`) does, over r3rl's
in-process engine: `/model_info` and `/get_model_info` carry SGLang's fields and no MoE shape, `routed_experts` is
base64 int32 with one column per DECODER layer (dense layers included), `weight_version` is a string ("default"
until an update names one), `/update_weights_from_disk` answers {success, message}.

    with SGLangLikeServer(model) as srv:                 # model: the HF policy the engine copies
        ...  srv.url ...
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from r3rl.models.adapters import find_routers
from r3rl.rollout.engine.engine import RolloutEngine
from r3rl.rollout.engine.messages import EngineRequest, FinishReason, SamplingParams
from r3rl.rollout.engine.weights import load_checkpoint_tensors

_SAMPLING = {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids"}


class SGLangLikeServer:
    def __init__(self, model, *, max_slots: int = 16, max_seq_len: int = 256, fail_updates: bool = False) -> None:
        """`fail_updates`: refuse every weight update as SGLang does ({success: false}, HTTP 400)."""
        self.fail_updates = fail_updates
        self.engine = RolloutEngine(model, max_slots=max_slots, max_seq_len=max_seq_len, device="cpu")
        self.moe_layers = [s.decoder_layer for s in find_routers(model)]
        self.num_decoder_layers = int(model.config.num_hidden_layers)
        self.weight_version = "default"
        self.model_info_calls = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> SGLangLikeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def model_info(self) -> dict:
        self.model_info_calls += 1
        return {"model_path": "sglang-like", "tokenizer_path": "sglang-like", "is_generation": True,
                "preferred_sampling_params": None, "weight_version": self.weight_version,
                "has_image_understanding": False, "has_audio_understanding": False}

    def generate(self, body: dict) -> list[dict]:
        prompts = body["input_ids"]
        sps = body["sampling_params"]
        sps = sps if isinstance(sps, list) else [sps] * len(prompts)
        rids = body.get("rid") or [f"r{i}" for i in range(len(prompts))]
        requests = [EngineRequest(request_id=rid, input_ids=list(p), sampling=SamplingParams(
            **{k: v for k, v in sp.items() if k in _SAMPLING}, seed=sp.get("sampling_seed")))
            for rid, p, sp in zip(rids, prompts, sps, strict=True)]
        with self.lock:
            outputs = self.engine.generate(requests)
        return [self._response(out) for out in outputs]

    def _response(self, out) -> dict:
        moe = np.frombuffer(base64.b64decode(out.trace.to_sglang()), dtype="<i4").reshape(
            out.trace.num_rows, len(self.moe_layers), out.trace.top_k)
        wide = np.zeros((moe.shape[0], self.num_decoder_layers, moe.shape[2]), dtype="<i4")  # dense layers: 0
        wide[:, self.moe_layers] = moe
        stop = out.finish_reason is FinishReason.STOP
        return {"text": "", "output_ids": list(out.output_ids), "meta_info": {
            "id": out.request_id, "prompt_tokens": len(out.prompt_ids), "completion_tokens": len(out.output_ids),
            "cached_tokens": 0, "finish_reason": {"type": "stop", "matched": out.output_ids[-1]} if stop else
            {"type": "length", "length": len(out.output_ids)},
            "weight_version": self.weight_version, "e2e_latency": 0.0,
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(out.output_logprobs, out.output_ids,
                                                                     strict=True)],
            "routed_experts": base64.b64encode(wide.tobytes()).decode("ascii")}}

    def update_weights_from_disk(self, body: dict) -> dict:
        tensors = load_checkpoint_tensors(body["model_path"], dtype=self.engine.dtype,
                                          expected_shapes=self.engine.model.shapes)
        with self.lock:
            self.engine.update_weights(tensors, strict=True)
            self.weight_version = body.get("weight_version") or self.weight_version
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}


def _handler(server: SGLangLikeServer):
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
            if self.path == "/health":
                self._send(200, {})
            elif self.path in ("/model_info", "/get_model_info"):
                self._send(200, server.model_info())
            else:
                self._send(404, {"detail": "Not Found"})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/generate":
                self._send(200, server.generate(body))
            elif self.path == "/update_weights_from_disk" and server.fail_updates:
                self._send(400, {"success": False, "message": "Failed to update weights: injected failure"})
            elif self.path == "/update_weights_from_disk":
                self._send(200, server.update_weights_from_disk(body))
            else:
                self._send(404, {"detail": "Not Found"})

    return Handler
