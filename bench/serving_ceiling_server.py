"""The real `r3rl serve` HTTP layer and worker in front of a timed engine model, to measure the serving layer's own
ceiling on a machine without a GPU (bench/RESULTS.md, "Serving").

    python bench/serving_ceiling_server.py --port 31235 --decode-ms 5 &
    python bench/bench_serving.py --url http://127.0.0.1:31235 --concurrency 1 32 256 --rl-prompts 32

The engine model does no math: a step sleeps `--decode-ms` (plus `--prefill-ms` when it admits requests) with the
GIL released, as a GPU step's host thread waits on a CUDA sync, and emits one token per running request. So the
server's throughput against this model is bounded by the HTTP layer, the worker thread and the client, not by
compute: at c=256 with 5 ms steps and 128 tokens the ideal is 256 / 5 ms = 51k tok/s.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import deque

import numpy as np
import torch
import uvicorn

from r3rl.models.presets import init_model
from r3rl.rollout.engine.config import EngineConfig
from r3rl.rollout.engine.messages import EngineOutput, EngineRequest, FinishReason
from r3rl.rollout.net import server
from r3rl.rollout.net.config import ServerConfig
from r3rl.trace import RoutingTrace


class TimedEngine:
    """The slice of RolloutEngine's interface the worker uses; steps cost wall time only."""

    def __init__(self, *, decode_s: float, prefill_s: float, max_slots: int, num_layers: int = 8, top_k: int = 8,
                 num_experts: int = 128) -> None:
        self.decode_s, self.prefill_s, self.max_slots = decode_s, prefill_s, max_slots
        self.num_layers, self.top_k, self.num_experts = num_layers, top_k, num_experts
        self.vocab_size, self.max_seq_len, self.weight_version = 32000, 4096, 0
        self.dtype, self.device = torch.bfloat16, torch.device("cpu")
        self._waiting: deque[EngineRequest] = deque()
        self._running: list[tuple[EngineRequest, list[int]]] = []

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def add_request(self, req: EngineRequest) -> None:
        self._waiting.append(req)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def abort(self, request_ids: list[str]) -> list[str]:
        ids = set(request_ids)
        gone = [r.request_id for r in self._waiting if r.request_id in ids]
        gone += [r.request_id for r, _ in self._running if r.request_id in ids]
        self._waiting = deque(r for r in self._waiting if r.request_id not in ids)
        self._running = [x for x in self._running if x[0].request_id not in ids]
        return gone

    def abort_all(self) -> list[str]:
        return self.abort([r.request_id for r in self._waiting] + [r.request_id for r, _ in self._running])

    def step(self) -> list[EngineOutput]:
        if self._waiting and len(self._running) < self.max_slots:
            while self._waiting and len(self._running) < self.max_slots:
                self._running.append((self._waiting.popleft(), []))
            time.sleep(self.prefill_s)
        time.sleep(self.decode_s)
        finished, keep = [], []
        for req, tokens in self._running:
            tokens.append(7)
            if len(tokens) < req.sampling.max_new_tokens:
                keep.append((req, tokens))
                continue
            rows = len(req.input_ids) + len(tokens) - 1
            trace = (RoutingTrace(np.tile(np.arange(self.top_k, dtype=np.uint8), (rows, self.num_layers, 1)),
                                  self.num_experts) if req.return_routed_experts else None)
            finished.append(EngineOutput(
                request_id=req.request_id, prompt_ids=list(req.input_ids), output_ids=tokens,
                output_logprobs=[-0.5] * len(tokens), logprob_temperature=1.0, finish_reason=FinishReason.LENGTH,
                trace=trace, weight_version=0, weight_version_start=0))
        self._running = keep
        return finished


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=31235)
    p.add_argument("--decode-ms", type=float, default=5.0, help="wall time of a decode step")
    p.add_argument("--prefill-ms", type=float, default=0.0, help="extra wall time of a step that admits requests")
    p.add_argument("--max-slots", type=int, default=256)
    p.add_argument("--max-hold-steps", type=int, default=0, help="as `r3rl serve --max-hold-steps`")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    model_dir = init_model("tiny-qwen3-moe", tempfile.mkdtemp(prefix="serving_ceiling_"))  # ServerConfig wants one
    engine = TimedEngine(decode_s=args.decode_ms / 1e3, prefill_s=args.prefill_ms / 1e3, max_slots=args.max_slots)
    config = ServerConfig(model=str(model_dir), port=args.port, max_hold_steps=args.max_hold_steps,
                          engine=EngineConfig(max_slots=args.max_slots))
    sys.setswitchinterval(server.SWITCH_INTERVAL_S)  # as serve() sets it
    uvicorn.run(server.create_app(config, engine), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, timeout_keep_alive=config.keep_alive_timeout_s)  # as serve() runs it


if __name__ == "__main__":
    main()
