"""Rollout collection through the runtime itself, and the per-episode training rows.

For each pack, G agents are forked from one snapshot (the same starting context) and run
the same pack (same seed, fresh task state per rollout) concurrently with
:meth:`LifecycleAgent.arun` over one batched local model, so every prompt, parse and
context budget is exactly the deployment code path. Episodes are then read back from the
store with the token ids and sampling log-probs the model recorded for every turn.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

from lifecycle_agent import envs as env_registry
from lifecycle_agent.agent import LifecycleAgent
from lifecycle_agent.errors import LifecycleAgentError
from lifecycle_agent.models.base import ChatModel
from lifecycle_agent.settings import TRAINING_SETTINGS, OnFailedUpdate, ParsePolicy
from lifecycle_agent.store import EpisodeRow, Store

from .credit import PARSE_FAILURE_REWARD, update_reward


class RolloutDataError(LifecycleAgentError):
    """A rollout lacks what training needs (token ids, log-probs, an episode)."""


@dataclass(frozen=True)
class PackSpec:
    """Which pack a rollout runs: environment name, preset, pack seed, packing and (``ralph_full``) the task repeated."""

    env: str
    preset: str
    seed: int
    packing: str = "cod"
    instance: Optional[int] = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "PackSpec":
        # schedules written before packings existed have neither column: cod packing
        instance = row.get("instance")
        return cls(str(row["env"]), str(row["preset"]), int(row["seed"]), str(row.get("packing") or "cod"),
                   None if instance is None else int(instance))


@dataclass
class Turn:
    """One model call of an episode: the exact prompt and completion tokens and their sampling log-probs."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]


@dataclass
class Episode:
    """One solve or update episode of a rollout, with the reward used for credit."""

    kind: str
    position: int
    reward: float
    """Solve: the task's reward (0 when it gave none). Update: 0 if the reply parsed, else the penalty."""
    status: str
    turns: list[Turn] = field(default_factory=list)
    episode_id: Optional[int] = None

    @property
    def completion_tokens(self) -> int:
        return sum(len(t.completion_ids) for t in self.turns)


@dataclass
class Rollout:
    """One agent's pass over a pack: S solve episodes and S-1 update episodes."""

    pack: PackSpec
    agent_id: str
    solves: list[Episode]
    updates: list[Episode]

    @property
    def solve_rewards(self) -> list[float]:
        return [e.reward for e in self.solves]

    @property
    def update_rewards(self) -> list[float]:
        return [e.reward for e in self.updates]


