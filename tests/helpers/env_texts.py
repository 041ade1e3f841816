"""Play packs with a random policy and keep every text the agent was shown (the leak tests' collector).

A *random policy* is ``policy(task, observation, rng) -> reply``: it may read the task's visible
state (where the agent is), never decides from a hidden fact, and mixes in unreadable replies so
that the error paths are played too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from lifecycle_agent import envs


@dataclass
class Played:
    """One task played to the end: what was shown, what was replied, and the final feedback."""

    task: envs.EnvTask
    turns: list[tuple[str, str]]
    """``(observation, reply)`` pairs in order."""
    feedback: str

    def texts(self) -> list[str]:
        """Every observation and the feedback: all the environment said in this task."""
        return [observation for observation, _ in self.turns] + [self.feedback or ""]


def play_packs(env: envs.Environment, seeds, size: int, policy: Callable, packing: str = "cod") -> list[list[Played]]:
    """Each pack of ``seeds`` played in order by ``policy`` (seeded per pack, so runs repeat)."""
    packs = []
    for seed in seeds:
        rng = random.Random(f"random-policy|{seed}")
        played = []
        for task in env.pack(seed, size, packing=packing).tasks:
            episode = envs.play(task, lambda observation, task=task: policy(task, observation, rng))
            played.append(Played(task, episode.transcript, episode.feedback or ""))
        packs.append(played)
    return packs
