"""`r3rl check`: the R3 end-to-end regression in one command, with a JSON report and an exit code.

    r3rl check --use-rollout-routing-replay --enable-r3-correctness-check --report r3_report.json

Flow (one step of an RL update, minus the optimizer):
  (a) rollout: sample a batch with a KV cache, recording the experts of every token in every MoE layer and the
      rollout log-probs. `--rollout engine` (default) uses r3rl's rollout engine (its own kernels, static KV cache,
      continuous batching: a different numerical engine, as SGLang is); `--rollout hf` runs the HF model itself
      token by token with a DynamicCache;
  (b) training forwards over the full sequences: once without replay (the live router, as training would route
      without R3), once under replay (no grad), then a forward+backward with activation checkpointing under
      replay, so the recompute during backward replays too (stage replay_backward);
  (c) the check's summary (evidence lines), the metrics with and without replay, and the verdict into the report.
`--inject-fault shift|permute-layers` corrupts the trace before replay: the negative control, which must fail.
The experts actually used are read at the experts modules' inputs (`r3rl.experts_tap`), not from the replay code
under test, and counted against the rollout trace with the one definition `r3rl train` uses
(`r3rl.train.metrics.routing_mismatch_counts`). Under replay, `router_live_mismatch` is what the live router would
have chosen against the rollout trace: what the replay removed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from r3rl.check import CheckSummary, ReplayCheck, Stage, resolve_threshold
from r3rl.config import CheckRunConfig, Fault, ReplayKind, RolloutKind
from r3rl.experts_tap import ExpertsTap
from r3rl.faults import corrupt_ids
from r3rl.models import load_model, resolve_dtype
from r3rl.models.loading import cache_kwargs, set_activation_checkpointing
from r3rl.models.presets import make_model
from r3rl.replay import Recording, RoutingReplay
from r3rl.sample import Sample
from r3rl.trace import ReplayBatch, RoutingTrace
from r3rl.train.data import layout_padded
from r3rl.train.metrics import routing_mismatch_per_layer
from r3rl.train.regional_compile import compile_regions

__all__ = ["run_check", "inject_fault", "rollout_engine", "rollout_episodes", "rollout_hf_kv_cache", "rollout_http"]

logger = logging.getLogger(__name__)


def run_check(cfg: CheckRunConfig) -> dict:
    """Run the regression; returns the report (also written to `cfg.report`)."""
    device, dtype = torch.device(cfg.device), resolve_dtype(cfg.dtype)
    if cfg.model:
        model = load_model(cfg.model, device=device, dtype=dtype)
    else:
        model = make_model(cfg.preset, seed=cfg.seed, device=device, dtype=dtype)
    rcfg = cfg.replay
    check = None
    replay = RoutingReplay(model, strict=rcfg.strict)
    if rcfg.check_enabled:
        check = ReplayCheck(replay.num_layers, replay.top_k, threshold=resolve_threshold(rcfg.r3_check_threshold),
                            device=device)
        replay.check = check
    try:
        return _run(cfg, model, replay, check)
    finally:
        replay.close()


def rollout_engine(model: nn.Module, replay: RoutingReplay, cfg: CheckRunConfig) -> list[Sample]:
    """Sample with r3rl's rollout engine through the RolloutBackend the trainer uses (a copy of the weights; its own
    forward and KV cache). Each rollout is its own prompt with its own seed."""
    from r3rl.rollout.engine.messages import SamplingParams
    from r3rl.rollout.net.backend import EngineBackend

    backend = EngineBackend(model, max_slots=cfg.batch_size, max_seq_len=cfg.prompt_len + cfg.response_len,
                            device=cfg.device, dtype=cfg.dtype)
    try:
        return backend.generate(_prompts(model, cfg).tolist(), SamplingParams(
            max_new_tokens=cfg.response_len, temperature=cfg.temperature, seed=cfg.seed))
    finally:
        backend.close()  # free its weights and cache before training


def rollout_http(model: nn.Module, replay: RoutingReplay, cfg: CheckRunConfig) -> list[Sample]:
    """Sample from `cfg.rollout_url` (r3rl serve, SGLang or vLLM) through the HTTPBackend the trainer uses, after
    syncing this model's weights to it (a temporary checkpoint the server reads, then the version check, and for
    vLLM the served-weights check)."""
    import tempfile

    from r3rl.rollout.engine.messages import SamplingParams
    from r3rl.rollout.net.backend import HTTPBackend
    from r3rl.rollout.net.client import ModelShape

    with tempfile.TemporaryDirectory(prefix="r3rl-check-weights-") as weights_dir:
        backend = HTTPBackend(cfg.rollout_url, weights_dir=weights_dir, model_shape=ModelShape.of_model(model),
                              engine=cfg.rollout_engine)
        try:
            backend.update_weights(model, version=backend.weight_version + 1)
            return backend.generate(_prompts(model, cfg).tolist(), SamplingParams(
                max_new_tokens=cfg.response_len, temperature=cfg.temperature, seed=cfg.seed))
        finally:
            backend.close()


def rollout_episodes(model: nn.Module, replay: RoutingReplay, cfg: CheckRunConfig) -> list[Sample]:
    """Episodes of `cfg.turns` responses through the engine backend (r3rl.episodes): each later turn generates from
    the whole context and asks only for its new routing rows; between turns an environment appends
    `observation_len` random byte tokens. Every episode has the same length, every token a route."""
    from r3rl.episodes import EnvStep, run_episodes
    from r3rl.rollout.engine.messages import SamplingParams
    from r3rl.rollout.net.backend import EngineBackend

    class _NoiseEnv:
        def __init__(self, prompt: list[int], seed: int) -> None:
            self.prompt, self.gen = prompt, torch.Generator().manual_seed(seed)

        def reset(self) -> list[int]:
            return self.prompt

        def step(self, response_ids: list[int]) -> EnvStep:
            return EnvStep(observation_ids=torch.randint(0, 256, (cfg.observation_len,), generator=self.gen).tolist())

    length = cfg.prompt_len + cfg.turns * cfg.response_len + (cfg.turns - 1) * cfg.observation_len
    backend = EngineBackend(model, max_slots=cfg.batch_size, max_seq_len=length, device=cfg.device, dtype=cfg.dtype)
    envs = [_NoiseEnv(p, cfg.seed * 1000 + b) for b, p in enumerate(_prompts(model, cfg).tolist())]
    try:
        return run_episodes(backend, envs, SamplingParams(max_new_tokens=cfg.response_len,
                                                          temperature=cfg.temperature, seed=cfg.seed),
                            max_turns=cfg.turns)
    finally:
        backend.close()


def rollout_hf_kv_cache(model: nn.Module, replay: RoutingReplay, cfg: CheckRunConfig) -> list[Sample]:
    """Sample token by token with the HF model itself and a DynamicCache, recording routing with `record()`."""
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    prompts_BP = _prompts(model, cfg)
    cache = cache_kwargs(model, DynamicCache(config=model.config))
    tokens, logprobs = [], []
    with torch.no_grad(), replay.record() as rec:
        logits = model(prompts_BP, use_cache=True, **cache).logits[:, -1]
        for step in range(cfg.response_len):
            logp_BV = torch.log_softmax(logits.float(), dim=-1)
            probs_BV = torch.softmax(logits.float() / cfg.temperature, dim=-1)
            tok_B = torch.multinomial(probs_BV, 1, generator=gen).squeeze(1)
            tokens.append(tok_B)
            logprobs.append(logp_BV.gather(1, tok_B[:, None]).squeeze(1))
            if step + 1 < cfg.response_len:  # the last sampled token never goes through the model
                logits = model(tok_B[:, None], use_cache=True, **cache).logits[:, -1]
    traces = rec.decode_traces(cfg.batch_size)
    resp_BR, logp_BR = torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist()
    return [
        Sample(prompt_ids=prompts_BP[b].tolist(), response_ids=resp_BR[b], rollout_logprobs=logp_BR[b],
               trace=traces[b]).validate(num_layers=replay.num_layers, top_k=replay.top_k, index=b)
        for b in range(cfg.batch_size)
    ]


def inject_fault(batch: ReplayBatch, fault: Fault, batch_size: int) -> ReplayBatch:
    """Corrupt the laid-out replay batch of each of the `batch_size` samples (`r3rl.faults`)."""
    if fault is Fault.NONE:
        return batch
    ids_BSLK = batch.expert_ids.view(batch_size, -1, batch.num_layers, batch.top_k)
    logger.warning("injecting fault '%s' into the replay trace (negative control: the check must fail)", fault.value)
    return dataclasses.replace(batch, expert_ids=corrupt_ids(ids_BSLK, fault).reshape(batch.expert_ids.shape))


# --- private ------------------------------------------------------------------------------------------------------
def _prompts(model: nn.Module, cfg: CheckRunConfig) -> torch.Tensor:
    """Random byte-token prompts (the preset tokenizer's bytes), the same for both rollout paths."""
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = min(model.config.vocab_size, 256)
    return torch.randint(0, vocab, (cfg.batch_size, cfg.prompt_len), generator=gen).to(cfg.device)


@dataclass
class _ForwardResult:
    logprobs_BR: torch.Tensor
    used_BSLK: torch.Tensor  # experts the experts modules actually received


def _run(cfg: CheckRunConfig, model: nn.Module, replay: RoutingReplay, check: ReplayCheck | None) -> dict:
    rcfg = cfg.replay
    rollout = rollout_engine if cfg.rollout is RolloutKind.ENGINE else rollout_hf_kv_cache
    if cfg.turns > 1:
        rollout = rollout_episodes
    if cfg.rollout_url:
        rollout = rollout_http
    samples = rollout(model, replay, cfg)
    if cfg.compile:  # the training forwards only: routers and the experts tap's hooks stay eager
        compile_regions(model)
    B, P = cfg.batch_size, cfg.prompt_len
    R = samples[0].num_tokens - P  # episodes: every response and observation after the first prompt
    tokens_BS = torch.tensor([s.tokens for s in samples], device=cfg.device)
    rollout_logp_BR = torch.tensor([s.rollout_logprobs for s in samples], dtype=torch.float64)
    model_BR = torch.tensor([s.loss_mask or [1] * R for s in samples], dtype=torch.bool)  # log-probs: model tokens
    traces = [s.trace for s in samples]
    lengths = [s.num_tokens for s in samples]

    threshold = resolve_threshold(rcfg.r3_check_threshold)
    report: dict = {"verdict": "fail", "threshold": threshold, "replay_mode": rcfg.kind.value,
                    "check_enabled": rcfg.check_enabled, "inject_fault": cfg.inject_fault.value,
                    "model": cfg.model or f"preset:{cfg.preset}",
                    "rollout": cfg.rollout_url or cfg.rollout.value,
                    "device": str(cfg.device), "dtype": cfg.dtype, "compile": cfg.compile,
                    "batch_size": B, "prompt_len": P, "response_len": cfg.response_len, "turns": cfg.turns,
                    "episode_tokens": P + R}
    tap, E = ExpertsTap(model), replay.num_experts
    with torch.no_grad(), replay.off():
        live = _forward(model, tap, tokens_BS, P)
    report["without_replay"] = _metrics(live, traces, lengths, rollout_logp_BR, E, model_BR)

    if rcfg.kind is ReplayKind.NONE:
        report.update(reason="no replay mode enabled (--use-rollout-routing-replay or --use-routing-replay): nothing "
                      "to verify", with_replay=None, counts=_counts(replay, None), tokens_checked=0, layers=[])
        return _finish(cfg, report)

    if rcfg.kind is ReplayKind.R3:
        batch = layout_padded(traces, seq_len=P + R, lengths=lengths)
        targets, drop_last = traces, 1  # the last token has no rollout row
    else:  # R2: the old-policy forward records, the update replays
        with torch.no_grad(), replay.record() as rec:
            model(tokens_BS, use_cache=False)
        batch = rec.batch()
        targets, drop_last = _traces(batch.expert_ids.view(B, P + R, replay.num_layers, -1), lengths, 0, E), 0
    batch = inject_fault(batch, cfg.inject_fault, B)

    reason = None
    live_rec = Recording(replay.num_layers, E)  # the live top-k that the replay overrode
    with torch.no_grad(), replay.replay(batch, live=live_rec):
        replayed = _forward(model, tap, tokens_BS, P)
    set_activation_checkpointing(model, True, context_fn=replay.checkpoint_context_fn)
    model.train()
    try:
        with replay.replay(batch):
            logits = model(tokens_BS, use_cache=False).logits
            logp = torch.log_softmax(logits[:, P - 1 : -1].float(), -1).gather(-1, tokens_BS[:, P:, None])
            (-logp.mean()).backward()  # a policy-gradient-shaped loss; the recompute happens here
    finally:
        set_activation_checkpointing(model, False)
        model.eval()
    summary, calls = None, replay.calls.snapshot()  # before the summary, which ends the step and resets them
    if check is not None:
        try:
            summary = check.summary()
        except AssertionError as e:
            reason, summary = str(e), check.last_summary
            logger.error("R3 check failed: %s", e)
    report["with_replay"] = _metrics(replayed, traces, lengths, rollout_logp_BR, E, model_BR)
    live_BSLK = live_rec.batch().expert_ids.view(B, P + R, replay.num_layers, -1)
    report["with_replay"]["router_live_mismatch"] = _mismatch(traces, _traces(live_BSLK, lengths, 1, E))
    report["replay_target_mismatch"] = _mismatch(targets, _traces(replayed.used_BSLK, lengths, drop_last, E))
    report["counts"] = _counts(calls, summary)
    report["tokens_checked"] = summary.tokens_checked if summary else 0
    report["layers"] = [vars(layer) for layer in summary.layers] if summary else []
    report["verdict"], report["reason"] = _verdict(cfg, report, reason)
    return _finish(cfg, report)


def _forward(model: nn.Module, tap: ExpertsTap, tokens_BS: torch.Tensor, prompt_len: int) -> _ForwardResult:
    with tap.reading() as used:  # what the experts modules received
        logits = model(tokens_BS, use_cache=False).logits
    B, S = tokens_BS.shape
    logp_BR = torch.log_softmax(logits[:, prompt_len - 1 : -1].double(), -1).gather(-1, tokens_BS[:, prompt_len:, None])
    return _ForwardResult(logp_BR.squeeze(-1).cpu(), used.ids().view(B, S, tap.num_layers, -1))


def _metrics(fwd: _ForwardResult, traces: list[RoutingTrace], lengths: list[int], rollout_logp_BR: torch.Tensor,
             num_experts: int, model_BR: torch.Tensor | None = None) -> dict:
    mismatch = _mismatch(traces, _traces(fwd.used_BSLK, lengths, 1, num_experts))  # the last token: no rollout row
    log_ratio = fwd.logprobs_BR - rollout_logp_BR  # log p_train / p_rollout on rollout samples
    if model_BR is not None:  # episodes: observations have no rollout log-prob
        log_ratio = log_ratio[model_BR]
    k3 = (log_ratio.exp() - 1 - log_ratio).mean().item()
    return {"routing_mismatch": mismatch, "mean_abs_logprob_diff": log_ratio.abs().mean().item(), "k3_kl": k3}


def _traces(ids_BSLK: torch.Tensor, lengths: list[int], drop_last: int, num_experts: int) -> list[RoutingTrace]:
    """Per-sample traces of the first `length - drop_last` rows of a right-padded `[B, S, L, K]` forward."""
    return [RoutingTrace.from_ids(ids_BSLK[b, : n - drop_last].cpu(), num_experts) for b, n in enumerate(lengths)]


def _mismatch(reference: list[RoutingTrace], used: list[RoutingTrace]) -> float:
    """Fraction of (token, layer) rows whose expert sets differ (the shared definition), mean over MoE layers."""
    per_layer = routing_mismatch_per_layer(reference, used)
    return sum(per_layer) / len(per_layer) if per_layer else 0.0


def _counts(calls: dict[Stage, list[int]], summary: CheckSummary | None) -> dict:
    fwd, bwd = sum(calls[Stage.REPLAY_FORWARD]), sum(calls[Stage.REPLAY_BACKWARD])
    stages = summary.to_dict()["stages"] if summary else {}
    checks = sum(v["calls"] for v in stages.values())
    return {"replay_forward": fwd, "replay_backward": bwd, "checks": checks,
            "checked_tokens": {stage: stages.get(stage, {}).get("tokens", 0) for stage in Stage}}


def _verdict(cfg: CheckRunConfig, report: dict, check_error: str | None) -> tuple[str, str]:
    rcfg, counts = cfg.replay, report["counts"]
    if check_error:
        return "fail", check_error
    if counts["replay_forward"] == 0 or counts["replay_backward"] == 0:
        return "fail", f"replay did not run in both stages: {counts}"
    if rcfg.check_enabled and counts["checks"] == 0:
        return "fail", "the check was enabled but checked no router call"
    unchecked = [stage for stage, n in counts["checked_tokens"].items() if n == 0]
    if rcfg.check_enabled and unchecked:
        return "fail", f"the check saw no token in stage(s) {unchecked}: {counts['checked_tokens']}"
    mismatch = report["replay_target_mismatch"]
    if mismatch > report["threshold"]:
        target = "rollout's" if rcfg.kind is ReplayKind.R3 else "old-policy forward's"
        return "fail", f"under replay the training routing still differs from the {target}: {mismatch:.4f} > " \
            f"{report['threshold']}"
    return "pass", "replay ran in forward and recompute" + (" and the check passed" if rcfg.check_enabled else "")


def _finish(cfg: CheckRunConfig, report: dict) -> dict:
    report = json.loads(json.dumps(report, default=_jsonable))
    if cfg.report:
        Path(cfg.report).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.report).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("r3rl check: verdict=%s reason=%s report=%s", report["verdict"], report.get("reason"), cfg.report)
    return report


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, RoutingTrace):
        return None
    return str(x)
