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
from pathlib import Path

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


class _LazyChoices:
    """argparse choices read from their module only when a value is checked or a subcommand's help is shown: building
    the parser (`r3rl --help`, `r3rl plot`) imports no torch or transformers."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def _names(self) -> list[str]:
        import importlib

        return sorted(getattr(importlib.import_module(self.module), self.name))

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


PRESET_CHOICES = _LazyChoices("r3rl.models.presets", "PRESETS")
REWARD_CHOICES = _LazyChoices("r3rl.tasks.rewards", "BUILTIN_REWARDS")
REWARD_TIMEOUT_S = 60.0  # = r3rl.tasks.reward_pool.DEFAULT_REWARD_TIMEOUT_S (test_cli_imports checks they agree)
DEVICE_HELP = "cpu, cuda, cuda:N, or auto: cuda when available, else cpu"


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
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)

    _add_train_parser(sub)
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
            return _train(cfg)
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


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="RL training (GRPO/GSPO/REINFORCE++) with R3/R2 replay, verified every step",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_replay_flags(p)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="local HF MoE checkpoint (default: make --preset on the fly)")
    g.add_argument("--preset", default="tiny-qwen3-moe", choices=PRESET_CHOICES, metavar="PRESET",
                   help="one of: %(choices)s")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--dtype", default=None, help="parameter dtype (default: bfloat16 on cuda, float32 on cpu)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("data and rewards")
    g.add_argument("--task", default="reverse", help="built-in task when no --prompt-data (reverse, sort, add; "
                   "guess: multi-turn episodes)")
    g.add_argument("--env-path", default=None, help="multi-turn environment: module:Class or file.py:Class, called "
                   "as f(prompt_item, tokenizer) (r3rl.episodes)")
    g.add_argument("--max-turns", type=int, default=None, help="model responses per episode at most (default: the "
                   "task's, else 4)")
    g.add_argument("--prompt-data", default=None, help="prompts as .jsonl or .parquet")
    g.add_argument("--input-key", default="prompt", help="prompt field of --prompt-data")
    g.add_argument("--label-key", default="label", help="label field of --prompt-data")
    g.add_argument("--apply-chat-template", action="store_true", help="render prompts with the chat template")
    g.add_argument("--custom-rm-path", default=None,
                   help="reward function f(response, item) -> float in [0, 1]: module:function or file.py:function "
                        "(item.prompt, item.label, item.metadata; the contract: r3rl/tasks/rewards.py); it runs in a "
                        "worker process")
    g.add_argument("--reward-timeout", type=float, default=REWARD_TIMEOUT_S,
                   help="seconds one --custom-rm-path call may take; past it the worker is killed and the run fails "
                        "naming the prompt")
    g.add_argument("--reward-fn", default="exact_match", choices=REWARD_CHOICES, metavar="NAME",
                   help="built-in reward for --prompt-data, against the label: one of %(choices)s")
    g.add_argument("--sft-steps", type=int, default=None, help="supervised warm-up steps on the labels before RL, "
                   "at most; unset: 100, --task guess: 200")
    g.add_argument("--sft-stop-loss", type=float, default=None,
                   help="end the warm-up early once its mean loss over 5 steps is at most this (0: never early); "
                        "unset: 0.45, --task guess: 0")
    g.add_argument("--sft-batch-size", type=int, default=64)
    g.add_argument("--sft-lr", type=float, default=3e-3)
    g = p.add_argument_group("rollout")
    g.add_argument("--rollout-url", nargs="+", default=[], help="r3rl serve / SGLang / vLLM server (default: "
                   "in-process engine); weights sync through the disk")
    g.add_argument("--rollout-engine", choices=["auto", "r3rl", "sglang", "vllm"], default="auto",
                   help="what the --rollout-url servers are (auto: ask each; vllm: /v1/completions with "
                        "routed_experts)")
    g.add_argument("--rollout-batch-size", type=int, default=16, help="prompts per step")
    g.add_argument("--n-samples-per-prompt", type=int, default=8, help="samples per prompt (a GRPO group)")
    g.add_argument("--rollout-temperature", type=float, default=1.0)
    g.add_argument("--rollout-top-p", type=float, default=1.0)
    g.add_argument("--rollout-max-response-len", type=int, default=None, help="tokens per response (an episode: "
                   "per turn); unset: 12, --task guess: 2 (one digit and EOS)")
    g.add_argument("--rollout-max-slots", type=int, default=128, help="in-process engine: sequences decoded together")
    g.add_argument("--rollout-dtype", default="bfloat16",
                   help="in-process engine's dtype, apart from --dtype (production: a bf16 rollout against fp32 "
                        "master weights; each weight sync casts into it): bfloat16 | float32 | float16 | same "
                        "(= --dtype)")
    g.add_argument("--rollout-kv-cache-tokens", type=int, default=None,
                   help="in-process engine: KV cache capacity in tokens (default: every slot at its longest)")
    g.add_argument("--weight-sync", choices=["disk", "nccl", "gloo"], default="disk",
                   help="--rollout-url servers: disk (/update_weights_from_disk, default) or a broadcast over an "
                        "nccl/gloo update group (/init_weights_update_group + /update_weights_from_distributed)")
    g.add_argument("--weight-sync-address", default="127.0.0.1",
                   help="nccl/gloo: this trainer's address, which the servers connect to")
    g.add_argument("--max-staleness", type=int, default=0,
                   help="weight versions a sample may lag before it is stale (default 0: synchronous)")
    g.add_argument("--stale-samples", choices=["error", "keep", "drop"], default="error",
                   help="stale samples: error (default), keep (train on them) or drop (advantage 0); counted in "
                        "the stale_frac metric")
    g.add_argument("--release-rollout-memory", action="store_true",
                   help="colocated engine: free its KV cache and CUDA graphs during the update, re-allocate for the "
                        "weight sync (SGLang's release/resume_memory_occupation)")
    g = p.add_argument_group("update")
    g.add_argument("--num-rollout", type=int, default=200, help="RL steps")
    g.add_argument("--global-batch-size", type=int, default=None, help="samples per optimizer step (default: all)")
    g.add_argument("--micro-batch-size", type=int, default=64, help="samples per micro-batch")
    g.add_argument("--max-tokens-per-mb", type=int, default=None, help="token budget per micro-batch")
    g.add_argument("--layout", default="packed", choices=["packed", "padded"], help="micro-batch layout")
    g.add_argument("--lr", type=float, default=None, help="RL learning rate; unset: 3e-4")
    g.add_argument("--lr-warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--no-activation-checkpointing", action="store_true",
                   help="do not checkpoint decoder layers (no recompute, so no replay_backward)")
    g.add_argument("--use-rollout-logprobs", action="store_true",
                   help="old-policy log-probs = the rollout's (default: a training forward before the update)")
    g = p.add_argument_group("loss (slime/miles names)")
    g.add_argument("--advantage-estimator", default="grpo", choices=["grpo", "gspo", "reinforce_plus_plus"])
    g.add_argument("--disable-grpo-std-normalization", action="store_true", help="Dr.GRPO: no std division")
    g.add_argument("--eps-clip", type=float, default=0.2)
    g.add_argument("--eps-clip-high", type=float, default=None, help="DAPO clip-higher (default: --eps-clip)")
    g.add_argument("--eps-clip-c", type=float, default=None, help="dual-clip constant (off by default)")
    g.add_argument("--loss-agg-mode", default=None,
                   choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"],
                   help="token-mean (default; GSPO: seq-mean-token-mean, as the paper and verl), seq-mean-token-mean, "
                        "or Dr.GRPO's seq-mean-token-sum-norm (per-sample token sum / --rollout-max-response-len)")
    g.add_argument("--use-kl-loss", action="store_true", help="KL(actor || reference) term in the loss")
    g.add_argument("--kl-loss-type", default="low_var_kl", choices=["k1", "k2", "k3", "low_var_kl"])
    g.add_argument("--kl-loss-coef", type=float, default=0.0)
    g.add_argument("--kl-coef", type=float, default=0.0, help="KL penalty subtracted from the reward")
    g.add_argument("--entropy-coef", type=float, default=0.0)
    g.add_argument("--use-tis", action="store_true", help="truncated importance sampling on rollout log-probs")
    g.add_argument("--tis-clip", type=float, default=2.0)
    g.add_argument("--tis-clip-low", type=float, default=0.0)
    g.add_argument("--use-rollout-mask", action="store_true",
                   help="IcePop-style: mask tokens whose train/rollout ratio leaves [--mask-low, --mask-high]")
    g.add_argument("--mask-low", type=float, default=0.5)
    g.add_argument("--mask-high", type=float, default=2.0)
    g.add_argument("--correction-level", default="token", choices=["token", "sequence"],
                   help="TIS/mask per token or per sequence")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-interval", type=int, default=20,
                   help="greedy evaluation on held-out prompts every N steps and after the last (0: off)")
    g.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts per evaluation")
    g.add_argument("--eval-data", default=None,
                   help="held-out evaluation prompts, .jsonl or .parquet with --prompt-data's keys (default with "
                        "--prompt-data: a fifth of its distinct prompts, at most --eval-prompts, is held out of "
                        "training)")
    g.add_argument("--eval-samples-logged", type=int, default=3,
                   help="greedy completions (prompt, completion, reward) per evaluation, to the log and "
                        "RUN_DIR/samples.jsonl")
    g = p.add_argument_group("outputs")
    g.add_argument("--run-dir", default=None,
                   help="config.json, metrics.jsonl, summary.json, samples.jsonl, TensorBoard, plots/ (default: a new "
                        "runs/YYYYmmdd-HHMMSS per run, runs/latest linked to it)")
    g.add_argument("--no-plots", action="store_true", help="do not draw RUN_DIR/plots/ when the run ends")
    g.add_argument("--use-wandb", action="store_true",
                   help="log to Weights & Biases too (pip install 'r3rl[wandb]'; WANDB_MODE=offline needs no network)")
    g.add_argument("--wandb-project", default="r3rl", help="Weights & Biases project")
    g.add_argument("--wandb-run-name", default=None, help="Weights & Biases run name (default: the run directory's)")
    g.add_argument("--save", default=None, help="checkpoint directory (HF safetensors + trainer state)")
    g.add_argument("--save-interval", type=int, default=None, help="save every N steps (the last step always)")
    g.add_argument("--load", default=None, help="resume from a checkpoint directory")
    g.add_argument("--inject-fault", default="none", choices=["none", "shift", "permute-layers"],
                   help="negative control: corrupt the rollout trace at the first step (the check must fail)")
    g.add_argument("--no-progress", action="store_true", help="no live progress display")


def _add_report_parsers(sub) -> None:
    p = sub.add_parser("plot", help="PNG plots of one or more runs (reward, KL, log-prob diff, routing heatmap)")
    p.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl")
    p.add_argument("--out", default=None, help="output directory (default: FIRST_RUN_DIR/plots)")
    p = sub.add_parser("verify-logs", help="R3 verdict from logs alone (r3rl or miles evidence lines), exit 0/1")
    p.add_argument("logs", nargs="+", help="log files (one per rank, or one for all)")
    p.add_argument("--json", default=None, help="write the JSON report here")
    p.add_argument("--threshold", type=float, default=None,
                   help="mismatch fraction allowed (default: $R3RL_TEST_R3_THRESHOLD, $MILES_TEST_R3_THRESHOLD, 1e-2)")


TRAIN_FLAG_DEFAULTS = {"rollout_max_response_len": 12, "sft_steps": 100, "sft_stop_loss": 0.45, "lr": 3e-4}
"""`r3rl train` flags whose default depends on the task: a built-in task's `train_defaults` (r3rl.tasks), else these."""


