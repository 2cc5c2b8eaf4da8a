"""`--apply-chat-template`: the embedded tokenizer ships a chat template (as real checkpoints do), transformers 5.x's
`BatchEncoding` from `apply_chat_template` is read as token ids, and `r3rl train --apply-chat-template` runs on the
default."""

import json

import pytest

from r3rl.cli import main
from r3rl.models.chat import encode_prompt
from r3rl.models.presets import init_model, make_tokenizer


def test_encode_prompt_renders_one_user_message_as_token_ids():
    tok = make_tokenizer()
    ids = encode_prompt(tok, "reverse: abc", chat_template=True)
    assert all(isinstance(i, int) for i in ids)  # not the BatchEncoding's keys
    assert tok.decode(ids) == "user: reverse: abc\nassistant: "
    assert encode_prompt(tok, "reverse: abc") == tok.encode("reverse: abc", add_special_tokens=False)


def test_a_tokenizer_without_a_chat_template_is_refused_by_name():
    tok = make_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match=r"--apply-chat-template: the tokenizer \(\w+, no path\) has no "
                                         r"chat template"):
        encode_prompt(tok, "abc", chat_template=True)


def test_init_model_saves_the_chat_template(tmp_path):
    from transformers import AutoTokenizer

    init_model("tiny-qwen3-moe", tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m", local_files_only=True)
    assert tok.decode(encode_prompt(tok, "x", chat_template=True)) == "user: x\nassistant: "


def test_train_with_apply_chat_template_runs_on_the_default(tmp_path, capsys):
    rc = main(["train", "--apply-chat-template", "--use-rollout-routing-replay", "--enable-r3-correctness-check",
               "--num-rollout", "1", "--rollout-batch-size", "2", "--n-samples-per-prompt", "2",
               "--rollout-max-response-len", "4", "--sft-steps", "1", "--sft-batch-size", "4", "--eval-interval", "0",
               "--no-progress", "--run-dir", str(tmp_path / "run")])
    assert rc == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["verdict"] == "pass"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["apply_chat_template"] is True
