"""`r3rl verify-logs`, `r3rl plot` and `r3rl check` through the real command: a usage mistake is one line on stderr
with exit 2 (never a traceback, and never verify-logs' "fail" exit 1), naming what was wrong."""

import json

import pytest

from r3rl.cli import main

EVIDENCE = ("R3 wrapper: replay_forward branch taken (rank 0, n_tokens=8, topk=4, replay_idx_sum=100)\n"
            "R3 wrapper: replay_backward branch taken (rank 0, n_tokens=8, topk=4, replay_idx_sum=100)\n"
            "R3 check (rank 0, stage replay_forward): n_tokens=8 mismatch=0 (0.00%)\n")


def r3rl(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "rank0.log"
    path.write_text(EVIDENCE)
    return path


def test_verify_logs_json_into_a_directory_is_a_usage_error_not_a_verdict(tmp_path, log, capsys):
    assert r3rl("verify-logs", log, "--json", tmp_path / "report.json") == 0  # the negative control: a pass
    assert json.loads((tmp_path / "report.json").read_text())["verdict"] == "pass"
    capsys.readouterr()
    assert r3rl("verify-logs", log, "--json", tmp_path) == 2  # was a traceback with exit 1, read as "fail"
    assert f"--json {tmp_path} is a directory" in last_error(capsys)


def test_verify_logs_of_a_binary_file_names_it(tmp_path, log, capsys):
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    assert r3rl("verify-logs", log, binary) == 2
    assert f"{binary}:1: a NUL byte at byte " in last_error(capsys)


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    rows = [{"step": i, "reward_mean": 0.1 * i, "routing_mismatch": 0.0, "routing_mismatch_per_layer": [0.0, 0.0]}
            for i in range(3)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_plot_out_onto_an_existing_file_is_a_one_line_error(tmp_path, run_dir, capsys):
    taken = tmp_path / "plots.png"
    taken.write_text("")
    assert r3rl("plot", run_dir, "--out", taken) == 2  # was a FileExistsError traceback, exit 1
    assert f"--out {taken} is a file: give a directory" in last_error(capsys)
    assert r3rl("plot", run_dir, "--out", taken / "sub") == 2
    assert f"--out {taken / 'sub'}: cannot create the directory" in last_error(capsys)
    assert r3rl("plot", run_dir, "--out", tmp_path / "plots") == 0  # the negative control


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00", b'{"step": 0}\n{"step": 1, "x": "\xff\xfe"}\n'])
def test_plot_of_a_binary_metrics_file_names_it(run_dir, capsys, content):
    (run_dir / "metrics.jsonl").write_bytes(content)
    assert r3rl("plot", run_dir) == 2
    err = last_error(capsys)
    assert f"{run_dir / 'metrics.jsonl'}:" in err and ("NUL byte" in err or "not UTF-8 text" in err)


def test_check_with_a_missing_model_dir_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert r3rl("check", "--use-rollout-routing-replay", "--device", "cpu", "--model", missing) == 2
    assert f"--model {missing}: no such checkpoint directory" in last_error(capsys)
