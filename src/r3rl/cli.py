"""`r3rl` command line: with cli_common.py and cli_train.py, the only modules that know argparse. Flags carry miles'
names where miles has them.

    r3rl init-model --preset tiny-qwen3-moe --out /tmp/tiny
    r3rl check --use-rollout-routing-replay --enable-r3-correctness-check --report r3_report.json
    r3rl serve --model /tmp/tiny --host 127.0.0.1 --port 30000
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from r3rl.cli_common import (  # noqa: F401  (re-exported: r3rl.cli.X is where users and tests find them)
    DEVICE_HELP,
    PRESET_CHOICES,
    REWARD_CHOICES,
    REWARD_TIMEOUT_S,
    _check_device,
    _check_output_path,
    _resolve_device,
    add_replay_flags,
    replay_config_from_args,
)
from r3rl.cli_train import TRAIN_FLAG_DEFAULTS, add_train_parser, run_train, train_config_from_args  # noqa: F401

__all__ = ["main", "build_parser", "train_config_from_args", "TRAIN_FLAG_DEFAULTS"]

logger = logging.getLogger("r3rl.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r3rl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--log-level", default=os.environ.get("R3RL_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-model", help="write a random-init HF MoE checkpoint from a preset")
    p.add_argument("--preset", required=True, choices=PRESET_CHOICES, metavar="PRESET",
                   help="one of: %(choices)s")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16")

    p = sub.add_parser("check", help="R3 end-to-end regression: rollout, replay, check, JSON report, exit 0/1")
    add_replay_flags(p)
    p.add_argument("--model", default=None, help="local HF MoE checkpoint (default: make --preset on the fly)")
    p.add_argument("--preset", default="tiny-qwen3-moe", choices=PRESET_CHOICES, metavar="PRESET",
                   help="one of: %(choices)s")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--inject-fault", default="none", choices=["none", "shift", "permute-layers"],
                   help="negative control: corrupt the trace before replay (the check must fail)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (the precision RL runs in) | float32 | float16")
    p.add_argument("--batch-size", type=int, default=8, help="rollouts in the batch")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--rollout", default="engine", choices=["engine", "hf"],
                   help="engine: r3rl's rollout engine (default); hf: the HF model token by token with a KV cache")
    p.add_argument("--turns", type=int, default=1, help="multi-turn: episodes of N responses from the engine, "
                   "--observation-len environment tokens between them; replay and check over whole episodes")
    p.add_argument("--observation-len", type=int, default=4, help="multi-turn: tokens the environment appends")
    p.add_argument("--rollout-url", default=None, help="sample from this r3rl serve / SGLang / vLLM server instead "
                   "(the check's model is synced to it first through a temporary checkpoint)")
    p.add_argument("--rollout-engine", choices=["auto", "r3rl", "sglang", "vllm"], default="auto",
                   help="what --rollout-url is (auto: ask it)")
    p.add_argument("--compile", action="store_true",
                   help="training forwards through r3rl's regional torch.compile (as r3rl train --compile)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)

    add_train_parser(sub)
    _add_report_parsers(sub)

    p = sub.add_parser("serve", help="SGLang-compatible /generate server on the built-in rollout engine")
    p.add_argument("--model", required=True, help="local HF MoE checkpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--max-slots", type=int, default=64, help="concurrent sequences in the engine's KV cache")
    p.add_argument("--max-seq-len", type=int, default=1024, help="prompt + generated tokens per sequence")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV cache capacity in tokens, paged and shared by all sequences (default: max-slots x "
                        "max-seq-len); when full, the newest requests are preempted and recomputed")
    p.add_argument("--kv-block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--max-hold-steps", type=int, default=0,
                   help="hold new requests up to this many engine steps while others run, so prefills come in "
                        "batches (0: admit at once)")
    p.add_argument("--moe-kernel", choices=["fused", "grouped_mm"], default="fused",
                   help="CUDA experts: the fused Triton kernels where they apply (default), or torch's grouped_mm")
    p.add_argument("--disable-overlap-schedule", action="store_true",
                   help="read each decode step back before launching the next (default with CUDA graphs: the next "
                        "step is queued first, so the host's scheduling overlaps the device)")
    p.add_argument("--device", default=None, help="engine device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None,
                   help="bfloat16 | float32 | float16 (default: bfloat16 on cuda, else float32)")
    p.add_argument("--drain-timeout-s", type=float, default=120.0,
                   help="on the first SIGTERM/SIGINT, wait this long for in-flight requests")
    p.add_argument("--keep-alive-timeout-s", type=float, default=75.0, help="close idle keep-alive connections after")
    p.add_argument("--max-body-bytes", type=int, default=64 * 2**20, help="larger request bodies are answered 413")
    p.add_argument("--api-key", default=os.environ.get("R3RL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the weight-update endpoints (default: $R3RL_API_KEY; "
                        "the environment keeps the key out of the process list)")
    p.add_argument("--require-api-key-for-generate", action="store_true",
                   help="/generate requires the API key too (default: only the weight-update endpoints)")
    p.add_argument("--dist-timeout-s", type=float, default=120.0,
                   help="NCCL/gloo weight sync: a rendezvous and each received tensor must complete within this")
    p.add_argument("--body-read-timeout-s", type=float, default=60.0,
                   help="a request body must arrive within this (408 and the connection closed otherwise)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not isinstance(logging.getLevelName(args.log_level.upper()), int):
        parser.error(f"--log-level {args.log_level!r}: choose one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    rank = os.environ.get("RANK") if "WORLD_SIZE" in os.environ else None  # torchrun: every line says its rank
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s " + (f"[rank {rank}] " if rank is not None else "") +
                        "%(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))  # one line per request
    if args.command == "init-model":
        from r3rl.models import resolve_dtype
        from r3rl.models.presets import init_model

        out = init_model(args.preset, args.out, seed=args.seed, dtype=resolve_dtype(args.dtype))
        print(f"wrote {args.preset} to {out}")
        return 0
    if args.command == "check":
        try:
            cfg = _check_config(args)
        except ValueError as e:  # bad flag values: argparse's exit code 2, not the verdict's 1
            parser.error(str(e))
        return _check(cfg)
    if args.command == "serve":
        from r3rl.rollout.engine.config import EngineConfig
        from r3rl.rollout.net.config import ServerConfig
        from r3rl.rollout.net.server import serve

        try:
            cfg = ServerConfig(
                model=args.model, host=args.host, port=args.port, drain_timeout_s=args.drain_timeout_s,
                keep_alive_timeout_s=args.keep_alive_timeout_s, max_body_bytes=args.max_body_bytes,
                max_hold_steps=args.max_hold_steps, api_key=args.api_key,
                require_api_key_for_generate=args.require_api_key_for_generate, dist_timeout_s=args.dist_timeout_s,
                body_read_timeout_s=args.body_read_timeout_s,
                log_level=args.log_level, engine=EngineConfig(max_slots=args.max_slots, max_seq_len=args.max_seq_len,
                                                              kv_cache_tokens=args.kv_cache_tokens,
                                                              block_size=args.kv_block_size,
                                                              fused_moe=args.moe_kernel == "fused",
                                                              overlap_schedule=(False if args.disable_overlap_schedule
                                                                                else None),
                                                              device=args.device, dtype=args.dtype))
        except ValueError as e:  # bad flag values: exit 2 with one line, before the model loads
            parser.error(str(e))
        return serve(cfg)
    if args.command == "train":
        try:
            cfg = train_config_from_args(args)
        except ValueError as e:
            parser.error(str(e))
        try:
            return run_train(cfg)
        except (ValueError, FileNotFoundError) as e:  # bad data line, reward spec, checkpoint: one line, exit 2
            parser.error(str(e))
    if args.command == "plot":
        from r3rl.commands.plot import plot_runs

        out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "plots"
        try:
            paths = plot_runs([Path(d) for d in args.run_dirs], out)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
        for path in paths:
            print(path)
        return 0
    if args.command == "verify-logs":
        try:
            return _verify_logs(args)
        except ValueError as e:
            parser.error(str(e))
    raise AssertionError(args.command)


def _add_report_parsers(sub) -> None:
    p = sub.add_parser("plot", help="PNG plots of one or more runs (reward, KL, log-prob diff, routing heatmap)")
    p.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl")
    p.add_argument("--out", default=None, help="output directory (default: FIRST_RUN_DIR/plots)")
    p = sub.add_parser("verify-logs", help="R3 verdict from logs alone (r3rl or miles evidence lines), exit 0/1")
    p.add_argument("logs", nargs="+", help="log files (one per rank, or one for all)")
    p.add_argument("--json", default=None, help="write the JSON report here")
    p.add_argument("--threshold", type=float, default=None,
                   help="mismatch fraction allowed (default: $R3RL_TEST_R3_THRESHOLD, $MILES_TEST_R3_THRESHOLD, 1e-2)")


def _verify_logs(args) -> int:
    import json

    from r3rl.commands.verify_logs import verify_logs

    _check_output_path("--json", args.json)  # before the verdict: exit 2, never mistaken for a "fail" (exit 1)
    report = verify_logs([Path(p) for p in args.logs], threshold=args.threshold)
    if args.json:
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        except OSError as e:
            raise ValueError(f"--json {args.json}: cannot write the report ({e.strerror or e})") from None
    print(json.dumps(report, indent=2))
    return 0 if report["verdict"] == "pass" else 1


def _check_config(args: argparse.Namespace):
    from r3rl.check import resolve_threshold
    from r3rl.config import CheckRunConfig, Fault, ReplayKind, RolloutKind
    from r3rl.models import resolve_dtype

    args.device = _resolve_device(args.device)
    _check_device(args.device)
    resolve_dtype(args.dtype)
    _check_output_path("--report", args.report)
    if args.model is not None and not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model}: no such checkpoint directory"
                         + (" (it is a file)" if Path(args.model).exists() else ""))
    replay = replay_config_from_args(args)
    resolve_threshold(replay.r3_check_threshold)  # a bad $R3RL_TEST_R3_THRESHOLD is a flag error too
    if replay.kind is ReplayKind.NONE:
        raise ValueError("r3rl check verifies a replay mode: add --use-rollout-routing-replay (R3) or "
                         "--use-routing-replay (R2); without one there is nothing to verify")
    return CheckRunConfig(
        replay=replay, model=args.model, preset=args.preset, device=args.device,
        dtype=args.dtype, batch_size=args.batch_size, prompt_len=args.prompt_len, response_len=args.response_len,
        temperature=args.temperature, seed=args.seed, rollout=RolloutKind(args.rollout), report=args.report,
        inject_fault=Fault(args.inject_fault), turns=args.turns, observation_len=args.observation_len,
        rollout_url=args.rollout_url, rollout_engine=args.rollout_engine, compile=args.compile,
    )


def _check(cfg) -> int:
    from r3rl.commands.check import run_check

    report = run_check(cfg)
    brief = {k: report.get(k) for k in ("verdict", "reason", "counts", "tokens_checked", "without_replay",
                                         "with_replay", "replay_target_mismatch")}
    import json

    print(json.dumps(brief, indent=2))
    return 0 if report["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
