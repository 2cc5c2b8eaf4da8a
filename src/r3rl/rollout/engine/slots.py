"""Request bookkeeping of `RolloutEngine`: the running requests in their slots. Tokens are appended to their
requests and checked for a stop (`_emit`); finished requests are released with their traces and their slots refilled
from the tail (a block-table row moves, no KV is copied). Mixed into `RolloutEngine`, whose state it reads
(engine.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from r3rl.rollout.engine.messages import EngineOutput, EngineRequest, FinishReason
from r3rl.trace import RoutingTrace

__all__ = ["Running", "SlotBook", "request_of", "rows_from"]


class SlotBook:
    """`RolloutEngine`'s request bookkeeping (a mixin: the state is the engine's)."""

    def _validate(self, req: EngineRequest) -> None:
        if req.request_id in self._request_ids:
            raise ValueError(f"request_id must be unique among queued and running requests: got {req.request_id!r}")
        req.validate(vocab_size=self.vocab_size, max_seq_len=self.max_seq_len)

    def _emit(self, rows: list[Running], tokens: list[int], logprobs: list[float]) -> None:
        for r, tok, lp in zip(rows, tokens, logprobs, strict=True):
            if r.finish_reason:  # stopped a step earlier: the overlap schedule decoded it once more
                continue
            r.output_ids.append(tok)
            r.logprobs.append(lp)
            if tok in r.stop_ids:
                r.finish_reason = FinishReason.STOP
            elif len(r.output_ids) >= r.req.sampling.max_new_tokens:
                r.finish_reason = FinishReason.LENGTH

    def _release_finished(self) -> list[EngineOutput]:
        """Outputs of finished slots (traces read before any move), then refill their slots from the tail."""
        return self._release_finished_later()()

    def _release_finished_later(self) -> Callable[[], list[EngineOutput]]:
        """`_release_finished` whose outputs are built by the returned function: the finished slots are released
        now, their traces' copy to the host is queued, and the caller waits for it only when it calls the function."""
        done = [i for i, r in enumerate(self._slots) if r.finish_reason]
        if not done:
            return list
        rows = [self._slots[i] for i in done]
        wanted = [i for i in done if self._slots[i].req.return_routed_experts]
        traces_later = self.routes.read_later(wanted, [self._slots[i].next_pos for i in wanted])
        version = self._weight_version
        for r in rows:
            self._request_ids.discard(r.req.request_id)
        self._remove_slots(done)

        def outputs() -> list[EngineOutput]:
            traces = dict(zip(wanted, traces_later(), strict=True))
            return [EngineOutput(
                request_id=r.req.request_id, prompt_ids=list(r.req.input_ids), output_ids=r.output_ids,
                output_logprobs=r.logprobs, logprob_temperature=r.req.sampling.logprob_temperature,
                finish_reason=r.finish_reason, trace=rows_from(traces.get(i), r.req.routed_experts_start_len),
                weight_version=version, weight_version_start=r.version_start,
                routed_experts_start_len=r.req.routed_experts_start_len) for i, r in zip(done, rows, strict=True)]

        return outputs

    def _remove_slots(self, done: list[int]) -> None:
        """Free slots `done` (sorted) and their blocks: refill the holes below the new end by moving the last live
        requests in (their block-table rows and per-slot state; no KV is copied)."""
        for i in done:
            self.table.release(i)
        gone = set(done)
        keep = len(self._slots) - len(done)
        holes = [i for i in done if i < keep]
        movers = [j for j in range(keep, len(self._slots)) if j not in gone]
        slots = self._slots[:keep]
        for dst, src in zip(holes, movers, strict=True):
            self.table.move(src, dst)
            slots[dst] = self._slots[src]
        if holes:
            # non_blocking: with the overlap schedule a decode step is in flight; these small copies need not wait
            dst_M = torch.tensor(holes).to(self.device, non_blocking=True)
            src_M = torch.tensor(movers).to(self.device, non_blocking=True)
            for buf in (self._tokens_S, self._pos_S, *vars(self._params).values()):
                buf[dst_M] = buf[src_M]
            if self.state is not None:  # linear-attention state lives per slot, not in blocks
                self.state.copy_rows(src_M, dst_M)
        # freed tail slots become CUDA-graph padding rows: position 0, so decode attention does not walk the stale
        # length of the request that left them
        self._pos_S[keep : len(self._slots)] = 0
        self._slots, self._mode = slots, None


def rows_from(trace: RoutingTrace | None, start: int) -> RoutingTrace | None:
    """Trace rows [start, end): what a request with `routed_experts_start_len=start` asked for."""
    if trace is None or start == 0:
        return trace
    return RoutingTrace(np.ascontiguousarray(trace.expert_ids[start:]), trace.num_experts)


def request_of(queued: EngineRequest | Running) -> EngineRequest:
    """The request of a queue entry (waiting: the request; preempted: its running state)."""
    return queued.req if isinstance(queued, Running) else queued


@dataclass(eq=False)
class Running:
    req: EngineRequest
    seed32: int
    stop_ids: frozenset[int]
    version_start: int  # weight version at admission (prefill)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def next_pos(self) -> int:
        """Position of the last token (the next decode input); also the number of positions cached so far."""
        return len(self.req.input_ids) + len(self.output_ids) - 1