@dataclass
class TrainingRow:
    """One turn to train on: its prompt (masked), its completion (carries loss) and the episode's advantage."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    advantage: float
    kind: str
    position: int
    env: str


@dataclass
class RolloutSettings:
    """How rollouts are run (the same knobs as deployment)."""

    pack_size: int
    temperature: float
    max_new_tokens: int
    context_budget: int = TRAINING_SETTINGS.context_budget
    parse_policy: ParsePolicy = TRAINING_SETTINGS.parse_policy
    on_failed_update: OnFailedUpdate = TRAINING_SETTINGS.on_failed_update
    prompt_set: str = TRAINING_SETTINGS.prompt_set
    parse_failure_reward: float = PARSE_FAILURE_REWARD
    initial_context: str = ""


class RolloutCollector:
    """Runs groups of rollouts with :class:`LifecycleAgent` over one (batched) model and reads them back.

    Args:
        model: the policy; a :class:`~lifecycle_agent.models.local.LocalModel` records the token ids
            and log-probs training needs.
        store: where the rollout agents and episodes are written.
        settings: pack size, temperature and the agent settings.
        id_prefix: prefix of the rollout agent ids (unique per run attempt and process).
        keep: keep the rollout agents in the store (``False`` deletes them once read).
    """

    def __init__(self, model: ChatModel, store: Store, settings: RolloutSettings, *, id_prefix: str, keep: bool = True):
        self.model = model
        self.store = store
        self.settings = settings
        self.id_prefix = id_prefix
        self.keep = keep
        self._groups = 0

    def collect(self, packs: list[PackSpec]) -> list[Rollout]:
        """One rollout per entry of ``packs``, in order; entries of the same pack share one starting snapshot."""
        return run_sync(self.acollect(packs))

    async def acollect(self, packs: list[PackSpec]) -> list[Rollout]:
        """Async twin of :meth:`collect`: every rollout of every pack runs concurrently."""
        groups: dict[PackSpec, list[int]] = {}
        for index, spec in enumerate(packs):
            groups.setdefault(spec, []).append(index)
        jobs, slots = [], []
        for spec, indices in groups.items():
            agents = self._fork_group(len(indices))
            for agent, index in zip(agents, indices):
                jobs.append(self._run_one(agent, spec))
                slots.append(index)
        finished = await asyncio.gather(*jobs)
        rollouts: list[Optional[Rollout]] = [None] * len(packs)
        for index, rollout in zip(slots, finished):
            rollouts[index] = rollout
        return rollouts  # type: ignore[return-value]

    def _fork_group(self, size: int) -> list[LifecycleAgent]:
        """``size`` agents forked from one snapshot agent holding the starting context."""
        s = self.settings
        self._groups += 1
        base_id = f"{self.id_prefix}-g{self._groups:05d}"
        if self.store.has_agent(base_id):
            self.store.delete_agent(base_id)
        base = LifecycleAgent(
            self.model, self.store, base_id, context_budget=s.context_budget, parse_policy=s.parse_policy,
            on_failed_update=s.on_failed_update,
            prompt_set=s.prompt_set, temperature=s.temperature, update_temperature=s.temperature,
            max_new_tokens=s.max_new_tokens,
        )
        if s.initial_context:
            base.set_context(s.initial_context, note="starting context of a training group")
        agents = []
        for i in range(size):
            fork_id = f"{base_id}-r{i}"
            if self.store.has_agent(fork_id):
                self.store.delete_agent(fork_id)
            agents.append(base.fork(fork_id))
        if not self.keep:
            self.store.delete_agent(base_id)
        return agents

    async def _run_one(self, agent: LifecycleAgent, spec: PackSpec) -> Rollout:
        pack = env_registry.make(spec.env, preset=spec.preset).pack(
            spec.seed, self.settings.pack_size, spec.packing, spec.instance
        )
        await agent.arun(pack.tasks, resume=False, update_after_last=False, run_id=agent.agent_id)
        rows = self.store.episodes(agent.agent_id, run_id=agent.agent_id, limit=None)
        rollout = read_rollout(rows, spec, agent.agent_id, self.settings.pack_size, self.settings.parse_failure_reward)
        if not self.keep:
            self.store.delete_agent(agent.agent_id)
        return rollout


def read_rollout(
    rows: list[EpisodeRow], spec: PackSpec, agent_id: str, pack_size: int, penalty: float = PARSE_FAILURE_REWARD
) -> Rollout:
    """A :class:`Rollout` from the stored episodes of one agent's run over a pack.

    Solve rewards of ``None`` (a task that failed) count as 0. An update that never ran
    (its solve failed) counts as 0 and has no turns to train.
    """
    solves: dict[int, Episode] = {}
    updates: dict[int, Episode] = {}
    for row in rows:
        if row.position is None:
            continue
        if row.kind == "solve":
            reward = float(row.reward) if row.reward is not None else 0.0
            solves[row.position] = Episode("solve", row.position, reward, row.status, _turns(row), row.episode_id)
        elif row.kind == "update":
            updates[row.position] = Episode(
                "update", row.position, update_reward(row.status, penalty), row.status, _turns(row), row.episode_id
            )
    missing = [j for j in range(pack_size) if j not in solves]
    if missing:
        raise RolloutDataError(
            f"rollout {agent_id} of pack {spec.env}/{spec.preset}/s{spec.seed} has no solve episode at "
            f"position(s) {missing}; the run stopped early (see its episodes in the rollout store)"
        )
    ordered_updates = [updates.get(j) or Episode("update", j, 0.0, "missing") for j in range(pack_size - 1)]
    return Rollout(spec, agent_id, [solves[j] for j in range(pack_size)], ordered_updates)


def _turns(row: EpisodeRow) -> list[Turn]:
    turns = []
    for k, turn in enumerate(row.turns):
        ids, completion, logprobs = turn.get("prompt_ids"), turn.get("completion_ids"), turn.get("logprobs")
        if ids is None or completion is None or logprobs is None:
            raise RolloutDataError(
                f"episode {row.episode_id} turn {k}: model {row.model_id!r} recorded no token ids / log-probs; "
                "training needs a local model (smollm2 or hf:PATH) that records them"
            )
        if len(completion) != len(logprobs):
            raise RolloutDataError(
                f"episode {row.episode_id} turn {k}: {len(completion)} completion tokens but {len(logprobs)} log-probs"
            )
        if completion:
            turns.append(Turn([int(t) for t in ids], [int(t) for t in completion], [float(x) for x in logprobs]))
    return turns


def training_rows(rollout: Rollout, solve_advantages: list[float], update_advantages: list[float]) -> list[TrainingRow]:
    """Every turn of every episode of a rollout, each carrying its episode's advantage."""
    rows = []
    for episodes, advantages in ((rollout.solves, solve_advantages), (rollout.updates, update_advantages)):
        if len(episodes) != len(advantages):
            raise ValueError(f"{len(episodes)} {episodes[0].kind if episodes else ''} episodes but {len(advantages)} advantages")
        for episode, advantage in zip(episodes, advantages):
            for turn in episode.turns:
                rows.append(
                    TrainingRow(turn.prompt_ids, turn.completion_ids, turn.logprobs, float(advantage),
                                episode.kind, episode.position, rollout.pack.env)
                )
    return rows


