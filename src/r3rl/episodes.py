"""Episodes: multi-turn rollouts (the model answers, an environment replies, the reply joins the context, the model
continues), each returned as ONE `Sample` whose routing trace covers every token the training forward sees.

    make_env = load_env_factory("my_envs.py:Calculator")           # or a built-in task's `make_env` (--task guess)
    envs = [make_env(item, tokenizer) for item in items]
    samples = run_episodes(backend, envs, SamplingParams(max_new_tokens=8, seed=0), max_turns=4)

Environment (`Environment` protocol): `reset() -> prompt token ids`; `step(response_ids) -> EnvStep` with the
observation token ids to append, whether the episode is done, and a reward (an episode's reward is the sum).
A user's environment (`--env-path`) runs in a worker process, each call bounded and each value checked
(r3rl.env_pool: the trainer holds `RemoteEnv` proxies; a failure is an `EnvError` naming the episode, turn, call and
prompt); a built-in task's environment (`--task guess`) is r3rl's own code and runs here.

Tokens in, tokens out:
  - every turn generates from the episode's full token context, exactly as it stands: nothing is re-rendered and the
    backend's echoed prompt must equal it;
  - an environment that renders its conversation with a chat template returns `EnvStep.context_ids` (the whole
    rendering) instead of `observation_ids`: the runner proves that the rendering starts with the context it holds,
    token for token, and raises `PrefixError` (naming the first differing position) when a re-rendering changed the
    prefix (Qwen-style templates drop earlier turns' thinking, a decode/encode round trip merges tokens ...).

Routes (`EpisodeTrace`):
  - turn t asks the backend only for the rows it does not hold yet: `routed_experts_start_len` = rows held =
    len(context before turn t's observation) - 1. So row `start` is the boundary token (the previous response's last
    token, which no earlier forward read) and the rows after it are the observation's: all from the prefill that read
    them. Earlier rows are never overwritten by a later turn's re-prefill;
  - each turn's blob must have exactly `len(tokens) - 1 - start` rows (a server that ignored `start` over-counts; one
    that skipped the boundary under-counts): anything else raises `EpisodeError`;
  - each turn records the weight versions that served it (`metadata["turn_weight_versions"]`); an episode served by
    more than one version is refused (`mixed_versions="error"`), or kept and flagged
    (`metadata["mixed_weight_versions"]`) for the trainer's stale policy;
  - the episode ends with the model's last response: a final observation is not appended (no forward read it, so it
    has no routes, and no model token after it depends on it).

The Sample: `prompt_ids` = the first prompt; `response_ids` = everything after it (responses and observations);
`loss_mask` 1 on model tokens, 0 on observations (R3 still replays them: later tokens attend to them);
`rollout_logprobs` 0.0 at observations; `weight_version_start`/`weight_version` = the first/last turn's.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from r3rl.rollout.engine.messages import SamplingParams
from r3rl.sample import Sample
from r3rl.trace import RoutingTrace

__all__ = ["EnvStep", "Environment", "EnvFactory", "EpisodeError", "PrefixError", "EnvError", "EpisodeTrace",
           "run_episodes", "load_env_factory", "check_prefix", "MIXED_VERSION_POLICIES"]

logger = logging.getLogger(__name__)

MIXED_VERSION_POLICIES = ("error", "keep", "drop")
"""What `run_episodes` does with an episode whose turns were served by more than one weight version: raise, keep it
(flagged), or keep it flagged for the trainer to drop (the trainer's `--stale-samples` maps onto these)."""


class EpisodeError(RuntimeError):
    """An episode's tokens or routes do not line up (what, where, expected vs got)."""


class PrefixError(EpisodeError):
    """A re-rendered context does not start with the tokens the episode already holds."""


class EnvError(EpisodeError):
    """An `--env-path` environment failed (raised, exited, hung, died, or returned a value outside the contract;
    r3rl.env_pool): the run fails (exit 1). `run_episodes` adds the episode and the turn to the message."""


@dataclass(kw_only=True)
class EnvStep:
    """An environment's answer to one model response."""

    observation_ids: list[int] = field(default_factory=list)
    """Token ids appended after the response (ignored when `done`)."""
    done: bool = False
    """The episode ends here (its last token is the model's response)."""
    reward: float = 0.0
    """Reward of this step; the episode's reward is the sum over its steps."""
    context_ids: list[int] | None = None
    """Instead of `observation_ids`: the whole conversation re-rendered (e.g. by a chat template). The runner proves
    that it starts with the episode's context and appends only the rest."""
    info: dict = field(default_factory=dict)
    """Free-form; collected per turn into `Sample.metadata["env_info"]`."""


@runtime_checkable
class Environment(Protocol):
    def reset(self) -> list[int]:
        """The first prompt's token ids."""
        ...

    def step(self, response_ids: list[int]) -> EnvStep:
        """React to the model's response (its token ids, stop token included)."""
        ...


EnvFactory = Callable[..., Environment]
"""`factory(item, tokenizer) -> Environment`: one environment per episode, from a prompt item (r3rl.tasks)."""


def check_prefix(context: Sequence[int], rendered: Sequence[int], *, where: str = "episode") -> list[int]:
    """The tokens `rendered` adds after `context`; `PrefixError` unless `rendered` starts with `context` exactly."""
    n = len(context)
    if list(rendered[:n]) != list(context):
        first = next((i for i, (a, b) in enumerate(zip(context, rendered, strict=False)) if a != b),
                     min(n, len(rendered)))
        raise PrefixError(
            f"{where}: the re-rendered context does not keep the episode's prefix: first difference at token {first} "
            f"of {n} (held {list(context[first:first + 6])}, rendered {list(rendered[first:first + 6])}); "
            "a re-rendering shifts every later route. Append observation token ids instead of re-rendering the "
            "conversation")
    return list(rendered[n:])


class EpisodeTrace:
    """One episode's tokens, loss mask, log-probs, routes and per-turn weight versions, assembled turn by turn."""

    def __init__(self, prompt_ids: Sequence[int], *, index: int = 0) -> None:
        if not prompt_ids:
            raise EpisodeError(f"episode {index}: the environment's reset() returned no prompt tokens")
        self.index = index
        self.prompt_ids = list(prompt_ids)
        self.tokens = list(prompt_ids)
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self.trace: RoutingTrace | None = None
        self.turn_versions: list[tuple[int, int]] = []
        self.turn_spans: list[tuple[int, int]] = []  # [start, end) of each response in `tokens`
        self.logprob_temperature: float | None = None
        self.finish_reason = "length"

    @property
    def num_rows(self) -> int:
        """Trace rows held: rows [0, num_rows) of the episode's tokens."""
        return 0 if self.trace is None else self.trace.num_rows

    def add_turn(self, turn: Sample) -> None:
        """Append one turn's response and its routes (rows [start, end) of the turn's tokens)."""
        where = f"episode {self.index} turn {len(self.turn_spans)}"
        if list(turn.prompt_ids) != self.tokens:
            first = next((i for i, (a, b) in enumerate(zip(self.tokens, turn.prompt_ids, strict=False)) if a != b),
                         min(len(self.tokens), len(turn.prompt_ids)))
            raise EpisodeError(f"{where}: the backend generated from another context than the episode's: first "
                               f"difference at token {first} (got {len(turn.prompt_ids)} tokens, expected "
                               f"{len(self.tokens)}); tokens in, tokens out")
        if turn.trace is None:
            raise EpisodeError(f"{where}: the turn came back without routes (return_routed_experts)")
        start, held = turn.routed_experts_start_len, self.num_rows
        if start != held:
            raise EpisodeError(f"{where}: the turn's routes start at row {start}, expected {held} (the rows held); "
                               f"a later start leaves the boundary token without a route, an earlier one overwrites "
                               f"routes of an earlier turn")
        expected = len(self.tokens) + len(turn.response_ids) - 1 - start
        if turn.trace.num_rows != expected:
            raise EpisodeError(f"{where}: the turn's routes have {turn.trace.num_rows} rows, expected {expected} "
                               f"(rows [{start}, {start + expected}) of {len(self.tokens) + len(turn.response_ids)} "
                               f"tokens); {turn.trace.num_rows - expected:+d} rows: routed_experts_start_len "
                               "ignored or rows dropped")
        if turn.trace.pad_mask().all(axis=(1, 2)).any():
            row = int(turn.trace.pad_mask().all(axis=(1, 2)).nonzero()[0][0]) + start
            raise EpisodeError(f"{where}: row {row} of the episode came back all pad: every token the forward reads "
                               "needs the route the rollout used")
        if self.logprob_temperature is not None and turn.logprob_temperature != self.logprob_temperature:
            raise EpisodeError(f"{where}: log-probs at temperature {turn.logprob_temperature}, earlier turns at "
                               f"{self.logprob_temperature}")
        self.logprob_temperature = turn.logprob_temperature
        self.trace = turn.trace if self.trace is None else self.trace.append(turn.trace)
        self.turn_spans.append((len(self.tokens), len(self.tokens) + len(turn.response_ids)))
        self.tokens += turn.response_ids
        self.loss_mask += [1] * len(turn.response_ids)
        self.logprobs += list(turn.rollout_logprobs)
        self.turn_versions.append((turn.weight_version_start, turn.weight_version))
        self.finish_reason = turn.finish_reason

    def add_observation(self, step: EnvStep) -> None:
        """Append the environment's observation (token ids, or the tail of a re-rendering proven to keep the
        prefix). Its routes come with the next turn, from the prefill that reads it."""
        if step.context_ids is not None:
            obs = check_prefix(self.tokens, step.context_ids, where=f"episode {self.index} turn "
                                                                     f"{len(self.turn_spans) - 1}")
        else:
            obs = list(step.observation_ids)
        self.tokens += obs
        self.loss_mask += [0] * len(obs)
        self.logprobs += [0.0] * len(obs)

    @property
    def mixed_versions(self) -> bool:
        return len({v for pair in self.turn_versions for v in pair}) > 1

    def to_sample(self, reward: float, **metadata) -> Sample:
        """The episode as one Sample ending with the model's last response; its trace covers every token."""
        if not self.turn_spans:
            raise EpisodeError(f"episode {self.index}: no turn ran")
        end = self.turn_spans[-1][1]  # an observation after the last response is not trained on (no routes)
        P = len(self.prompt_ids)
        sample = Sample(
            prompt_ids=list(self.prompt_ids), response_ids=self.tokens[P:end],
            rollout_logprobs=self.logprobs[: end - P], logprob_temperature=self.logprob_temperature or 1.0,
            trace=self.trace, reward=float(reward), finish_reason=self.finish_reason,
            weight_version_start=self.turn_versions[0][0], weight_version=self.turn_versions[-1][1],
            loss_mask=self.loss_mask[: end - P],
            metadata={"episode_index": self.index, "turns": len(self.turn_spans),
                      "turn_spans": list(self.turn_spans), "turn_weight_versions": list(self.turn_versions),
                      "mixed_weight_versions": self.mixed_versions, **metadata},
        )
        return sample.validate(index=self.index)


def run_episodes(backend, envs: Sequence[Environment], sampling: SamplingParams, *, max_turns: int,
                 mixed_versions: str = "error", max_context_tokens: int | None = None,
                 between_turns: Callable[[int], None] | None = None) -> list[Sample]:
    """Run one episode per environment to the end (or `max_turns` responses), every active episode's turn in one
    `backend.generate` call; return one Sample per episode, in order.

    `max_context_tokens`: an episode whose next turn would not fit (context + max_new_tokens) ends there.
    `between_turns(turn)`: called after turn `turn`'s generation (tests use it to update weights mid-episode)."""
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1: got {max_turns}")
    if mixed_versions not in MIXED_VERSION_POLICIES:
        raise ValueError(f"mixed_versions must be one of {MIXED_VERSION_POLICIES}: got {mixed_versions!r}")
    episodes = [EpisodeTrace(_env_call(env.reset, i, None), index=i) for i, env in enumerate(envs)]
    rewards = [0.0] * len(envs)
    infos: list[list[dict]] = [[] for _ in envs]
    active = list(range(len(envs)))
    for turn in range(max_turns):
        if max_context_tokens is not None:
            active = [i for i in active if len(episodes[i].tokens) + sampling.max_new_tokens <= max_context_tokens]
        if not active:
            break
        sp = dataclasses.replace(sampling, stop_token_ids=list(sampling.stop_token_ids),
                                 seed=None if sampling.seed is None else (sampling.seed * 1_000_003 + turn) % 2**63)
        outs = backend.generate([episodes[i].tokens for i in active], sp,
                                routed_experts_start_len=[episodes[i].num_rows for i in active])
        if len(outs) != len(active):
            raise EpisodeError(f"turn {turn}: the backend returned {len(outs)} samples for {len(active)} prompts")
        if between_turns is not None:
            between_turns(turn)
        still = []
        for i, out in zip(active, outs, strict=True):
            episodes[i].add_turn(out)
            step = _env_call(envs[i].step, i, turn, list(out.response_ids))
            if not isinstance(step, EnvStep):
                raise EpisodeError(f"episode {i} turn {turn}: the environment's step() returned "
                                   f"{type(step).__name__}, expected an EnvStep")
            rewards[i] += float(step.reward)
            infos[i].append(step.info)
            if not step.done and turn + 1 < max_turns:
                episodes[i].add_observation(step)
                still.append(i)
        active = still
    samples = []
    for i, ep in enumerate(episodes):
        if ep.mixed_versions and mixed_versions == "error":
            raise EpisodeError(f"episode {i}: its turns were served by weight versions {ep.turn_versions} (turn: "
                               "(start, end)); each turn's routes are that version's, but the episode mixes policies "
                               "(--stale-samples keep|drop to train on it or drop it)")
        samples.append(ep.to_sample(rewards[i], env_info=infos[i]))
    return samples


def _env_call(call, index: int, turn: int | None, *args):
    """`call(*args)`; an EnvError (an environment in a worker, r3rl.env_pool) gets the episode and turn prepended."""
    try:
        return call(*args)
    except EnvError as e:
        raise EnvError(f"episode {index} {'reset' if turn is None else f'turn {turn}'}: {e}") from None


def load_env_factory(spec: str) -> EnvFactory:
    """`module:Name` or `path/to/file.py:Name` -> a callable `(item, tokenizer) -> Environment` (a class or a
    function), loaded in this process (the trainer loads `--env-path` through r3rl.env_pool.EnvPool, whose worker
    calls this). Errors name the spec and what failed."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise ValueError(f"--env-path {spec!r}: expected 'module:Class' or 'path/to/file.py:Class'")
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise ValueError(f"--env-path {spec!r}: file {path} not found")
        name = f"r3rl_env_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"--env-path {spec!r}: loading {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as e:
            raise ValueError(f"--env-path {spec!r}: importing '{module_part}' failed: {type(e).__name__}: {e}") from e
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"--env-path {spec!r}: module '{module_part}' has no attribute '{attr}'")
    if not callable(factory):
        raise ValueError(f"--env-path {spec!r}: '{attr}' is a {type(factory).__name__}, not callable")
    return factory
