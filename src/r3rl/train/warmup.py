"""The supervised warm-up before RL: a random policy never reaches a reward to learn from.

    sft_warmup(model, tokenizer, source, cfg, env)    # at most cfg.sft_steps steps on (prompt, target + EOS)

It stops early, at the first of (means over the last `SFT_STOP_WINDOW` steps):
  - the token loss is at most `sft_stop_loss` (0: never);
  - the fraction of targets that greedy decoding reproduces is at least `sft_stop_exact` (None or 0: never). A target is
    reproduced when the argmax is right at every target token given the target's prefix (teacher forcing): exactly
    the condition for greedy decoding to emit the whole target. This bound is on what the greedy evaluation
    measures; a loss bound can be met while one answer position is still at chance, because the other tokens, near
    zero loss, carry the mean (seen on the embedded default: one seed stopped at loss 0.45 with the third character
    of the reversed string still unlearnt, and RL never recovered it).
Every rank decides alike (FSDP's collectives need the same step count everywhere).
"""

from __future__ import annotations

import logging
import time

import torch

from r3rl.models.chat import encode_prompt
from r3rl.sample import Sample
from r3rl.train.data import Layout, make_micro_batches, plan_layout, token_logprobs
from r3rl.train.parallel import sum_over_ranks
from r3rl.train.setup import _pad_id, _stop_ids

__all__ = ["sft_warmup", "sft_target_ids", "sft_stop", "exact_targets", "SFT_STOP_WINDOW"]

logger = logging.getLogger("r3rl.train.trainer")

SFT_STOP_WINDOW = 5
"""The warm-up's stop bounds (`sft_stop_loss`, `sft_stop_exact`) are on means over this many consecutive steps."""


def sft_warmup(model, tokenizer, source, cfg, env, *, layer_masks=None) -> int:
    """Supervised steps on `source`'s items until a stop bound or `cfg.sft_steps`; returns the steps run."""
    layout = cfg.layout if cfg.layout is not Layout.AUTO else plan_layout(model, Layout.AUTO, log=False).layout
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, betas=cfg.adam_betas)
    eos = _stop_ids(tokenizer)
    model.train()
    t0, loss, recent, done, stop = time.perf_counter(), None, [], 0, ""
    for _ in range(cfg.sft_steps):
        items = source.next_batch(cfg.sft_batch_size)
        samples = []
        for it in items:
            target, mask = sft_target_ids(source, it, tokenizer, eos[:1])
            samples.append(Sample(prompt_ids=encode_prompt(tokenizer, it.prompt, chat_template=cfg.apply_chat_template),
                                  response_ids=target, rollout_logprobs=[0.0] * len(target), loss_mask=mask))
        mbs = make_micro_batches(samples, advantages=[0.0] * len(samples), layout=layout,
                                 micro_batch_size=cfg.micro_batch_size, max_tokens=cfg.max_tokens_per_mb,
                                 pad_id=_pad_id(tokenizer), traces=[None] * len(samples), layer_masks=layer_masks)
        n_tok = sum(mb.num_response_tokens for mb in mbs)
        opt.zero_grad(set_to_none=True)
        loss_sum, exact = 0.0, 0
        for mb in (m.to(cfg.device) for m in mbs):
            logits_TV = mb.response_logits(model(**mb.model_inputs()).logits)
            loss = -token_logprobs(logits_TV, mb.target_ids_T).sum() / n_tok
            loss.backward()
            loss_sum += loss.item()
            exact += exact_targets(logits_TV.detach(), mb.target_ids_T, mb.seq_idx_T, mb.num_seqs)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        done += 1
        loss_all, exact_all = sum_over_ranks([loss_sum, float(exact)], env)
        step = (loss_all / env.world_size, exact_all / (len(samples) * env.world_size))
        recent = (recent + [step])[-SFT_STOP_WINDOW:]
        stop = sft_stop(recent, cfg)
        if stop:
            break  # warm enough: the rest of the learning is RL's
    model.eval()
    exact_now = f", greedy-exact targets {recent[-1][1]:.0%}" if recent else ""
    logger.info("sft warm-up: %d steps in %.1fs, last loss %.4f%s%s", done, time.perf_counter() - t0,
                loss.item() if loss is not None else float("nan"), exact_now, stop)
    return done


def sft_stop(recent: list[tuple[float, float]], cfg) -> str:
    """Why the warm-up stops now (its log suffix), or "" to go on: the means over the last `SFT_STOP_WINDOW` steps of
    (loss, greedy-exact fraction) against `cfg.sft_stop_loss` and `cfg.sft_stop_exact`."""
    if len(recent) < SFT_STOP_WINDOW:
        return ""
    loss = sum(r[0] for r in recent) / len(recent)
    exact = sum(r[1] for r in recent) / len(recent)
    if loss <= cfg.sft_stop_loss:
        return f", stopped at a mean loss <= {cfg.sft_stop_loss:g} over the last {SFT_STOP_WINDOW} steps"
    if cfg.sft_stop_exact and exact >= cfg.sft_stop_exact:
        return (f", stopped at a mean greedy-exact fraction >= {cfg.sft_stop_exact:g} over the last "
                f"{SFT_STOP_WINDOW} steps")
    return ""


def exact_targets(logits_TV: torch.Tensor, target_ids_T: torch.Tensor, seq_idx_T: torch.Tensor, num_seqs: int) -> int:
    """How many of a micro-batch's targets greedy decoding reproduces: the argmax is right at every target token
    (teacher forcing: each position sees the target's own prefix, as greedy decoding of a right answer does)."""
    wrong_T = (logits_TV.argmax(dim=-1) != target_ids_T).long()
    wrong_B = torch.zeros(num_seqs, dtype=torch.long, device=wrong_T.device).index_add_(0, seq_idx_T, wrong_T)
    return int((wrong_B == 0).sum())


def sft_target_ids(source, item, tokenizer, eos: list[int]) -> tuple[list[int], list[int] | None]:
    """The warm-up target's token ids and loss mask. A multi-turn task (`task.sft_turns`: (response, reply) pairs)
    gives an episode's tokens: each response ends with EOS and is trained on; the environment's replies are context
    only (mask 0), as in RL (r3rl.episodes). Otherwise: the target text + EOS, every token trained on (mask None)."""
    turns = getattr(getattr(source, "task", None), "sft_turns", None)
    if turns is None:
        return tokenizer.encode(source.sft_target(item), add_special_tokens=False) + eos, None
    ids, mask = [], []
    for response, reply in turns(item):
        model = tokenizer.encode(response, add_special_tokens=False) + eos
        env = tokenizer.encode(reply, add_special_tokens=False) if reply else []
        ids += model + env
        mask += [1] * len(model) + [0] * len(env)
    return ids, mask