def summarize(rollout: Rollout, rank: int = 0) -> dict[str, Any]:
    """What every process needs of a rollout for group baselines and metrics (small and picklable)."""
    return {
        "rank": rank,
        "pack": (rollout.pack.env, rollout.pack.preset, rollout.pack.seed),
        "env": rollout.pack.env,
        "solve_rewards": rollout.solve_rewards,
        "update_rewards": rollout.update_rewards,
        "solve_tokens": [e.completion_tokens for e in rollout.solves],
        "update_tokens": [e.completion_tokens for e in rollout.updates],
        "prompt_tokens": sum(len(t.prompt_ids) for e in rollout.solves + rollout.updates for t in e.turns),
        "update_statuses": [e.status for e in rollout.updates],
    }


def rollout_metrics(summaries: list[dict[str, Any]]) -> dict[str, float]:
    """One step's metrics from rollout summaries: mean solve reward by position per environment
    (``reward/ENV/posJ``, ``reward/ENV/mean``, ``reward/mean``), the share of update episodes without a
    delimited block (``update/parse_failure_rate``; ``update/format_miss_rate`` for lenient misses) and
    completion / prompt tokens of the step (``tokens/completion``, ``tokens/prompt``)."""
    metrics: dict[str, float] = {}
    by_env: dict[str, list[list[float]]] = defaultdict(list)
    for s in summaries:
        by_env[s["env"]].append(s["solve_rewards"])
    for env, rewards in by_env.items():
        for j in range(len(rewards[0])):
            metrics[f"reward/{env}/pos{j}"] = sum(r[j] for r in rewards) / len(rewards)
        metrics[f"reward/{env}/mean"] = sum(map(sum, rewards)) / sum(map(len, rewards))
    every = [x for s in summaries for x in s["solve_rewards"]]
    metrics["reward/mean"] = sum(every) / len(every) if every else 0.0
    statuses = [st for s in summaries for st in s["update_statuses"] if st != "missing"]
    metrics["update/parse_failure_rate"] = sum(st != "ok" for st in statuses) / len(statuses) if statuses else 0.0
    metrics["update/format_miss_rate"] = sum(st == "format_miss" for st in statuses) / len(statuses) if statuses else 0.0
    metrics["tokens/completion"] = float(sum(sum(s["solve_tokens"]) + sum(s["update_tokens"]) for s in summaries))
    metrics["tokens/prompt"] = float(sum(s["prompt_tokens"] for s in summaries))
    return metrics


def run_sync(coroutine):
    """Run a coroutine to completion from sync code, even when the caller is inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
