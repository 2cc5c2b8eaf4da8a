"""A built-in task is learnable by the tiny preset on CPU: a few supervised steps on (prompt, label + EOS) through the
byte tokenizer lift the greedy reward far above the random-init model's (the trainer's SFT warm-up relies on it)."""

import torch

from r3rl.models.presets import EOS_ID, PAD_ID, make_model, make_tokenizer
from r3rl.tasks import make_prompt_source


def _greedy_reward(model, tok, source, items, max_new=6) -> float:
    total = 0.0
    with torch.no_grad():
        for it in items:
            prompt = tok.encode(it.prompt, add_special_tokens=False)
            ids = list(prompt)
            for _ in range(max_new):
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
                if nxt == EOS_ID:
                    break
            total += source.reward(tok.decode(ids[len(prompt):], skip_special_tokens=True), it)
    return total / len(items)


def test_sort_is_learned_by_the_tiny_preset_in_a_few_sft_steps():
    torch.manual_seed(0)
    tok, model = make_tokenizer(), make_model("tiny-qwen3-moe", seed=0)
    source, held_out = make_prompt_source(task="sort", seed=0), make_prompt_source(task="sort", seed=99)
    test_items = held_out.next_batch(40)
    before = _greedy_reward(model.eval(), tok, source, test_items)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99))
    model.train()
    for _ in range(40):
        rows = []
        for it in source.next_batch(32):
            p = tok.encode(it.prompt, add_special_tokens=False)
            t = tok.encode(source.sft_target(it), add_special_tokens=False) + [EOS_ID]
            rows.append((p + t, [0] * len(p) + [1] * len(t)))
        width = max(len(ids) for ids, _ in rows)
        ids_BS = torch.tensor([ids + [PAD_ID] * (width - len(ids)) for ids, _ in rows])
        mask_BS = torch.tensor([m + [0] * (width - len(m)) for _, m in rows], dtype=torch.float32)[:, 1:]
        logp_BS = torch.log_softmax(model(ids_BS).logits[:, :-1].float(), -1).gather(-1, ids_BS[:, 1:, None])[..., 0]
        loss = -(logp_BS * mask_BS).sum() / mask_BS.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _greedy_reward(model.eval(), tok, source, test_items)
    assert before < 0.3 and after > 0.7, (before, after)
