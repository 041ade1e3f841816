"""The environment protocol: an environment makes *packs*; a pack is S related tasks.

Every task of a pack shares hidden facts derived from the pack seed and differs in
its visible instance. All pack state lives on the :class:`Pack` object (never in
module-level dictionaries), so two packs with the same seed can run concurrently.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Optional

from ..errors import EnvironmentSpecError
from ..tasks import InteractiveTask, StepResult

Packing = Literal["cod", "ralph_sample", "ralph_full", "ralph"]
#: The packings of the method (Trinity-RFT ``pack_strategy``), and ``ralph``, the name the project
#: used first, kept as an alias of ``ralph_sample``:
#:
#: - ``cod``: the S visible instances of a pack seed, in order (distinct related tasks);
#: - ``ralph_sample``: instance 0 of the pack seed repeated S times (the reference repeats the
#:   first task of each group of S, so only one task in S is ever played);
#: - ``ralph_full``: every instance of the pack seed becomes a pack of its own, repeated S times
#:   (the reference expands every task into a full pack: S packs where ``cod`` has one, the same
#:   tasks as the ``cod`` pack, each repeated). ``Environment.packs`` gives all of them;
#:   ``Environment.pack(..., instance=j)`` the one repeating instance ``j``.
PACKINGS = ("cod", "ralph_sample", "ralph_full", "ralph")
PACKING_ALIASES = {"ralph": "ralph_sample"}


def canonical_packing(packing: str) -> str:
    """The packing ``packing`` names (``ralph`` -> ``ralph_sample``), or a clear error listing the choices."""
    if not isinstance(packing, str) or packing not in PACKINGS:
        raise EnvironmentSpecError(
            f"unknown packing {packing!r}; packings: {', '.join(PACKINGS)} (ralph is ralph_sample)"
        )
    return PACKING_ALIASES.get(packing, packing)


class EnvTask(InteractiveTask):
    """A task made by an environment. Knows its pack (hidden facts) and can act as its own oracle.

    The oracle knows the pack's hidden facts and sees what an agent sees of the task; it is
    what a perfect note-taker would do. :meth:`optimum` is the reward the oracle reaches.
    """

    def __init__(self, pack: "Pack", index: int, task_id: str):
        self.pack = pack
        self.index = index
        self.id = task_id
        self.metadata = {"env": pack.env.name, "preset": pack.env.preset, "seed": pack.seed, "instance": index}
        #: State this task leaves for the later tasks of its pack (e.g. revealed cells): the
        #: pack's ``state`` under ``cod`` packing; under the ``ralph_*`` packings a dict of this
        #: task's own, since a repeated task carries nothing over but the context.
        self.pack_state: dict[str, Any] = pack.state if pack.packing == "cod" else {}

    @property
    def instructions(self) -> Optional[str]:  # type: ignore[override]
        return self.pack.env.instructions()

    @abstractmethod
    def oracle_action(self) -> str:
        """The action an oracle that knows the hidden facts takes in the current state."""

    def optimum(self) -> float:
        """The best reward any policy can reach on this task (what the oracle scores)."""
        return 1.0


class Environment(ABC):
    """Base class of every environment. Subclasses set the class attributes and implement :meth:`make_task`.

    Args:
        preset: a key of :attr:`presets` (``train``, ``easy``, ``hard`` for the built-ins).
        **options: override single options of the preset (see :attr:`defaults`).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Every option with its default; presets and keyword options may override them.
    defaults: ClassVar[dict[str, Any]] = {}
    #: The lowest and highest reward a task can give (eval clips confidence intervals to it).
    reward_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    #: Named option sets. ``train`` is the training distribution; ``easy``/``hard`` shift it.
    presets: ClassVar[dict[str, dict[str, Any]]] = {"train": {}, "easy": {}, "hard": {}}
    #: Tasks per pack when ``lifecycle-agent eval`` is given no ``--pack-size``: 8, the method's
    #: evaluation setting (its ``eval_task_pack_size``), unless an environment says otherwise.
    eval_pack_size: ClassVar[int] = 8
    #: What the ``easy`` preset gives away that ``train`` and ``hard`` keep hidden (shown by
    #: ``envs list``); empty when ``easy`` only shrinks the task.
    easy_hints: ClassVar[str] = ""

    def __init__(self, preset: str = "train", **options: Any):
        if preset not in self.presets:
            raise EnvironmentSpecError(
                f"environment {self.name!r} has no preset {preset!r}; presets: {', '.join(self.presets)}"
            )
        unknown = set(options) - set(self.defaults)
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "(none)"
            raise EnvironmentSpecError(
                f"environment {self.name!r}: unknown option(s) {', '.join(sorted(unknown))}; options: {known}"
            )
        self.preset = preset
        self.options: dict[str, Any] = {**self.defaults, **self.presets[preset], **options}

    def instructions(self) -> Optional[str]:
        """Rules shared by every task, shown in the system prompt (``None`` for none)."""
        return None

    # The reference policy: an observation-only note-writer and solver. It receives exactly what
    # an agent's update and solve episodes receive (never a pack, so never a hidden fact that was
    # not shown), and is the ``--teacher oracle`` of ``lifecycle-agent train --sft``.
    has_reference_policy: ClassVar[bool] = False

    def reference_notes(self, notes: str, transcript: str, reward: Optional[float], feedback: Optional[str]) -> str:
        """The notes a careful agent writes after a task: ``notes`` (the previous context), the task's
        ``transcript``, ``reward`` and ``feedback``, exactly as an update episode shows them."""
        raise NotImplementedError(f"environment {self.name!r} has no reference note-writer")

    def reference_reply(self, notes: str, messages: list[dict]) -> str:
        """The reply a careful agent gives in a solve episode, from its ``notes`` (the Hints) and the
        episode's ``messages`` so far (observations and its own earlier replies)."""
        raise NotImplementedError(f"environment {self.name!r} has no reference solver")

    @abstractmethod
    def hidden_facts(self, rng: random.Random) -> dict[str, Any]:
        """Draw the pack's hidden facts from its seeded random generator."""

    @abstractmethod
    def make_task(self, pack: "Pack", index: int, task_id: str) -> EnvTask:
        """The task for visible instance ``index`` of ``pack`` (fresh state every call)."""

    def pack(self, seed: int, size: int, packing: str = "cod", instance: Optional[int] = None) -> "Pack":
        """A pack of ``size`` tasks from ``seed`` (see :data:`PACKINGS`).

        ``instance``: the visible instance a ``ralph_full`` pack repeats (``0..size-1``, default 0);
        ``ralph_sample`` always repeats instance 0 and ``cod`` plays them all, so neither takes one.
        """
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise EnvironmentSpecError(f"pack seed must be an integer, got {seed!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise EnvironmentSpecError(f"pack size must be an integer >= 1, got {size!r}")
        packing = canonical_packing(packing)
        allowed = {"cod": (None,), "ralph_sample": (None, 0)}.get(packing)
        if allowed is not None and instance not in allowed:
            plays = "plays every instance" if packing == "cod" else "always repeats instance 0"
            raise EnvironmentSpecError(
                f"{packing} packing {plays} (got instance={instance!r}); only ralph_full packs repeat a chosen instance"
            )
        if packing == "ralph_full":
            instance = 0 if instance is None else instance
            if isinstance(instance, bool) or not isinstance(instance, int) or not 0 <= instance < size:
                raise EnvironmentSpecError(f"ralph_full instance must be an integer from 0 to {size - 1}, got {instance!r}")
        return Pack(self, seed, size, packing, instance)

    def packs(self, seed: int, size: int, packing: str = "cod") -> list["Pack"]:
        """Every pack the packing makes of pack seed ``seed``: one for ``cod`` and ``ralph_sample``,
        ``size`` for ``ralph_full`` (one per visible instance, in order)."""
        if canonical_packing(packing) == "ralph_full":
            self.pack(seed, size, packing)  # checks seed and size before the range below uses size
            return [self.pack(seed, size, packing, instance) for instance in range(size)]
        return [self.pack(seed, size, packing)]

    # helpers for subclasses ------------------------------------------------
    def _int_option(self, key: str, low: int, high: int) -> int:
        """Option ``key`` as an integer in ``[low, high]``, or a clear error."""
        value = self.options[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise EnvironmentSpecError(f"{self.name}: option {key} must be an integer from {low} to {high}, got {value!r}")
        return value

    def _float_option(self, key: str, low: float, high: float) -> float:
        """Option ``key`` as a number in ``[low, high]``, or a clear error."""
        value = self.options[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise EnvironmentSpecError(f"{self.name}: option {key} must be a number from {low} to {high}, got {value!r}")
        return float(value)

    def _bool_option(self, key: str) -> bool:
        value = self.options[key]
        if not isinstance(value, bool):
            raise EnvironmentSpecError(f"{self.name}: option {key} must be true or false, got {value!r}")
        return value

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} preset={self.preset}>"


class Pack:
    """S related tasks sharing hidden facts. All mutable pack state lives here (``state``)."""

    def __init__(self, env: Environment, seed: int, size: int, packing: str, instance: Optional[int] = None):
        self.env = env
        self.seed = seed
        self.size = size
        self.packing = canonical_packing(packing)
        #: The visible instance every task repeats (``ralph_*`` packings); ``None`` under ``cod``.
        self.instance: Optional[int] = None if self.packing == "cod" else (instance or 0)
        self.rng = random.Random(f"{env.name}|{env.preset}|{seed}")
        self.hidden = env.hidden_facts(self.rng)
        self.state: dict[str, Any] = {}
        label = f"i{self.instance}" if self.packing == "ralph_full" else ""
        self.id = f"{env.name}/{env.preset}/s{seed}/{self.packing}{size}{label}"
        self._tasks: Optional[list[EnvTask]] = None

    def instance_rng(self, index: int) -> random.Random:
        """The random generator of visible instance ``index``: the same whatever the pack size or packing."""
        return random.Random(f"{self.env.name}|{self.env.preset}|{self.seed}|instance{index}")

    @property
    def tasks(self) -> list[EnvTask]:
        """The pack's tasks in order; built once, ids ``<pack id>/p<position>``."""
        if self._tasks is None:
            self._tasks = [
                self.env.make_task(self, j if self.instance is None else self.instance, f"{self.id}/p{j}")
                for j in range(self.size)
            ]
        return self._tasks

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        repeated = "" if self.instance is None else f", instance {self.instance} repeated"
        return f"<Pack {self.id}: {self.size} task(s) of {self.env.name} ({self.packing} packing{repeated})>"


@dataclass
class Episode:
    """One task played to the end by a policy, outside any agent (see :func:`play`)."""

    reward: float
    turns: int
    feedback: Optional[str]
    transcript: list[tuple[str, str]] = field(default_factory=list)
    """``(observation, action)`` pairs in order."""


def play(task: InteractiveTask, policy: Callable[[str], str]) -> Episode:
    """Play ``task`` to the end with ``policy(observation) -> action`` (no model, no store).

    Applies the same turn limit as the runtime. Used by tests, ``envs show`` and benchmarks.
    """
    observation = task.start()
    transcript: list[tuple[str, str]] = []
    max_turns = max(1, int(getattr(task, "max_turns", 1) or 1))
    result: Optional[StepResult] = None
    for _ in range(max_turns):
        action = policy(observation)
        transcript.append((observation, action))
        result = StepResult(*task.step(action))
        if result.done:
            break
        observation = result.observation
    if result is None or not result.done:
        result = task.timeout_result()
    return Episode(float(result.reward or 0.0), len(transcript), result.feedback, transcript)


def play_oracle(task: EnvTask) -> Episode:
    """Play ``task`` with its own oracle."""
    return play(task, lambda _observation: task.oracle_action())
