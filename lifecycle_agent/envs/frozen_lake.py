"""``frozen-lake-obscure``: walk a frozen lake to the goal when the move codes are a secret.

Each pack hides one mapping of the action codes 1-4 to up/down/left/right. Every task
shows a new map (holes, start, goal; the goal is at most ``max_moves`` moves away).
An agent that notes what each code did can walk straight to the goal in later tasks.

Rules: one code per turn; at most ``max_turns`` turns. Reward ``1 - 0.1 * turns /
max_turns`` on reaching the goal; 0 on falling into a hole, on a reply without a code,
or when the turns run out. Moving off the map wastes the turn.
"""

from __future__ import annotations

import random
import re
from collections import deque
from typing import Any, Optional

from ..errors import EnvironmentSpecError
from ..tasks import StepResult
from .base import Environment, EnvTask, Pack
from .parsing import labelled, shorten, without

DIRECTIONS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
CODES = ("1", "2", "3", "4")

_POSITION_MENTION = re.compile(r"\b(?:row|column|col|r|c)\s*\d+|\(\s*\d+\s*,\s*\d+\s*\)", re.IGNORECASE)
_ACTION_WORD = re.compile(r"\b(?:action|code|press(?:ing)?|choose|pick|take|try|use)\s*(?:code)?\s*[:=#]?\s*([1-4])\b", re.IGNORECASE)
#: Text of our own observations that a model may echo back; never read as an action.
_ECHO = (
    re.compile(r"Reply with (?:one|a single) (?:action )?code:?(?:[ \t]*[1-4][ \t]*(?:,|or\b|\.)?)*", re.IGNORECASE),
    re.compile(r"\b1,\s*2,\s*3,?\s*(?:or|and)\s*4\b"),
    re.compile(r"\b\d+\s+turns?\b", re.IGNORECASE),
    re.compile(r"\bAction \d+ (?:moved|would move)[^.\n]*\.?", re.IGNORECASE),
)
_CODE = re.compile(r"(?<![\d.])([1-4])(?!\d|\.\d)")


def parse_code(reply: str) -> Optional[str]:
    """The action code in a reply, or ``None``.

    An ``Action: N`` (or ``Answer: N``) line wins; then phrases like "I choose 3" or
    "press 2"; then the first stand-alone 1-4 that is not part of a row/column mention.
    Echoes of the observation ("Reply with one action code: 1, 2, 3 or 4", "7 turns
    left", "Action 3 moved you down") are ignored.
    """
    reply = without(reply or "", _ECHO)
    label = labelled(reply)
    if label is not None:
        found = _CODE.search(_POSITION_MENTION.sub(" ", label))
        if found:
            return found.group(1)
    words = _ACTION_WORD.findall(reply or "")
    if words:
        return words[-1]
    found = _CODE.search(_POSITION_MENTION.sub(" ", reply or ""))
    return found.group(1) if found else None


def shortest_path(size: int, holes: frozenset, start: tuple, goal: tuple) -> Optional[list[tuple[int, int]]]:
    """Cells from ``start`` to ``goal`` on a shortest hole-free path (both included), or ``None``."""
    previous = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            path = [cell]
            while previous[path[-1]] is not None:
                path.append(previous[path[-1]])
            return path[::-1]
        for dr, dc in DIRECTIONS.values():
            nxt = (cell[0] + dr, cell[1] + dc)
            if 0 <= nxt[0] < size and 0 <= nxt[1] < size and nxt not in holes and nxt not in previous:
                previous[nxt] = cell
                queue.append(nxt)
    return None


