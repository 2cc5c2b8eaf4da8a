"""Admission and scheduling of `RolloutEngine`: which waiting (or preempted) requests enter free slots while the KV
cache has blocks for their prompts, grouped by prompt (a GRPO group shares its prompt's blocks and one prefill); the
prefill batches under the token budget; the blocks each decode step needs, and preemption of the newest requests
when they run short. Mixed into `RolloutEngine`, whose state it reads (engine.py)."""

from __future__ import annotations

import logging

from r3rl.rollout.engine.messages import EngineRequest
from r3rl.rollout.engine.sampling import fold_seed
from r3rl.rollout.engine.slots import Running, request_of
from r3rl.rollout.model.paging import blocks_for

__all__ = ["Scheduler"]

logger = logging.getLogger(__name__)


class Scheduler:
    """`RolloutEngine`'s admission, prefill batching, block reservation and preemption (a mixin: the state is the
    engine's)."""

    def _admit(self) -> list[list[Running]]:
        """Take preempted, then waiting requests while there are free slots and KV blocks for their prompts; give
        them blocks. Returns them as prompt groups (requests with the same prompt share its blocks and one prefill),
        shortest prompt first; the slots are filled in that order."""
        if not (self._preempted or self._waiting):
            return []
        table, bs = self.table, self.table.block_size
        room, free = self.config.max_slots - len(self._slots), table.num_free
        if room == 0:  # every slot busy (the usual GRPO case): no per-slot headroom sum
            return []
        # one block of headroom for every request that will still grow, so that an admission does not force the
        # next decode step to preempt (with the default pool, every slot's longest sequence fits and this never binds)
        reserve = self._headroom()
        groups: dict[tuple[int, ...], list[Running]] = {}
        while room > 0 and (self._preempted or self._waiting):
            queue = self._preempted or self._waiting
            head = queue[0]
            req = request_of(head)
            key = tuple(req.input_ids)
            need = (1 if len(key) % bs else 0) if key in groups else blocks_for(len(key), bs)
            grow = self._grows(req, blocks_for(len(key), bs))
            if need + reserve + grow > free:
                break  # FIFO: later requests wait too
            queue.popleft()
            room, free, reserve = room - 1, free - need, reserve + grow
            if isinstance(head, Running):  # preempted: restarts from its prompt with the same seed
                r = head
                r.version_start = self._weight_version
            else:
                seed = head.sampling.seed if head.sampling.seed is not None else self._seed_rng.getrandbits(64)
                r = Running(req=head, seed32=fold_seed(seed), stop_ids=frozenset(head.sampling.stop_token_ids),
                             version_start=self._weight_version)
            groups.setdefault(key, []).append(r)
        ordered = sorted(groups.items(), key=lambda kv: len(kv[0]))  # less padding in batched prefills
        slot = len(self._slots)
        for key, group in ordered:
            owner = table.allocate(blocks_for(len(key), bs))
            table.assign(slot, owner)
            for s in range(slot + 1, slot + len(group)):  # shared full blocks, a private partial block
                table.assign(s, owner[: len(key) // bs] + table.allocate(1 if len(key) % bs else 0))
            slot += len(group)
        table.sync()
        return [g for _, g in ordered]

    def _headroom(self) -> int:
        """Blocks the running requests may still claim: one for each that will still grow (`_admit` keeps them)."""
        held = self.table.num_blocks_of
        return sum(self._grows(r.req, held(i)) for i, r in enumerate(self._slots))

    def _grows(self, req: EngineRequest, held: int) -> int:
        """1 when a request holding `held` blocks will need another before it can finish."""
        return int(blocks_for(len(req.input_ids) + req.sampling.max_new_tokens, self.table.block_size) > held)

    def _reserve_decode_blocks(self, ahead: int = 0, *, preempt: bool = True) -> bool:
        """Every running request gets the block its next decode position needs (`ahead` decode steps in flight
        whose tokens the host has not read back yet); when too few are free, the newest requests (the last slots)
        are preempted until the others fit, or, with `preempt` False, nothing is reserved and False is returned."""
        table, bs = self.table, self.table.block_size
        held = table.num_blocks_of
        need = [i for i, r in enumerate(self._slots) if (r.next_pos + ahead) // bs >= held(i)]
        if len(need) > table.num_free and not preempt:
            return False
        while len(need) > table.num_free:  # terminates: one request alone always fits (BlockTable checks)
            self._preempt(len(self._slots) - 1)
            need = [i for i in need if i < len(self._slots)]
        table.append_each(need, table.allocate(len(need)))
        table.sync()
        return True

    def _preempt(self, i: int) -> None:
        r = self._slots[i]
        logger.info("KV cache full (%d tokens): preempting request %s at %d generated tokens; it restarts from its "
                    "prompt later", self.table.capacity_tokens, r.req.request_id, len(r.output_ids))
        r.output_ids.clear()
        r.logprobs.clear()
        r.finish_reason = None
        self._preempted.appendleft(r)  # preempted from the tail: the older ones end up first
        self.num_preemptions += 1
        self._remove_slots([i])

    def _admission_due(self) -> bool:
        """The next waiting request would be admitted (a free slot, and blocks by `_admit`'s rule): the next step
        admits before it decodes (no launch ahead). A request that does not fit yet does not stop the overlap."""
        queue = self._preempted or self._waiting
        if not queue or len(self._slots) >= self.config.max_slots:
            return False
        req = request_of(queue[0])
        held = blocks_for(len(req.input_ids), self.table.block_size)
        need, free = held + self._grows(req, held), self.table.num_free
        if need + len(self._slots) <= free:  # fits whatever the running requests still claim (one block each)
            return True
        return need + self._headroom() <= free

    def _prefill_batches(self, groups: list[list[Running]]) -> list[list[list[Running]]]:
        """Prompt groups batched into prefills under the padded-token budget (one prompt per prefill when batch
        invariant: a prefill's shapes must depend on its own prompt only)."""
        if self.config.batch_invariant:
            return [[g] for g in groups]
        batches: list[list[list[Running]]] = [[]]
        longest = 0
        for g in groups:
            longest_if = max(longest, len(g[0].req.input_ids))
            if batches[-1] and longest_if * (len(batches[-1]) + 1) > self.config.prefill_token_budget:
                batches.append([])
                longest_if = len(g[0].req.input_ids)
            batches[-1].append(g)
            longest = longest_if
        return batches