def _apply_task_defaults(args: argparse.Namespace) -> None:
    """Fill the task-dependent flags the user did not set: the built-in task's defaults (none with --prompt-data or
    --env-path), else TRAIN_FLAG_DEFAULTS."""
    from r3rl.tasks import BUILTIN_TASKS

    builtin = not (args.prompt_data or args.env_path) and args.task in BUILTIN_TASKS
    own = getattr(BUILTIN_TASKS[args.task], "train_defaults", {}) if builtin else {}
    for name, value in TRAIN_FLAG_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, own.get(name, value))


def train_config_from_args(args: argparse.Namespace):
    from r3rl.config import Fault
    from r3rl.train.config import LogprobSource, StalePolicy, TrainConfig
    from r3rl.train.data import Layout
    from r3rl.train.losses import AdvantageEstimator, CorrectionLevel, KLType, LossAggMode, LossConfig

    _apply_task_defaults(args)
    loss = LossConfig(
        advantage_estimator=AdvantageEstimator(args.advantage_estimator), eps_clip=args.eps_clip,
        eps_clip_high=args.eps_clip_high, eps_clip_c=args.eps_clip_c, use_kl_loss=args.use_kl_loss,
        kl_loss_type=KLType(args.kl_loss_type), kl_loss_coef=args.kl_loss_coef, entropy_coef=args.entropy_coef,
        use_tis=args.use_tis, tis_clip=args.tis_clip, tis_clip_low=args.tis_clip_low,
        rollout_mask=args.use_rollout_mask, mask_low=args.mask_low, mask_high=args.mask_high,
        correction_level=CorrectionLevel(args.correction_level),
        loss_agg_mode=LossAggMode(args.loss_agg_mode) if args.loss_agg_mode else None,  # None: the estimator's
    )
    from r3rl.check import resolve_threshold
    from r3rl.models import resolve_dtype

    args.device = _resolve_device(args.device)
    _check_device(args.device)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    resolve_dtype(dtype)
    if args.run_dir is not None:
        _check_output_path("--run-dir", str(Path(args.run_dir) / "metrics.jsonl"))
    for flag, path in (("--prompt-data", args.prompt_data), ("--eval-data", args.eval_data)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: file not found")
    if args.use_wandb:
        from r3rl.train.metrics import wandb_available

        if not wandb_available():
            raise ValueError("--use-wandb needs the wandb package, which is not installed: pip install "
                             "'r3rl[wandb]' (or pip install wandb)")
    resolve_threshold(args.r3_check_threshold)
    rollout_dtype = None if args.rollout_dtype == "same" else args.rollout_dtype
    if rollout_dtype is not None:
        try:
            resolve_dtype(rollout_dtype)
        except ValueError as e:
            raise ValueError(f"--rollout-dtype: {e} (or same)") from None
    return TrainConfig(
        replay=replay_config_from_args(args), loss=loss, model=args.model, preset=args.preset, device=args.device,
        dtype=dtype, seed=args.seed, task=args.task, prompt_data=args.prompt_data, input_key=args.input_key,
        label_key=args.label_key, apply_chat_template=args.apply_chat_template, custom_rm_path=args.custom_rm_path,
        reward_fn=args.reward_fn, reward_timeout_s=args.reward_timeout, env_path=args.env_path,
        max_turns=args.max_turns, rollout_url=args.rollout_url, rollout_engine=args.rollout_engine,
        rollout_batch_size=args.rollout_batch_size,
        n_samples_per_prompt=args.n_samples_per_prompt, rollout_temperature=args.rollout_temperature,
        rollout_top_p=args.rollout_top_p, rollout_max_response_len=args.rollout_max_response_len,
        rollout_max_slots=args.rollout_max_slots, rollout_kv_cache_tokens=args.rollout_kv_cache_tokens,
        rollout_dtype=rollout_dtype,
        release_rollout_memory=args.release_rollout_memory,
        max_staleness=args.max_staleness, stale_samples=StalePolicy(args.stale_samples),
        weight_sync=args.weight_sync, weight_sync_address=args.weight_sync_address,
        num_rollout=args.num_rollout,
        global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size,
        max_tokens_per_mb=args.max_tokens_per_mb, layout=Layout(args.layout), lr=args.lr,
        lr_warmup_steps=args.lr_warmup_steps, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
        activation_checkpointing=not args.no_activation_checkpointing,
        old_logprobs=LogprobSource.ROLLOUT if args.use_rollout_logprobs else LogprobSource.TRAIN,
        grpo_std_normalization=not args.disable_grpo_std_normalization, kl_coef=args.kl_coef,
        sft_steps=args.sft_steps, sft_stop_loss=args.sft_stop_loss, sft_batch_size=args.sft_batch_size,
        sft_lr=args.sft_lr, run_dir=args.run_dir,
        save=args.save, save_interval=args.save_interval, load=args.load, inject_fault=Fault(args.inject_fault),
        progress=not args.no_progress, eval_interval=args.eval_interval or None, eval_prompts=args.eval_prompts,
        eval_data=args.eval_data, eval_samples_logged=args.eval_samples_logged, plots=not args.no_plots,
        use_wandb=args.use_wandb, wandb_project=args.wandb_project, wandb_run_name=args.wandb_run_name,
    )


def _train(cfg) -> int:
    import json

    from r3rl.tasks.rewards import RewardError
    from r3rl.train.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(cfg)
        summary = trainer.run()
    except (AssertionError, RewardError) as e:  # the R3 check failed ("R3 mismatch tokens (N) > threshold (M)"),
        # or the reward plug-in did (raised, exited, hung, died, or returned a value outside the contract)
        logger.error("r3rl train failed: %s", e)
        if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 reports for the run
            run_dir = trainer.cfg.run_dir if trainer is not None else cfg.run_dir
            print(json.dumps({"verdict": "fail", "error": str(e), "run_dir": run_dir}, indent=2))
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2))
    return 0 if summary["verdict"] in ("pass", "not_checked") else 1


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


def _check_output_path(flag: str, path: str | None) -> None:
    """An output file's folder must be creatable: checked before the work starts, not after it."""
    if path is None:
        return
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a directory")
            break
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a directory: give a file path")


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: r3rl runs on cpu or cuda")


def replay_config_from_args(args: argparse.Namespace):
    from r3rl.config import ReplayConfig

    return ReplayConfig(
        use_rollout_routing_replay=args.use_rollout_routing_replay, use_routing_replay=args.use_routing_replay,
        enable_r3_correctness_check=args.enable_r3_correctness_check, ci_test=args.ci_test,
        r3_check_threshold=args.r3_check_threshold,
    )


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
        rollout_url=args.rollout_url, rollout_engine=args.rollout_engine,
    )


def _check(cfg) -> int:
    from r3rl.commands.check import run_check

    report = run_check(cfg)
    brief = {k: report.get(k) for k in ("verdict", "reason", "counts", "tokens_checked", "without_replay",
                                         "with_replay", "replay_target_mismatch")}
    import json

    print(json.dumps(brief, indent=2))
    return 0 if report["verdict"] == "pass" else 1


def _resolve_device(device: str) -> str:
    """`auto` (the default) is cuda when available, else cpu; torch is imported here, not when the parser is built."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