class FrozenLakeTask(EnvTask):
    def __init__(self, pack: Pack, index: int, task_id: str):
        super().__init__(pack, index, task_id)
        options = pack.env.options
        self.size, self.max_turns = options["size"], options["max_turns"]
        self.holes, self.start_cell, self.goal = _make_map(pack.instance_rng(index), options)
        self.distance = len(shortest_path(self.size, self.holes, self.start_cell, self.goal)) - 1
        self.mapping: dict[str, str] = pack.hidden["mapping"]
        self._reset()

    def _reset(self) -> None:
        self.position = self.start_cell
        self.turns = 0
        self.learned: dict[str, str] = {}

    def render(self) -> str:
        rows = []
        for r in range(self.size):
            cells = []
            for c in range(self.size):
                cell = (r, c)
                cells.append("@" if cell == self.position else "G" if cell == self.goal else "H" if cell in self.holes else ".")
            rows.append(" ".join(cells))
        return "\n".join(rows)

    def _where(self, cell: tuple[int, int]) -> str:
        return f"row {cell[0] + 1}, column {cell[1] + 1}"

    def _status(self, legend: bool = False) -> str:
        left = self.max_turns - self.turns
        title = "Map (@ you, G goal, H hole, . ice; row 1 is the top row, column 1 the left column)" if legend else "Map"
        return (
            f"{title}:\n{self.render()}\n"
            f"You are at {self._where(self.position)}; the goal is at {self._where(self.goal)}. "
            f"{left} turn{'s' if left != 1 else ''} left. Reply with one action code: 1, 2, 3 or 4."
        )

    def start(self) -> str:
        self._reset()
        return self._status(legend=True)

    def _learned_text(self) -> str:
        if not self.learned:
            return "No code was tried."
        pairs = ", ".join(f"{code} = {self.learned[code]}" for code in sorted(self.learned))
        return f"What the codes did in this task: {pairs}."

    def step(self, action: str) -> StepResult:
        code = parse_code(action)
        if code is None:
            return StepResult(
                "", 0.0, True,
                f"Your reply ({shorten(action, 60)!r}) held no action code, so the episode ended with reward 0. "
                f"Reply with a single code 1, 2, 3 or 4. {self._learned_text()}",
            )
        self.turns += 1
        direction = self.mapping[code]
        self.learned[code] = direction
        dr, dc = DIRECTIONS[direction]
        target = (self.position[0] + dr, self.position[1] + dc)
        if not (0 <= target[0] < self.size and 0 <= target[1] < self.size):
            moved = f"Action {code} would move you {direction}, off the map: you stay at {self._where(self.position)}."
        elif target in self.holes:
            return StepResult(
                "", 0.0, True,
                f"Action {code} moved you {direction} into a hole at {self._where(target)}; reward 0. {self._learned_text()}",
            )
        elif target == self.goal:
            reward = 1.0 - 0.1 * self.turns / self.max_turns
            return StepResult(
                "", reward, True,
                f"Action {code} moved you {direction} onto the goal in {self.turns} turn{'s' if self.turns != 1 else ''} "
                f"(shortest possible: {self.distance}); reward {reward:.3f}. {self._learned_text()}",
            )
        else:
            self.position = target
            moved = f"Action {code} moved you {direction}."
        if self.turns >= self.max_turns:
            return self.timeout_result()
        return StepResult(f"{moved}\n{self._status()}", None, False, None)

    def timeout_result(self) -> StepResult:
        return StepResult(
            "", 0.0, True,
            f"The {self.max_turns} turns ran out before you reached the goal; reward 0. {self._learned_text()}",
        )

    def oracle_action(self) -> str:
        path = shortest_path(self.size, self.holes, self.position, self.goal)
        if path is None or len(path) < 2:
            raise RuntimeError(f"{self.id}: no path from {self.position} to the goal")
        step = (path[1][0] - path[0][0], path[1][1] - path[0][1])
        direction = next(name for name, delta in DIRECTIONS.items() if delta == step)
        return next(code for code, name in self.mapping.items() if name == direction)

    def optimum(self) -> float:
        return 1.0 - 0.1 * self.distance / self.max_turns


def _make_map(rng: random.Random, options: dict[str, Any]):
    size, density = options["size"], options["holes"]
    cells = [(r, c) for r in range(size) for c in range(size)]
    for _ in range(10_000):
        start, goal = rng.sample(cells, 2)
        holes = frozenset(cell for cell in cells if cell not in (start, goal) and rng.random() < density)
        path = shortest_path(size, holes, start, goal)
        if path is not None and options["min_moves"] <= len(path) - 1 <= options["max_moves"]:
            return holes, start, goal
    raise EnvironmentSpecError(
        f"frozen-lake-obscure: no map of size {size} with holes {density} has a path of "
        f"{options['min_moves']}-{options['max_moves']} moves; relax the options"
    )


class FrozenLakeObscure(Environment):
    name = "frozen-lake-obscure"
    description = "Frozen lake whose action codes 1-4 map to directions by a secret, per-pack permutation."
    defaults: dict[str, Any] = {"size": 4, "holes": 0.2, "min_moves": 2, "max_moves": 6, "max_turns": 8}
    presets = {
        "train": {},
        "easy": {"size": 3, "holes": 0.15, "min_moves": 1, "max_moves": 4},
        "hard": {"size": 5, "holes": 0.3, "min_moves": 4, "max_moves": 6},
    }

    def __init__(self, preset: str = "train", **options: Any):
        super().__init__(preset, **options)
        size = self._int_option("size", 2, 9)
        self._float_option("holes", 0.0, 0.6)
        low = self._int_option("min_moves", 1, 2 * size - 2)
        high = self._int_option("max_moves", low, 2 * size - 2)
        self._int_option("max_turns", high, 50)

    def instructions(self) -> str:
        return (
            "You walk on a frozen lake drawn as a grid. Each turn, reply with one action code: 1, 2, 3 or 4. "
            "Every code moves you one cell in a fixed direction (up, down, left or right), but which code means "
            "which direction is a secret that stays the same for the whole series of tasks. "
            "Reach the goal G in as few turns as possible; falling into a hole H ends the task."
        )

    def hidden_facts(self, rng: random.Random) -> dict[str, Any]:
        directions = list(DIRECTIONS)
        rng.shuffle(directions)
        return {"mapping": dict(zip(CODES, directions))}

    def make_task(self, pack: Pack, index: int, task_id: str) -> FrozenLakeTask:
        return FrozenLakeTask(pack, index, task_id)
