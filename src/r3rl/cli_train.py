"""`r3rl train`'s flags and their translation into a TrainConfig (task-dependent defaults included), and the run
itself with its JSON verdict. Part of the command line (cli.py builds the parser, cli_common.py holds what the
subcommands share)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from r3rl.cli_common import (
    DEVICE_HELP,
    ENV_TIMEOUT_S,
    PRESET_CHOICES,
    REWARD_CHOICES,
    REWARD_TIMEOUT_S,
    _check_device,
    _check_output_path,
    _resolve_device,
    add_replay_flags,
    replay_config_from_args,
)

__all__ = ["add_train_parser", "train_config_from_args", "TRAIN_FLAG_DEFAULTS", "run_train"]

logger = logging.getLogger("r3rl.cli")


def add_train_parser(sub) -> None:
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
    g.add_argument("--cpu-threads", type=int, default=None, help="intra-op threads on CPU (default: OMP_NUM_THREADS "
                   "if set, else 1 for a model of hidden size <= 512, where more threads cost more than they give)")
    g = p.add_argument_group("data and rewards")
    g.add_argument("--task", default="reverse", help="built-in task when no --prompt-data (reverse, sort, add; "
                   "guess: multi-turn episodes)")
    g.add_argument("--env-path", default=None, help="multi-turn environment: module:Class or file.py:Class, called "
                   "as f(prompt_item, tokenizer) (r3rl.episodes); it runs in a worker process (r3rl.env_pool)")
    g.add_argument("--env-timeout", type=float, default=ENV_TIMEOUT_S,
                   help="seconds one --env-path call (factory, reset, step) may take; past it the worker is killed "
                        "and the run fails naming the episode, turn and prompt")
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
                        "unset: 0.45, --task guess and reverse/sort/add: 0")
    g.add_argument("--sft-stop-exact", type=float, default=None,
                   help="end the warm-up early once, over 5 steps, this fraction of its targets is reproduced by "
                        "greedy decoding (argmax right at every target token; 0: off); unset: off, 0.4 for "
                        "reverse/sort/add")
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
    g.add_argument("--max-tokens-per-mb", type=int, default=None,
                   help="token budget per micro-batch; with it, samples are grouped longest first (less padding)")
    g.add_argument("--log-probs-max-tokens-per-mb", type=int, default=None,
                   help="token budget per micro-batch of the reference and old-policy forwards (no backward, so "
                        "larger than the update's; default: as the update)")
    g.add_argument("--layout", default="auto", choices=["auto", "packed", "padded"],
                   help="micro-batch layout; auto: packed under a varlen attention (flash, flex), else padded (sdpa "
                        "and eager read a packed row through a dense mask over all its tokens)")
    g.add_argument("--lr", type=float, default=None, help="RL learning rate; unset: 3e-4")
    g.add_argument("--lr-warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--no-activation-checkpointing", action="store_true",
                   help="do not checkpoint decoder layers (no recompute, so no replay_backward)")
    g.add_argument("--optimizer-fused", action="store_true",
                   help="AdamW's fused CUDA kernel instead of torch's default foreach chain")
    g.add_argument("--compile", action="store_true",
                   help="regional torch.compile: attention, norms and experts of every decoder layer; routers "
                        "(replay's patch points) and hooks stay eager")
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


TRAIN_FLAG_DEFAULTS = {"rollout_max_response_len": 12, "sft_steps": 100, "sft_stop_loss": 0.45, "sft_stop_exact": None,
                       "lr": 3e-4}
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
        env_timeout_s=args.env_timeout,
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
        max_tokens_per_mb=args.max_tokens_per_mb, log_probs_max_tokens_per_mb=args.log_probs_max_tokens_per_mb,
        layout=Layout(args.layout), lr=args.lr,
        lr_warmup_steps=args.lr_warmup_steps, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
        activation_checkpointing=not args.no_activation_checkpointing, compile=args.compile,
        optimizer_fused=True if args.optimizer_fused else None,
        old_logprobs=LogprobSource.ROLLOUT if args.use_rollout_logprobs else LogprobSource.TRAIN,
        grpo_std_normalization=not args.disable_grpo_std_normalization, kl_coef=args.kl_coef,
        sft_steps=args.sft_steps, sft_stop_loss=args.sft_stop_loss,
        sft_stop_exact=args.sft_stop_exact, cpu_threads=args.cpu_threads, sft_batch_size=args.sft_batch_size,
        sft_lr=args.sft_lr, run_dir=args.run_dir,
        save=args.save, save_interval=args.save_interval, load=args.load, inject_fault=Fault(args.inject_fault),
        progress=not args.no_progress, eval_interval=args.eval_interval or None, eval_prompts=args.eval_prompts,
        eval_data=args.eval_data, eval_samples_logged=args.eval_samples_logged, plots=not args.no_plots,
        use_wandb=args.use_wandb, wandb_project=args.wandb_project, wandb_run_name=args.wandb_run_name,
    )


def run_train(cfg) -> int:
    import json

    from r3rl.episodes import EnvError
    from r3rl.tasks.rewards import RewardError
    from r3rl.train.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(cfg)
        summary = trainer.run()
    except (AssertionError, RewardError, EnvError) as e:  # the R3 check failed ("R3 mismatch tokens (N) >
        # threshold (M)"), or a reward or --env-path plug-in did (raised, exited, hung, died, or returned a value
        # outside the contract)
        logger.error("r3rl train failed: %s", e)
        if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 reports for the run
            run_dir = trainer.cfg.run_dir if trainer is not None else cfg.run_dir
            print(json.dumps({"verdict": "fail", "error": str(e), "run_dir": run_dir}, indent=2))
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2))
    return 0 if summary["verdict"] in ("pass", "not_checked") else 1
