"""`r3rl` command line: the only module that knows argparse. Flags carry miles' names where miles has them.

    r3rl init-model --preset tiny-qwen3-moe --out /tmp/tiny
    r3rl check --use-rollout-routing-replay --enable-r3-correctness-check --report r3_report.json
    r3rl serve --model /tmp/tiny --host 127.0.0.1 --port 30000
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main", "build_parser"]

logger = logging.getLogger("r3rl.cli")


def add_replay_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("routing replay (miles names)")
    g.add_argument("--use-rollout-routing-replay", action="store_true",
                   help="R3: replay the rollout's experts in training forwards and their recompute (master switch)")
    g.add_argument("--use-routing-replay", action="store_true",
                   help="R2: record routing in the old-policy forward, replay it in the update")
    g.add_argument("--enable-r3-correctness-check", action="store_true",
                   help="check every replayed router call (live top-k vs replayed), log evidence, fail above threshold")
    g.add_argument("--ci-test", action="store_true",
                   help="CI mode: enables the correctness check plus strict invariants")
    g.add_argument("--r3-check-threshold", type=float, default=None,
                   help="allowed zero-overlap fraction of (token, layer) rows (default: $R3RL_TEST_R3_THRESHOLD, "
                        "$MILES_TEST_R3_THRESHOLD, else 1e-2)")


def build_parser() -> argparse.ArgumentParser:
    from r3rl.models.presets import PRESETS

    parser = argparse.ArgumentParser(prog="r3rl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--log-level", default=os.environ.get("R3RL_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-model", help="write a random-init HF MoE checkpoint from a preset")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16")

    p = sub.add_parser("check", help="R3 end-to-end regression: rollout, replay, check, JSON report, exit 0/1")
    add_replay_flags(p)
    p.add_argument("--model", default=None, help="local HF MoE checkpoint (default: make --preset on the fly)")
    p.add_argument("--preset", default="tiny-qwen3-moe", choices=sorted(PRESETS))
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--inject-fault", default="none", choices=["none", "shift", "permute-layers"],
                   help="negative control: corrupt the trace before replay (the check must fail)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (the precision RL runs in) | float32 | float16")
    p.add_argument("--batch-size", type=int, default=8, help="rollouts in the batch")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--rollout", default="engine", choices=["engine", "hf"],
                   help="engine: r3rl's rollout engine (default); hf: the HF model token by token with a KV cache")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("serve", help="SGLang-compatible /generate server on the built-in rollout engine")
    p.add_argument("--model", required=True, help="local HF MoE checkpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--max-slots", type=int, default=64, help="concurrent sequences in the engine's KV cache")
    p.add_argument("--max-seq-len", type=int, default=1024, help="prompt + generated tokens per sequence")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
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
        from r3rl.rollout.server import serve_main

        serve_main(model=args.model, host=args.host, port=args.port, max_slots=args.max_slots,
                   max_seq_len=args.max_seq_len, device=args.device, dtype=args.dtype)
        return 0
    raise AssertionError(args.command)


def replay_config_from_args(args: argparse.Namespace):
    from r3rl.config import ReplayConfig

    return ReplayConfig(
        use_rollout_routing_replay=args.use_rollout_routing_replay, use_routing_replay=args.use_routing_replay,
        enable_r3_correctness_check=args.enable_r3_correctness_check, ci_test=args.ci_test,
        r3_check_threshold=args.r3_check_threshold,
    )


def _check_config(args: argparse.Namespace):
    from r3rl.config import CheckRunConfig, Fault, RolloutKind

    return CheckRunConfig(
        replay=replay_config_from_args(args), model=args.model, preset=args.preset, device=args.device,
        dtype=args.dtype, batch_size=args.batch_size, prompt_len=args.prompt_len, response_len=args.response_len,
        temperature=args.temperature, seed=args.seed, rollout=RolloutKind(args.rollout), report=args.report,
        inject_fault=Fault(args.inject_fault),
    )


def _check(cfg) -> int:
    from r3rl.e2e import run_check

    report = run_check(cfg)
    brief = {k: report.get(k) for k in ("verdict", "reason", "counts", "tokens_checked", "without_replay",
                                         "with_replay", "replay_target_mismatch")}
    import json

    print(json.dumps(brief, indent=2))
    return 0 if report["verdict"] == "pass" else 1


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
