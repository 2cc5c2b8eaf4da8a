"""Prompt encoding: a task's prompt text to token ids, plainly or through the tokenizer's chat template, and the
small chat template the embedded byte-level tokenizer ships (real checkpoints ship theirs).

    ids = encode_prompt(tokenizer, "reverse: abc", chat_template=True)   # "user: reverse: abc\nassistant: "

transformers 5.x's `apply_chat_template(tokenize=True)` returns a `BatchEncoding` (its `list()` is its keys);
`encode_prompt` always returns the prompt's token ids.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["CHAT_TEMPLATE", "encode_prompt"]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- message['role'] + ': ' + message['content'] -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}"
)
"""`role: content` per message, one a line, the assistant's closed by EOS; the generation prompt is `assistant: `."""


def encode_prompt(tokenizer, prompt: str, *, chat_template: bool = False) -> list[int]:
    """`prompt` as token ids: as one user message through the tokenizer's chat template, or as plain text."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--apply-chat-template: the tokenizer ({type(tokenizer).__name__}, "
                             f"{getattr(tokenizer, 'name_or_path', '') or 'no path'}) has no chat template")
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                            add_generation_prompt=True)
        ids = out["input_ids"] if isinstance(out, Mapping) else out  # 5.x: a BatchEncoding; older: the ids
        ids = [int(i) for i in ids]
    else:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    if not ids:
        raise ValueError(f"prompt {prompt[:60]!r} tokenizes to no tokens: this tokenizer cannot encode it")
    return ids
