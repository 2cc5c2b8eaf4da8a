"""TrainConfig: everything `r3rl train` needs, one documented field each. `cli.py` maps slime/miles flags onto it.

The defaults are the embedded default run: the `reverse` task on the `tiny-qwen3-moe` preset, on CPU, in a few
minutes (`r3rl train --use-rollout-routing-replay --enable-r3-correctness-check`).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from r3rl.config import Fault, ReplayConfig
from r3rl.train.data import Layout
from r3rl.train.losses import LossConfig

__all__ = ["TrainConfig", "LogprobSource", "StalePolicy"]


class LogprobSource(enum.StrEnum):
    ROLLOUT = "rollout"  # old-policy log-probs = the rollout engine's (slime --use-rollout-logprobs)
    TRAIN = "train"  # old-policy log-probs = a training forward before the update (the default)


class StalePolicy(enum.StrEnum):
    """What a step does with samples generated on weights older than `max_staleness` versions."""

    ERROR = "error"  # synchronous training: a stale sample means the weight sync did not reach the rollout
    KEEP = "keep"  # train on them (counted in `stale_frac`)
    DROP = "drop"  # out of the policy gradient (advantage 0), counted; groups and rank shares keep their shape


@dataclass(kw_only=True)
class TrainConfig:
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    # --- model --------------------------------------------------------------------------------------------------
    model: str | None = None
    """Local HF MoE checkpoint to train; None makes `preset` (random init, seeded)."""
    preset: str = "tiny-qwen3-moe"
    """Preset used when `model` is None."""
    device: str = "cpu"
    dtype: str = "float32"
    """Parameter dtype of the trained model (and the in-process engine). bfloat16 is pure-bf16 training."""
    cpu_threads: int | None = None
    """Intra-op threads of a CPU run; None: OMP_NUM_THREADS when set, else 1 for a model of hidden size <= 512
    (r3rl.train.setup.cpu_threads says why), else torch's default."""
    seed: int = 0
    """Seeds the model init, prompt order and every rollout's sampling seeds."""

    # --- data ---------------------------------------------------------------------------------------------------
    task: str = "reverse"
    """Built-in procedural task (prompts and reward) when `prompt_data` is None."""
    prompt_data: str | None = None
    """A .jsonl or .parquet file of prompts (slime --prompt-data)."""
    input_key: str = "prompt"
    label_key: str = "label"
    apply_chat_template: bool = False
    """Render each prompt with the tokenizer's chat template (as one user message) before tokenizing."""
    custom_rm_path: str | None = None
    """`module:function` or `file.py:function` reward, called as f(response_text, prompt_item) -> float."""
    reward_fn: str = "exact_match"
    """Built-in reward for `prompt_data` when no custom one is given (a name in r3rl.tasks.BUILTIN_REWARDS)."""
    reward_timeout_s: float = 60.0
    """Seconds one call of the `custom_rm_path` reward may take (it runs in a worker process, killed past this)."""
    env_path: str | None = None
    """Multi-turn rollouts: `module:Class` or `file.py:Class`, an environment factory called as f(prompt_item,
    tokenizer) (r3rl.episodes); each sample is then an episode. A task with its own environment (`guess`) needs none."""
    max_turns: int | None = None
    """Model responses per episode at most; None: the task's `max_turns` (guess: 4), else 4."""
    env_timeout_s: float = 60.0
    """Seconds one call of an `env_path` environment (factory, reset, step) may take (it runs in a worker process,
    killed past this; r3rl.env_pool)."""

    # --- rollout ------------------------------------------------------------------------------------------------
    rollout_url: list[str] = field(default_factory=list)
    """SGLang-compatible server(s) (`r3rl serve` or SGLang) or vLLM servers; empty: the in-process engine."""
    rollout_engine: str = "auto"
    """What the `rollout_url` servers are: auto (ask each), r3rl, sglang or vllm (r3rl.rollout.net.vllm_client)."""
    weight_sync: str = "disk"
    """`rollout_url` servers get new weights by "disk" (/update_weights_from_disk; works everywhere), or by "nccl" /
    "gloo" broadcast (/init_weights_update_group + /update_weights_from_distributed; GPUs on one network)."""
    weight_sync_address: str = "127.0.0.1"
    """nccl/gloo: the address of this trainer that the servers connect to (the update group's master)."""
    rollout_batch_size: int = 16
    """Prompts per step."""
    n_samples_per_prompt: int = 8
    """Samples per prompt (a GRPO group), each with its own seed."""
    rollout_temperature: float = 1.0
    rollout_top_p: float = 1.0
    rollout_max_response_len: int = 12
    """Tokens per response; in an episode, per turn (`r3rl train --task guess` defaults it to 2: a digit and EOS)."""
    rollout_dtype: str | None = "bfloat16"
    """In-process engine: its parameter dtype, apart from the trainer's `dtype`, as in production (SGLang/vLLM serve
    bf16, the trainer keeps fp32 master weights): every weight sync casts the trainer's tensors into it, so the
    rollout's routing and log-probs really differ from the training forward's (what R3 removes). None: `dtype`."""
    rollout_max_slots: int = 128
    """In-process engine: sequences decoded together."""
    rollout_kv_cache_tokens: int | None = None
    """In-process engine: KV cache capacity in tokens (None: every slot can reach its longest sequence)."""
    max_staleness: int = 0
    """Versions a sample's weights may lag the trainer's before it is stale (`stale_samples` decides what happens)."""
    stale_samples: StalePolicy = StalePolicy.ERROR
    release_rollout_memory: bool = False
    """In-process (colocated) engine: free its KV cache and decode graphs after each rollout and allocate them again
    before the weight sync, so the update can use that memory (SGLang's release/resume_memory_occupation)."""

    # --- update -------------------------------------------------------------------------------------------------
    num_rollout: int = 200
    """RL steps (one rollout each)."""
    global_batch_size: int | None = None
    """Samples per optimizer step; None: the whole rollout (rollout_batch_size * n_samples_per_prompt)."""
    micro_batch_size: int | None = 64
    """Samples per micro-batch (gradient accumulation inside an optimizer step)."""
    max_tokens_per_mb: int | None = None
    """Token budget per micro-batch (padded: B * longest, packed: sum); combines with micro_batch_size. With a budget
    the update groups samples longest first (like lengths together: a padded micro-batch pads to less, and the
    budget fills with fewer micro-batches; `pad_frac` in metrics.jsonl is the share of the update's computed
    positions that are padding)."""
    log_probs_max_tokens_per_mb: int | None = None
    """Token budget per micro-batch of the forwards without a backward (reference and old-policy log-probs), which
    keep no activations and so fit more tokens than the update's (slime's --log-probs-max-tokens-per-gpu). Set, those
    forwards are grouped by this budget alone, longest first; None: as the update (micro_batch_size,
    max_tokens_per_mb)."""
    layout: Layout = Layout.AUTO
    """Micro-batch layout: packed rows (position ids restart per sample), padded rows, or auto: packed where the
    attention implementation keeps samples apart without a dense mask (flash, flex), else padded (plan_layout)."""
    lr: float = 3e-4
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    optimizer_fused: bool | None = None
    """True: AdamW's fused CUDA kernel (one pass over each parameter; torchtitan's default) instead of the foreach
    chain (`--optimizer-fused`); None: torch's default (foreach on CUDA). On an H100 it took the probe's AdamW step
    from 61 to 35 ms of GPU time (one process; not yet run under FSDP2 on a GPU, so not the default)."""
    lr_warmup_steps: int = 0
    """Linear warm-up over this many optimizer steps, then constant."""
    old_logprobs: LogprobSource = LogprobSource.TRAIN
    grpo_std_normalization: bool = True
    """Divide group advantages by the group's reward std (off: Dr.GRPO, slime --disable-grpo-std-normalization)."""
    kl_coef: float = 0.0
    """KL(actor || reference) penalty subtracted from each sample's reward (slime --kl-coef)."""
    activation_checkpointing: bool = True
    """Checkpoint every decoder layer: the recompute in backward replays too (replay_backward)."""
    compile: bool = False
    """Regional torch.compile of the policy (and reference): per decoder layer, attention, norms and experts are
    compiled; routers, hooks and the layers' own forwards stay eager, so replay, the check and the experts tap run at
    every call (`r3rl.train.regional_compile`). The first step pays the compile."""
    sft_steps: int = 100
    """Supervised warm-up steps on the task's targets before RL (built-in tasks; 0 to skip): the most it takes."""
    sft_stop_loss: float = 0.45
    """The warm-up ends early once its mean token loss over 5 consecutive steps is at most this (0: never early).
    Seeds differ in when the embedded model "gets" the task (after 70 steps the greedy exact match was 20% for one
    seed, 82% for another): a loss bound starts RL from a like point whatever the seed, well below the ceiling, so
    RL's share of the learning shows."""
    sft_stop_exact: float | None = None
    """The warm-up ends early once, over 5 consecutive steps, this fraction of its batches' targets is reproduced
    exactly by greedy decoding (argmax right at every target token, EOS included, given the target's prefix: the
    same as greedy decoding reproducing the whole target), whatever the loss. None: off. A loss bound can be met
    while one answer position is still at chance (the other tokens near 0 loss carry the mean); this bound is on
    what the greedy evaluation measures, so every seed starts RL from a like exact-match rate. 0 is off too."""
    sft_batch_size: int = 64
    sft_lr: float = 3e-3

    # --- evaluation ---------------------------------------------------------------------------------------------
    eval_interval: int | None = 20
    """Greedy evaluation on `eval_prompts` held-out prompts every this many steps (and after the last); None: off."""
    eval_prompts: int = 256
    """Held-out prompts per evaluation (a built-in task's are drawn from its seeded stream; a file's: a fifth of its
    distinct prompts, at most this many). 256 keeps the greedy exact match's sampling noise near 3 points, well under
    the default run's learning effect."""
    eval_data: str | None = None
    """A .jsonl or .parquet file of held-out evaluation prompts (same keys as `prompt_data`). None with `prompt_data`:
    a seeded split of `prompt_data` (a fifth, at most `eval_prompts`) is held out of training and evaluated on."""
    eval_samples_logged: int = 3
    """Greedy completions (prompt, completion, reward) logged per evaluation, to the log and RUN_DIR/samples.jsonl."""

    # --- outputs ------------------------------------------------------------------------------------------------
    run_dir: str | None = None
    """Everything the run writes: config.json, metrics.jsonl, summary.json, samples.jsonl, TensorBoard events,
    plots/. None: a new `runs/<YYYYmmdd-HHMMSS>` per run (a suffix when taken), with `runs/latest` linked to it."""
    plots: bool = True
    """Draw the run's plots (`r3rl plot`) into RUN_DIR/plots/ when the run ends (needs matplotlib)."""
    use_wandb: bool = False
    """Log every step's scalars to Weights & Biases too (`pip install 'r3rl[wandb]'`; WANDB_MODE=offline works
    without a network)."""
    wandb_project: str = "r3rl"
    wandb_run_name: str | None = None
    """None: the run directory's name."""
    save: str | None = None
    """Checkpoint directory (HF safetensors + trainer state); the last step is always saved when set."""
    save_interval: int | None = None
    load: str | None = None
    """Resume from this checkpoint directory (its latest step) or a step directory in it."""
    inject_fault: Fault = Fault.NONE
    """Negative control: corrupt the rollout trace at the first step; the R3 check must fail."""
    progress: bool = True
    """Live rich progress display (off when not a terminal)."""
    ci_logprob_tol: float = 1e-3
    """--ci-test: step-0 max |actor - reference| log-prob difference under the same routing."""

    def __post_init__(self) -> None:
        if self.loss.token_sum_norm is None:  # seq-mean-token-sum-norm's constant: the generation budget (Dr.GRPO)
            self.loss.token_sum_norm = self.rollout_max_response_len
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1: got {self.cpu_threads}")
        for name in ("rollout_batch_size", "n_samples_per_prompt", "rollout_max_response_len", "num_rollout",
                     "rollout_max_slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1: got {getattr(self, name)}")
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1: got {self.max_turns}")
        for name in ("sft_steps", "lr_warmup_steps", "max_staleness", "sft_stop_loss"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0: got {getattr(self, name)}")
        for name in ("lr", "rollout_temperature", "rollout_top_p", "clip_grad", "sft_lr", "reward_timeout_s",
                     "env_timeout_s"):
            v = getattr(self, name)
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0: got {v}")
        if self.rollout_top_p > 1:
            raise ValueError(f"rollout_top_p must be in (0, 1]: got {self.rollout_top_p}")
        if self.micro_batch_size is None and self.max_tokens_per_mb is None:
            raise ValueError("set micro_batch_size or max_tokens_per_mb")
        for name in ("max_tokens_per_mb", "log_probs_max_tokens_per_mb"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (a token budget): got {getattr(self, name)}")
        if self.sft_stop_exact is not None and not (0 <= self.sft_stop_exact <= 1):
            raise ValueError(f"sft_stop_exact must be in [0, 1] (a fraction of targets; 0: off): got "
                             f"{self.sft_stop_exact}")
        if self.global_batch_size is not None and (
            self.global_batch_size < 1 or self.num_samples % self.global_batch_size
        ):
            raise ValueError(f"global_batch_size must divide rollout_batch_size * n_samples_per_prompt = "
                             f"{self.num_samples}: got {self.global_batch_size}")
        if self.eval_interval is not None and (self.eval_interval < 1 or self.eval_prompts < 1):
            raise ValueError(f"eval_interval and eval_prompts must be >= 1: got {self.eval_interval}, "
                             f"{self.eval_prompts}")
        if self.eval_samples_logged < 0:
            raise ValueError(f"eval_samples_logged must be >= 0: got {self.eval_samples_logged}")
        if self.save_interval is not None and self.save_interval < 1:
            raise ValueError(f"save_interval must be >= 1: got {self.save_interval}")
        if self.inject_fault is not Fault.NONE and not self.replay.check_enabled:
            raise ValueError("--inject-fault is a negative control of the R3 check: it needs a replay mode and "
                             "--enable-r3-correctness-check (or --ci-test)")
        if self.rollout_engine not in ("auto", "r3rl", "sglang", "vllm"):
            raise ValueError(f"rollout_engine must be auto, r3rl, sglang or vllm: got {self.rollout_engine!r}")
        if self.weight_sync not in ("disk", "nccl", "gloo"):
            raise ValueError(f"weight_sync must be disk, nccl or gloo: got {self.weight_sync!r}")
        if self.weight_sync != "disk" and not self.rollout_url:
            raise ValueError(f"--weight-sync {self.weight_sync} syncs rollout servers: it needs --rollout-url (the "
                             "in-process engine is synced in place)")
        if self.release_rollout_memory and self.rollout_url:
            raise ValueError("--release-rollout-memory frees the in-process engine's memory: it has no effect with "
                             "--rollout-url (the servers own theirs)")
        if self.kl_coef < 0 or not math.isfinite(self.kl_coef):
            raise ValueError(f"kl_coef must be a finite number >= 0: got {self.kl_coef}")
        if self.old_logprobs is LogprobSource.ROLLOUT and self.replay.kind.value == "r2":
            raise ValueError("R2 records routing in the old-policy training forward: it cannot use rollout "
                             "log-probs as old log-probs (drop --use-rollout-logprobs)")

    @property
    def num_samples(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt

    @property
    def samples_per_optimizer_step(self) -> int:
        return self.global_batch_size or self.num_samples

    @property
    def needs_reference(self) -> bool:
        return self.loss.use_kl_loss or self.kl_coef > 0 or self.replay.strict
