"""Step execution of `RolloutEngine`: prefill of the admitted prompt groups and their first tokens, then the decode
steps of the running slots in three parts: plan (sampling mode, attention length, blocks), launch (a CUDA graph
replay or an eager decode, with the asynchronous copy of its tokens to the host) and collect (read back, stop checks,
release). With the overlap schedule the next step is launched before the last one is collected. Mixed into
`RolloutEngine`, whose state it reads (engine.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from r3rl.rollout.engine.graphs import next_power_of_two
from r3rl.rollout.engine.messages import EngineOutput
from r3rl.rollout.engine.sampling import SamplingMode, sample_tokens
from r3rl.rollout.engine.slots import Running
from r3rl.rollout.model.paging import blocks_for

__all__ = ["Inflight", "StepRunner"]


class StepRunner:
    """`RolloutEngine`'s prefill and decode steps (plan, launch, collect) (a mixin: the state is the engine's)."""

    def _prefill(self, slot0: int, groups: list[list[Running]]) -> None:
        """Prefill each prompt group's first request (the others share its blocks), then sample every request's
        first token from its group's logits with its own seed."""
        new = [r for g in groups for r in g]
        V = self.vocab_size  # a top_k of the vocabulary or more keeps every token (and must fit an int64 buffer)
        columns = zip(*((r.req.sampling.temperature, r.req.sampling.top_p,
                         r.req.sampling.top_k if r.req.sampling.top_k <= V else -1, r.seed32,
                         r.req.sampling.logprob_temperature) for r in new), strict=True)
        for dst, values in zip(vars(self._params.narrow(slot0, len(new))).values(), columns, strict=True):
            dst.copy_(torch.tensor(values, dtype=dst.dtype))
        s0 = slot0
        for batch in self._prefill_batches(groups):
            owners = [g[0] for g in batch]
            N, P = len(owners), max(len(r.req.input_ids) for r in owners)
            tokens_NP = torch.zeros(N, P, dtype=torch.int64)
            for n, r in enumerate(owners):
                tokens_NP[n, : len(r.req.input_ids)] = torch.tensor(r.req.input_ids)
            lengths_N = torch.tensor([len(r.req.input_ids) for r in owners], device=self.device)
            owner_rows, rows, src, dst = [], [], [], []
            for n, g in enumerate(batch):
                owner_rows.append(s0)
                rows += [n] * len(g)
                if len(g) > 1 and len(g[0].req.input_ids) % self.table.block_size:
                    last = self.table.blocks(s0)[-1]
                    src += [last] * (len(g) - 1)
                    dst += [self.table.blocks(s)[-1] for s in range(s0 + 1, s0 + len(g))]
                s0 += len(g)
            logits_NV = self.model.prefill(tokens_NP.to(self.device), lengths_N,
                                           torch.tensor(owner_rows, device=self.device), self.kv, self.routes,
                                           self.state)
            if src:  # the partial last block of a shared prompt: each sample writes its own tokens into it
                self.kv.copy_blocks(src, dst)
                self.routes.copy_blocks(src, dst)
            if self.state is not None and len(rows) > N:  # each sample starts from its prompt's state
                self.state.copy_rows(torch.tensor([owner_rows[n] for n in rows], device=self.device),
                                     torch.arange(s0 - len(rows), s0, device=self.device))
            members = [r for g in batch for r in g]
            rows_M = torch.tensor(rows, device=self.device)
            logits_MV, lengths_M = (logits_NV, lengths_N) if len(rows) == N else (logits_NV[rows_M], lengths_N[rows_M])
            mode = SamplingMode.for_params([r.req.sampling for r in members])
            m0 = s0 - len(members)
            tok_M, lp_M = sample_tokens(logits_MV, self._params.narrow(m0, len(members)), lengths_M, mode,
                                        self._vocab_keys_V)
            self._tokens_S[m0:s0] = tok_M
            self._pos_S[m0:s0] = lengths_M
            self._emit(members, tok_M.tolist(), lp_M.tolist())

    def _plan(self, *, ahead: int) -> tuple[SamplingMode, int] | None:
        """(sampling mode, attention length) of the next decode of the running slots, their blocks reserved;
        `ahead`: steps in flight (1: planned while one runs, without preempting: None when blocks run short or
        nothing would continue)."""
        if not self._slots:
            return None
        if ahead and not self._reserve_decode_blocks(ahead, preempt=False):
            return None
        if self._mode is None:  # recomputed only when the running requests change
            self._mode = SamplingMode.for_params([r.req.sampling for r in self._slots])
        T = self._fixed_decode_T()
        if T is None:  # a power of two (few graphs), in whole KV blocks
            longest = max(r.next_pos for r in self._slots) + ahead
            bs, max_len = self.table.block_size, self.config.max_seq_len
            T = min(blocks_for(next_power_of_two(longest + 1, minimum=64, maximum=max_len), bs) * bs,
                    self.table.max_blocks * bs)
        return self._mode, T

    def _fixed_decode_T(self) -> int | None:
        """The attention length of every decode step when it does not depend on the rows (the whole context), else
        None: batch-invariant (a row's shapes must not depend on other rows), or decode attention that reads each
        row's own length in place (T would only multiply the CUDA graphs)."""
        if self.config.batch_invariant or self.model.decodes_in_place(self.kv):
            return self.table.max_blocks * self.table.block_size
        return None

    def _launch(self, mode: SamplingMode, T: int) -> Inflight:
        """One decode step of the running slots, queued on the device with the copy of its outputs to the host."""
        n = len(self._slots)
        if self.config.use_cuda_graph:
            B = self._graphs.bucket(n)
            if n < B:
                self._n_active.fill_(n)
            self._graph(B, T, mode, masked=n < B).replay()
        else:
            self._decode_rows(n, T, mode, masked=False)
        self._tokens_S[:n] = self._next_tokens_S[:n]
        self._pos_S[:n] += 1
        tokens, logprobs = self._host_out[0]
        self._host_out.reverse()  # the next launch copies into the other set
        tokens[:n].copy_(self._next_tokens_S[:n], non_blocking=True)
        logprobs[:n].copy_(self._next_logprobs_S[:n], non_blocking=True)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))  # the engine's device, not the thread's current one
        return Inflight(rows=list(self._slots), tokens=tokens[:n], logprobs=logprobs[:n], done=done)

    def _collect_later(self, step: Inflight) -> Callable[[], list[EngineOutput]]:
        """Read a launched step back: its tokens to their requests, the finished ones released; returns the function
        that builds their outputs (`_release_finished_later`)."""
        if step.done is not None:
            step.done.synchronize()  # note: a decode step's host sync (stop checks need the tokens)
        self._emit(step.rows, step.tokens.tolist(), step.logprobs.tolist())
        return self._release_finished_later()

    def _drain(self) -> None:
        """Read back the step in flight (its finished requests go out with the next `step()`)."""
        if self._inflight is not None:
            step, self._inflight, self._next_plan = self._inflight, None, None
            self._ready += self._collect_later(step)()

    def _decode_rows(self, B: int, T: int, mode: SamplingMode, *, masked: bool) -> None:
        """Decode rows [0, B) attending over T positions; writes the sampled tokens and logprobs of those rows.

        Idempotent for a given device state (it writes K/V, routing and outputs, never advances positions), which
        makes the eager warm-up before a graph capture harmless, except for linear-attention states, which `_graph`
        restores. `masked`: rows >= the live count are padding."""
        pos_B = self._pos_S[:B]
        active_B = self._arange_P[:B] < self._n_active if masked else None
        logits_BV = self.model.decode(self._tokens_S[:B], pos_B, T, active_B, self.kv, self.routes, self.state)
        tok_B, lp_B = sample_tokens(logits_BV, self._params.narrow(0, B), pos_B + 1, mode, self._vocab_keys_V)
        self._next_tokens_S[:B] = tok_B
        self._next_logprobs_S[:B] = lp_B

    def _graph(self, B: int, T: int, mode: SamplingMode, *, masked: bool) -> torch.cuda.CUDAGraph:
        def run() -> None:
            # a decode advances linear-attention states: the eager warm-up before the capture must not (the capture
            # itself only records)
            if self.state is None or torch.cuda.is_current_stream_capturing():
                self._decode_rows(B, T, mode, masked=masked)
                return
            snapshot = self.state.snapshot(B)
            self._decode_rows(B, T, mode, masked=masked)
            self.state.restore(snapshot)

        return self._graphs.get((B, T, mode, masked), run)


@dataclass
class Inflight:
    """A decode step launched and not yet read back."""

    rows: list[Running]  # the running requests at launch, in slot order
    tokens: torch.Tensor  # [rows] host copies, written by the step's queued copies
    logprobs: torch.Tensor
    done: torch.cuda.Event | None  # recorded after the copies (None on CPU, where they are synchronous)
