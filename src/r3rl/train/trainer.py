"""Trainer: builds the run (model, reference, replay + check, rollout backend, prompts, optimizer), warms the
policy up with a few supervised steps on the task's targets, runs RL steps (`step.rl_step`), and writes everything
under the run directory (by default a new `runs/<date>-<time>`, `runs/latest` linked to it): config.json,
metrics.jsonl (+ TensorBoard, + Weights & Biases with `use_wandb`), samples.jsonl (a few greedy completions per
evaluation), summary.json with the R3 check's verdict over the run (and the step that failed, if one did), plots/ at
the end, checkpoints under `--save`.

Evaluation is on held-out prompts: `eval_data`, else a seeded split of `prompt_data` that training never sees (a
built-in task evaluates on its own seeded stream). The in-process engine is sized from the data: the longest
tokenized prompt plus `rollout_max_response_len`, per slot.

Under torchrun (`r3rl.train.parallel`) the policy and the reference are sharded with FSDP2 after the warm-up
(which every rank runs identically, then rank 0's weights are broadcast), each rank has its own colocated engine,
and rank 0 alone writes the run directory. Checkpoints are sharded (torch.distributed.checkpoint) plus an HF
export (`r3rl.train.checkpoint`).

    summary = Trainer(TrainConfig(replay=ReplayConfig(use_rollout_routing_replay=True,
                                                      enable_r3_correctness_check=True))).run()
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from r3rl.check import ReplayCheck, resolve_threshold
from r3rl.episodes import EnvError
from r3rl.models import load_model, resolve_dtype
from r3rl.models.loading import set_activation_checkpointing
from r3rl.models.presets import make_model, make_tokenizer
from r3rl.replay import RoutingReplay
from r3rl.tasks.data import DataPart
from r3rl.tasks.reward_pool import RewardPool
from r3rl.tasks.rewards import RewardError, probe_reward
from r3rl.train.checkpoint import (
    capture_rng,
    load_optimizer_state,
    load_trainer_state,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
)
from r3rl.train.config import TrainConfig
from r3rl.train.data import plan_layout
from r3rl.train.metrics import MetricsWriter, RunSummary
from r3rl.train.parallel import DistEnv, RankZeroWeightSync, parallelize
from r3rl.train.progress import _brief, _Progress
from r3rl.train.regional_compile import compile_regions
from r3rl.train.run_dir import SampleLog, draw_plots, new_run_dir
from r3rl.train.setup import (
    TASK_MAX_PROMPT_LEN,
    _config_dict,
    _env_pool,
    _episode_settings,
    _load_tokenizer,
    _lock_dirs,
    _pad_id,
    _rollout_backend,
    _stop_ids,
    _wandb_settings,
    cpu_threads,
)
from r3rl.train.step import StepContext, _encode, rl_step
from r3rl.train.warmup import sft_warmup

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        # released / stopped by close(), or here when construction fails
        self.locks, self.reward, self.env_pool = [], None, None
        try:
            self._init(cfg)
        except BaseException:
            self._release()
            raise

    def _init(self, cfg: TrainConfig) -> None:
        self.env = env = DistEnv.from_environ(cfg.device)
        cfg = self.cfg = dataclasses.replace(cfg, device=env.device(cfg.device))
        if env.distributed and cfg.samples_per_optimizer_step % (cfg.n_samples_per_prompt * env.world_size):
            raise ValueError(f"under torchrun every rank trains on whole groups: global_batch_size "
                             f"({cfg.samples_per_optimizer_step}) must be a multiple of n_samples_per_prompt "
                             f"({cfg.n_samples_per_prompt}) x ranks ({env.world_size})")
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.resume_dir = resolve_checkpoint(cfg.load) if cfg.load else None
        self.state = load_trainer_state(self.resume_dir, rank=env.rank) if self.resume_dir else None
        self.run_dir = self._resolve_run_dir()
        cfg = self.cfg = dataclasses.replace(cfg, run_dir=str(self.run_dir))
        if env.is_main:  # one trainer per run dir and save dir; creates them, refuses one that cannot be written
            self.locks = _lock_dirs(cfg)
        if cfg.custom_rm_path:  # the plug-in runs in a worker process, shared by every prompt source of the run
            self.reward = RewardPool(cfg.custom_rm_path, timeout_s=cfg.reward_timeout_s)
        self.holdout = self._holdout()
        self.prompts = _prompt_source(cfg, seed=cfg.seed, holdout=self.holdout, reward=self.reward)
        probe_reward(self.prompts)  # a reward that breaks its contract fails here, before any work
        self.model, self.tokenizer = self._load_policy()
        cpu_threads(cfg, self.model)
        self.env_pool = _env_pool(cfg, self.tokenizer, self.model)  # --env-path: loaded now, before any work
        # the layout this family trains in: one that cannot be packed correctly is trained padded (said once)
        self.layout_plan = plan_layout(self.model, cfg.layout, dtype=resolve_dtype(cfg.dtype), log=env.is_main)
        cfg = self.cfg = dataclasses.replace(cfg, layout=self.layout_plan.layout)
        self.prompts = _prompt_source(cfg, seed=cfg.seed, holdout=self.holdout, reward=self.reward)
        self.eval_source, self.eval_items = self._eval_set()
        self.start_step = 0
        if self.state is None:
            self._sft_warmup()
            if env.distributed and cfg.sft_steps:  # identical on every rank up to kernel nondeterminism: rank 0 wins
                for t in self.model.state_dict().values():
                    torch.distributed.broadcast(t, src=0)
        else:
            self.start_step = int(self.state["step"])
            self.prompts.load_state_dict(self.state["prompts"])
        self.ref_model = self._reference() if cfg.needs_reference else None
        rcfg = cfg.replay
        self.replay = RoutingReplay(self.model, strict=rcfg.strict)
        self.check = None
        if rcfg.check_enabled:
            self.check = ReplayCheck(self.replay.num_layers, self.replay.top_k,
                                     threshold=resolve_threshold(rcfg.r3_check_threshold), device=cfg.device)
            self.replay.check = self.check
        # the engine copies the full weights before sharding; later syncs gather them shard by shard
        self.rollout = _rollout_backend(cfg, self.model, self.run_dir, max_prompt_len=self._longest_prompt())
        if env.distributed and cfg.rollout_url:  # disaggregated: one writer of the weights for all ranks
            self.rollout = RankZeroWeightSync(self.rollout, env)
        context_fn = self.replay.checkpoint_context_fn if cfg.activation_checkpointing else None
        if env.distributed:
            parallelize(self.model, env, param_dtype=resolve_dtype(cfg.dtype), checkpoint_context_fn=context_fn)
            if self.ref_model is not None:
                parallelize(self.ref_model, env, param_dtype=resolve_dtype(cfg.dtype), trainable=False)
        elif context_fn is not None:
            set_activation_checkpointing(self.model, True, context_fn=context_fn)
        if cfg.compile:  # inside the checkpoint and FSDP2 wrappers; routers and hooks stay eager
            compile_regions(self.model, log=env.is_main)
            if self.ref_model is not None:
                compile_regions(self.ref_model, log=False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.adam_betas,
                                           fused=cfg.optimizer_fused,
                                           weight_decay=cfg.weight_decay)
        warmup = cfg.lr_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: min(1.0, (i + 1) / warmup) if warmup else 1.0)
        if self.state is not None:
            load_optimizer_state(self.resume_dir, self.model, self.optimizer, self.state, env=env)
            self.scheduler.load_state_dict(self.state["scheduler"])
            restore_rng(self.state["rng"])
        self.rollout.update_weights(self.model, version=self.start_step)  # the engine starts from our weights
        self.ctx = StepContext(
            cfg=cfg, model=self.model, replay=self.replay, check=self.check, rollout=self.rollout,
            prompts=self.prompts, tokenizer=self.tokenizer, optimizer=self.optimizer, scheduler=self.scheduler,
            ref_model=self.ref_model, stop_token_ids=_stop_ids(self.tokenizer), pad_id=_pad_id(self.tokenizer),
            env=env, layer_masks=self.layout_plan.layer_masks,
            **_episode_settings(cfg, self.prompts, env_pool=self.env_pool))

    def run(self) -> dict:
        cfg, main = self.cfg, self.env.is_main
        if main:
            (self.run_dir / "config.json").write_text(json.dumps(_config_dict(cfg), indent=2) + "\n")
        resumed = self.start_step if self.state else None
        writer = MetricsWriter(self.run_dir, truncate_after=resumed, wandb=_wandb_settings(cfg)) if main else None
        self.sample_log = SampleLog(self.run_dir, truncate_after=resumed) if main else None
        # the stages this run produces decide the verdict
        summary, error, step = RunSummary(recompute=cfg.activation_checkpointing), None, self.start_step
        try:
            with _Progress(cfg.num_rollout, self.start_step, enabled=cfg.progress and main) as progress:
                for step in range(self.start_step, cfg.num_rollout):
                    metrics = rl_step(self.ctx, step)
                    if cfg.eval_interval and (step % cfg.eval_interval == 0 or step + 1 == cfg.num_rollout):
                        metrics |= self.evaluate(step=step)
                    if writer is not None:
                        writer.write(metrics)
                    summary.add(metrics)
                    progress.update(metrics)
                    if main:
                        logger.info("step %d %s", step, _brief(metrics))
                    done = step + 1
                    if cfg.save and ((cfg.save_interval and done % cfg.save_interval == 0) or done == cfg.num_rollout):
                        self.save(done)
        except (AssertionError, RewardError, EnvError) as e:  # the R3 check, a --ci-test invariant or a plug-in failed
            error = str(e)
            summary.fail(step)
            raise
        except Exception as e:  # any other error: summary.json still names the step and the error
            error = f"{type(e).__name__}: {e}"
            summary.fail(step)
            raise
        finally:
            result = summary.to_dict(check_enabled=cfg.replay.check_enabled, error=error)
            result |= {"replay_mode": cfg.replay.kind.value, "run_dir": str(self.run_dir),
                       "world_size": self.env.world_size}
            if writer is not None:
                writer.close()
                (self.run_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
                if cfg.plots:
                    draw_plots(self.run_dir)
            self.close()
        return result

    def evaluate(self, *, step: int | None = None) -> dict:
        """Greedy decoding of the fixed held-out prompt set with the current weights: `eval_reward`, `eval_solved_frac`
        (the sampled rollouts' reward is noisier: temperature sampling over the whole vocabulary). The first
        `eval_samples_logged` completions go to the log and, with `step`, to RUN_DIR/samples.jsonl."""
        from r3rl.rollout.engine.messages import SamplingParams

        cfg, source, items = self.cfg, self.eval_source, self.eval_items
        greedy = SamplingParams(max_new_tokens=cfg.rollout_max_response_len, temperature=0.0,
                                stop_token_ids=_stop_ids(self.tokenizer), seed=0)
        if self.ctx.env_factory is not None:  # multi-turn: whole greedy episodes, the environment's reward
            from r3rl.episodes import run_episodes

            samples = run_episodes(self.rollout, [self.ctx.env_factory(it, self.tokenizer) for it in items], greedy,
                                   max_turns=self.ctx.max_turns, mixed_versions="keep")
            texts = [self.tokenizer.decode(s.response_ids) for s in samples]  # the whole episode, EOS shown
            rewards = [float(s.reward) for s in samples]
        else:
            samples = self.rollout.generate([_encode(self.ctx, it.prompt) for it in items], greedy)
            texts = [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
            rewards = [float(r) for r in source.rewards(texts, items)]
        shown = [{"prompt": it.prompt, "completion": text, "reward": r, "label": it.label}
                 for it, text, r in list(zip(items, texts, rewards, strict=True))[:cfg.eval_samples_logged]]
        if self.env.is_main:
            for i, row in enumerate(shown):
                logger.info("eval sample %d/%d%s: %r -> %r (label %r, reward %.3g)", i + 1, len(shown),
                            "" if step is None else f" at step {step}", row["prompt"], row["completion"],
                            row["label"], row["reward"])
            if step is not None and getattr(self, "sample_log", None) is not None and shown:
                self.sample_log.write(step, shown)
        out = {"eval_reward": sum(rewards) / len(rewards),  # every rank holds the same weights: no reduction
               "eval_solved_frac": sum(r >= 1.0 for r in rewards) / len(rewards)}
        if self.ctx.env_factory is not None:
            out["eval_turns_mean"] = sum(s.metadata["turns"] for s in samples) / len(samples)
        return out

    def save(self, step: int) -> Path:
        state = {"step": step, "scheduler": self.scheduler.state_dict(), "rng": capture_rng(),
                 "prompts": self.prompts.state_dict(), "config": _config_dict(self.cfg)}
        return save_checkpoint(self.cfg.save, step, model=self.model, tokenizer=self.tokenizer, state=state,
                               optimizer=self.optimizer, reference=self.ref_model, env=self.env)

    def close(self) -> None:
        self.replay.close()
        self.rollout.close()
        self.env.close()
        self._release()

    def _release(self) -> None:
        if self.reward is not None:
            self.reward.close()
        if self.env_pool is not None:
            self.env_pool.close()
        for lock in self.locks:
            lock.release()

    # --- construction ---------------------------------------------------------------------------------------------
    def _resolve_run_dir(self) -> Path:
        """`run_dir` when given; else a resumed run's own directory (from its checkpoint), else a new
        `runs/<date>-<time>` (rank 0 picks it, every rank gets its name)."""
        cfg, env = self.cfg, self.env
        if cfg.run_dir is not None:  # created (or refused, in one line) by its lock
            return Path(cfg.run_dir)
        saved = ((self.state or {}).get("config") or {}).get("run_dir")
        if saved and Path(saved).is_dir():
            name = saved
            logger.info("run directory: %s (the resumed run's, from its checkpoint)", name)
        else:
            name = str(new_run_dir()) if env.is_main else None
        if env.distributed:
            box = [name]
            torch.distributed.broadcast_object_list(box, src=0)
            name = box[0]
        if env.is_main:
            logger.info("run directory: %s (--run-dir DIR to choose one)", name)
        return Path(name)

    def _holdout(self) -> int:
        """Prompts of `prompt_data` held out for evaluation when no `eval_data` is given (0: no split)."""
        cfg = self.cfg
        if cfg.prompt_data is None or cfg.eval_data is not None or not cfg.eval_interval:
            return 0
        from r3rl.tasks import PromptDataset, default_holdout

        data = PromptDataset.from_file(cfg.prompt_data, input_key=cfg.input_key, label_key=cfg.label_key)
        n = len({it.prompt for it in data.items})
        k = default_holdout(n, cfg.eval_prompts)
        if self.env.is_main:
            logger.info("held-out evaluation: %d of the %d distinct prompts of %s are set aside and never trained on "
                        "(warm-up included); --eval-data FILE evaluates on a file of your own", k, n, cfg.prompt_data)
        return k

    def _eval_set(self):
        """The evaluation's source (for its reward) and its fixed items: the same at every evaluation and on resume.
        A file's prompts are each taken once (at most `eval_prompts`)."""
        cfg = self.cfg
        if not cfg.eval_interval:
            return None, []
        from r3rl.tasks import PromptDataset

        source = _prompt_source(cfg, seed=cfg.seed + 104729, part=DataPart.EVAL, holdout=self.holdout,
                                reward=self.reward)
        n = min(cfg.eval_prompts, len(source)) if isinstance(source, PromptDataset) else cfg.eval_prompts
        items = source.next_batch(n)
        if cfg.eval_data is not None and isinstance(self.prompts, PromptDataset):
            seen = {it.prompt for it in self.prompts.items}
            both = sum(it.prompt in seen for it in source.items)
            if both and self.env.is_main:
                logger.warning("%d of the %d prompts of --eval-data %s are also in --prompt-data %s: the evaluation "
                               "counts them as unseen", both, len(source), cfg.eval_data, cfg.prompt_data)
        if self.env.is_main:
            logger.info("evaluation: %d prompts from %s", len(items), cfg.eval_data or (
                f"the held-out split of {cfg.prompt_data}" if cfg.prompt_data else f"task '{cfg.task}' (own seed)"))
        return source, items

    def _longest_prompt(self) -> int | None:
        """Tokens of the longest prompt the engine will see (training and evaluation); None for a built-in task."""
        from r3rl.tasks import PromptDataset

        task = not isinstance(self.prompts, PromptDataset)
        if task and not isinstance(self.eval_source, PromptDataset):
            return None
        shim = SimpleNamespace(cfg=self.cfg, tokenizer=self.tokenizer)
        texts = {it.prompt for it in self.eval_items}
        if not task:
            texts |= {it.prompt for it in self.prompts.items}
        longest = max(len(_encode(shim, t)) for t in texts)
        return max(longest, TASK_MAX_PROMPT_LEN) if task else longest

    def _load_policy(self):
        cfg = self.cfg
        # FSDP2 keeps float32 master weights and computes in cfg.dtype (MixedPrecisionPolicy)
        dtype = torch.float32 if self.env.distributed else resolve_dtype(cfg.dtype)
        source = self.resume_dir or cfg.model
        if source is not None:
            model = load_model(source, device=cfg.device, dtype=dtype)
            tokenizer = _load_tokenizer(Path(source))
        else:
            model = make_model(cfg.preset, seed=cfg.seed, device=cfg.device, dtype=dtype)
            tokenizer = make_tokenizer()
        return model.eval(), tokenizer

    def _reference(self):
        """The frozen reference: the policy as RL starts (after the warm-up), saved with every checkpoint."""
        if self.resume_dir is not None and (self.resume_dir / "reference").is_dir():
            dtype = torch.float32 if self.env.distributed else resolve_dtype(self.cfg.dtype)
            ref = load_model(self.resume_dir / "reference", device=self.cfg.device, dtype=dtype)
        else:
            ref = copy.deepcopy(self.model)  # before RoutingReplay patches the policy's routers
        return ref.eval().requires_grad_(False)

    def _sft_warmup(self) -> None:
        """A few supervised steps on (prompt, target + EOS): a random policy never reaches a reward to learn from."""
        cfg = self.cfg
        if cfg.sft_steps == 0:
            return
        # its own stream (the RL cursor is not touched), on the same training part: no held-out prompt is learnt
        source = _prompt_source(cfg, seed=cfg.seed + 7919, holdout=self.holdout, reward=self.reward)
        sft_warmup(self.model, self.tokenizer, source, cfg, self.env, layer_masks=self.layout_plan.layer_masks)


# --- helpers --------------------------------------------------------------------------------------------------------
def _prompt_source(cfg: TrainConfig, *, seed: int, holdout: int, part: DataPart = DataPart.TRAIN, reward=None):
    """`holdout`: the prompts split off `prompt_data` for evaluation (Trainer.holdout), passed by every caller so that
    no training stream (RL or warm-up) can miss the split. `reward`: the run's one RewardPool for a plug-in."""
    from r3rl.tasks import make_prompt_source

    return make_prompt_source(task=cfg.task, prompt_data=cfg.prompt_data, input_key=cfg.input_key,
                              label_key=cfg.label_key, custom_rm_path=cfg.custom_rm_path, reward_fn=cfg.reward_fn,
                              seed=seed, part=part, eval_data=cfg.eval_data, holdout=holdout, split_seed=cfg.seed,
                              reward_timeout_s=cfg.reward_timeout_s, custom_reward=reward)


"""The in-process engine's prompt room for a built-in task (its prompts are a few dozen tokens)."""
