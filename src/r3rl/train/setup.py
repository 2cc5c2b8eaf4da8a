"""What `Trainer` sets up around a run, apart from the loop (trainer.py): the run and save directory locks, the
rollout backend (the in-process engine sized from the data, or `--rollout-url` servers), the multi-turn episode
settings, Weights & Biases settings, the tokenizer's stop and pad ids, and the config as plain JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from r3rl.train.config import TrainConfig
from r3rl.train.lock import DirLock

logger = logging.getLogger("r3rl.train.trainer")


def _lock_dirs(cfg: TrainConfig) -> list[DirLock]:
    locks = []
    for flag, d in (("--run-dir", cfg.run_dir), ("--save", cfg.save)):
        if d is not None and all(Path(d).resolve() != lock.directory.resolve() for lock in locks):
            try:
                locks.append(DirLock.acquire(d, flag=flag))
            except BaseException:
                for lock in locks:
                    lock.release()
                raise
    return locks


def _wandb_settings(cfg: TrainConfig) -> dict | None:
    if not cfg.use_wandb:
        return None
    return {"project": cfg.wandb_project, "name": cfg.wandb_run_name or Path(cfg.run_dir).name,
            "config": _config_dict(cfg)}


def _env_pool(cfg: TrainConfig, tokenizer, model):
    """`--env-path`: an EnvPool (the user's environments live in a worker process with a copy of the tokenizer, every
    call bounded by `--env-timeout`, token ids checked against the model's embedding rows); None without it."""
    if not cfg.env_path:
        return None
    from r3rl.env_pool import EnvPool

    return EnvPool(cfg.env_path, tokenizer=tokenizer, vocab_size=model.get_input_embeddings().num_embeddings,
                   timeout_s=cfg.env_timeout_s)


def _episode_settings(cfg: TrainConfig, prompts, *, env_pool=None) -> dict:
    """Multi-turn rollouts: `--env-path` (its EnvPool, `_env_pool`), or the task's own environment (`guess`, r3rl's
    code: in this process); {} for single-turn tasks."""
    task = getattr(prompts, "task", None)
    factory = env_pool if env_pool is not None else getattr(task, "make_env", None)
    if factory is None:
        return {}
    return {"env_factory": factory, "max_turns": cfg.max_turns or getattr(task, "max_turns", 4)}


def _rollout_backend(cfg: TrainConfig, model, run_dir: Path, *, max_prompt_len: int | None = None):
    from r3rl.rollout.engine.config import EngineConfig
    from r3rl.rollout.net.backend import EngineBackend
    from r3rl.rollout.net.client import ModelShape
    from r3rl.rollout.net.fleet import make_backend

    at_temperature = cfg.rollout_temperature != 1.0  # log-probs of the distribution sampled (see step.py)
    if cfg.rollout_url:  # one server: HTTPBackend; several: FleetBackend (load spread, exactly-once re-send)
        return make_backend(cfg.rollout_url, weights_dir=str(run_dir / "weights"),
                            logprobs_at_temperature=at_temperature, weight_sync=cfg.weight_sync,
                            sync_address=cfg.weight_sync_address,
                            model_shape=ModelShape.of_model(model),  # SGLang's/vLLM's model info has no MoE shape
                            engine=cfg.rollout_engine)
    prompt_len = TASK_MAX_PROMPT_LEN if max_prompt_len is None else max_prompt_len
    max_seq_len = prompt_len + cfg.rollout_max_response_len
    engine_cfg = EngineConfig(max_slots=min(cfg.rollout_max_slots, cfg.num_samples), max_seq_len=max_seq_len,
                              kv_cache_tokens=cfg.rollout_kv_cache_tokens, device=cfg.device,
                              dtype=cfg.rollout_dtype or cfg.dtype)
    logger.info("rollout engine sized for %d tokens a sequence: %s %d prompt tokens + %d response tokens",
                max_seq_len, "a built-in task's at most" if max_prompt_len is None else "the data's longest",
                prompt_len, cfg.rollout_max_response_len)
    return EngineBackend.from_config(model, engine_cfg, logprobs_at_temperature=at_temperature)


TASK_MAX_PROMPT_LEN = 256


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} has no tokenizer the trainer can use ({type(e).__name__}: {e}); write one with "
                         "`r3rl init-model` or save the tokenizer into the checkpoint") from e


def _stop_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _config_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


SMALL_HIDDEN = 512
"""On CPU, a model this narrow or narrower runs on one intra-op thread unless told otherwise (`cpu_threads`)."""


def cpu_threads(cfg: TrainConfig, model) -> int:
    """Set torch's intra-op threads for a CPU run and return them: `cfg.cpu_threads`, else OMP_NUM_THREADS when set,
    else 1 for a model of hidden size <= SMALL_HIDDEN, else torch's default. Per-op work that small loses more to
    thread hand-offs than it gains: the embedded default took 2 min 51 s on one thread against 6 min 20 s on two (an
    idle 2-core machine, 164 s against 510 s of CPU)."""
    if str(cfg.device).split(":")[0] != "cpu":
        return torch.get_num_threads()
    n = cfg.cpu_threads
    if n is None and not os.environ.get("OMP_NUM_THREADS"):
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        n = 1 if hidden is not None and hidden <= SMALL_HIDDEN else None
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    logger.info("cpu: %d intra-op thread(s)%s", torch.get_num_threads(),
                "" if cfg.cpu_threads is not None or n is None else f" (hidden size <= {SMALL_HIDDEN}; --cpu-threads "
                "to change)")
    return torch.get_num_threads()
