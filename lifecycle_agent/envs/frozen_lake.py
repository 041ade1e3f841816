"""``frozen-lake-obscure``: walk a frozen lake to the goal when the move codes are a secret.

Each pack hides one mapping of the action codes 1-4 to up/down/left/right. Every task
shows a new map (its size and the share of holes drawn per task; the goal at most
``max_moves`` moves away). Nothing the environment says names a code's direction: a step
shows only the position change, so the agent has to work the mapping out from where it
went, and an agent that notes it can walk straight to the goal in later tasks.

Rules (those of the reference implementation): one code per turn; at most ``max_turns``
turns. Reward 1 on reaching the goal; 0 on falling into a hole, on a reply without a
readable code, or when the turns run out. Moving off the map wastes the turn.
"""

from __future__ import annotations

import random
import re
from collections import deque
from typing import Any, Optional

from ..errors import EnvironmentSpecError
from ..tasks import StepResult
from .base import Environment, EnvTask, Pack
from .options import answer_format_option, draw, range_option
from .parsing import answer_block, labelled, shorten, without

DIRECTIONS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
CODES = ("1", "2", "3", "4")
STRICT_ANSWER = "<answer>Direction X</answer>"

_POSITION_MENTION = re.compile(r"\b(?:row|column|col|r|c)\s*\d+|\(\s*\d+\s*,\s*\d+\s*\)", re.IGNORECASE)
_ACTION_WORD = re.compile(r"\b(?:action|code|direction|press(?:ing)?|choose|pick|take|try|use)\s*(?:code)?\s*[:=#]?\s*([1-4])\b", re.IGNORECASE)
#: Text of our own observations that a model may echo back; never read as an action.
_ECHO = (
    re.compile(r"Reply with (?:one|a single) (?:action )?code:?(?:[ \t]*[1-4][ \t]*(?:,|or\b|\.)?)*", re.IGNORECASE),
    re.compile(r"Reply with <answer>Direction X</answer>[^\n]*", re.IGNORECASE),
    re.compile(r"\b1,\s*2,\s*3,?\s*(?:or|and)\s*4\b"),
    re.compile(r"\b\d+\s+turns?\b", re.IGNORECASE),
    re.compile(r"\bYou (?:executed|played) (?:action )?Direction \d+[^.\n]*\.?", re.IGNORECASE),
    re.compile(r"\b(?:Direction|Action) \d+ (?:moved|would move) you[^.\n]*\.?", re.IGNORECASE),
)
_CODE = re.compile(r"(?<![\d.])([1-4])(?!\d|\.\d)")
_STRICT = re.compile(r"\s*direction\s+(\d+)", re.IGNORECASE)
# What the agent sees of one step: the code it played and the position change (never a direction word).
_MOVE = re.compile(
    r"Direction ([1-4])\D{0,40}?from row (\d+), column (\d+) (?:to|into the hole at|onto the goal at) row (\d+), column (\d+)",
    re.IGNORECASE,
)
_NOTE = re.compile(r"direction ([1-4]) moves (up|down|left|right)", re.IGNORECASE)
_MAP_ROW = re.compile(r"^[@GH.](?: [@GH.])+$")
_TURNS_LEFT = re.compile(r"(\d+) turns? remaining")


def parse_code(reply: str) -> Optional[str]:
    """The action code in a reply, read leniently, or ``None``.

    A ``<answer>Direction N</answer>`` block wins; then an ``Action: N`` (or ``Answer: N``) line;
    then phrases like "I choose 3" or "press 2"; then the first stand-alone 1-4 that is not part
    of a row/column mention. Echoes of the observation ("Reply with one action code: 1, 2, 3 or 4",
    "7 turns left", "You executed action Direction 3") are ignored.
    """
    strict = parse_strict(reply)
    if strict is not None and strict in CODES:
        return strict
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


def parse_strict(reply: str) -> Optional[str]:
    """The number of a ``<answer>Direction X</answer>`` block (the reference's format), or ``None``.

    Any number is returned; the caller refuses one that is not a code (as the reference does).
    """
    block = answer_block(reply)
    found = _STRICT.match(block) if block is not None else None
    return str(int(found.group(1))) if found else None


def shortest_path(size: int, holes: frozenset, start: tuple, goal: tuple, directions=None) -> Optional[list[tuple[int, int]]]:
    """Cells from ``start`` to ``goal`` on a shortest hole-free path (both included), or ``None``.

    ``directions``: the directions a walker may use (default: all four).
    """
    deltas = [DIRECTIONS[d] for d in (directions if directions is not None else DIRECTIONS)]
    previous = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            path = [cell]
            while previous[path[-1]] is not None:
                path.append(previous[path[-1]])
            return path[::-1]
        for dr, dc in deltas:
            nxt = (cell[0] + dr, cell[1] + dc)
            if 0 <= nxt[0] < size and 0 <= nxt[1] < size and nxt not in holes and nxt not in previous:
                previous[nxt] = cell
                queue.append(nxt)
    return None


def direction_of(step: tuple[int, int]) -> str:
    return next(name for name, delta in DIRECTIONS.items() if delta == step)


def where(cell: tuple[int, int]) -> str:
    return f"row {cell[0] + 1}, column {cell[1] + 1}"


class FrozenLakeTask(EnvTask):
    def __init__(self, pack: Pack, index: int, task_id: str):
        super().__init__(pack, index, task_id)
        env = pack.env
        self.max_turns = env.options["max_turns"]
        self.strict = env.options["answer_format"] == "strict"
        self.hints = env.options["hints"]
        rng = pack.instance_rng(index)
        self.size = draw(rng, env.size_range, integer=True)
        self.hole_share = draw(rng, env.holes_range, integer=False)
        self.holes, self.start_cell, self.goal = _make_map(rng, self.size, self.hole_share, env.options)
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

    def _reply_with(self) -> str:
        if self.strict:
            return f"Reply with {STRICT_ANSWER}, where X is 1, 2, 3 or 4."
        return "Reply with one action code: 1, 2, 3 or 4."

    def _status(self, legend: bool = False) -> str:
        left = self.max_turns - self.turns
        title = "Map (@ you, G goal, H hole, . ice; row 1 is the top row, column 1 the first column)" if legend else "Map"
        return (
            f"{title}:\n{self.render()}\n"
            f"You are at {where(self.position)}; the goal is at {where(self.goal)}. "
            f"{left} turn{'s' if left != 1 else ''} remaining. {self._reply_with()}"
        )

    def start(self) -> str:
        self._reset()
        return self._status(legend=True)

    def _hint_text(self) -> str:
        """The ``hints`` curriculum (easy preset): what each code tried did. Never in train or hard."""
        if not self.hints or not self.learned:
            return ""
        pairs = ", ".join(f"{code} = {self.learned[code]}" for code in sorted(self.learned))
        return f" Hint: what the codes did in this task: {pairs}."

    def _format_error(self, action: str, code: Optional[str]) -> StepResult:
        said = shorten(action, 60)
        if self.strict:
            why = f"Direction {code} is not a valid action" if code is not None else f"no {STRICT_ANSWER} in your reply ({said!r})"
            text = f"Invalid format: {why}. Expected {STRICT_ANSWER} with X one of 1, 2, 3, 4; the task ended with reward 0."
        else:
            text = (f"Your reply ({said!r}) held no action code, so the episode ended with reward 0. "
                    "Reply with a single code 1, 2, 3 or 4.")
        return StepResult("", 0.0, True, text + self._hint_text())

    def step(self, action: str) -> StepResult:
        code = parse_strict(action) if self.strict else parse_code(action)
        if code not in CODES:
            return self._format_error(action, code)
        self.turns += 1
        direction = self.mapping[code]
        self.learned[code] = direction
        dr, dc = DIRECTIONS[direction]
        before = self.position
        target = (before[0] + dr, before[1] + dc)
        played = f"You executed action Direction {code}."
        hint = f" (Hint: Direction {code} moved you {direction}.)" if self.hints else ""
        if not (0 <= target[0] < self.size and 0 <= target[1] < self.size):
            moved = (f"{played} Your position did not change (you stayed at {where(before)}): "
                     f"the move may have gone off the edge of the map.{hint}")
        elif target in self.holes:
            return StepResult(
                "", 0.0, True,
                f"Failed: action Direction {code} moved you from {where(before)} into the hole at {where(target)}; "
                f"reward 0.{self._hint_text()}",
            )
        elif target == self.goal:
            self.position = target
            return StepResult(
                "", 1.0, True,
                f"Success: action Direction {code} moved you from {where(before)} onto the goal at {where(target)} "
                f"in {self.turns} turn{'s' if self.turns != 1 else ''}; reward 1.{self._hint_text()}",
            )
        else:
            self.position = target
            moved = f"{played} Your position changed from {where(before)} to {where(target)}.{hint}"
        if self.turns >= self.max_turns:
            return self.timeout_result()
        return StepResult(f"{moved}\n{self._status()}", None, False, None)

    def timeout_result(self) -> StepResult:
        return StepResult(
            "", 0.0, True,
            f"Failed: the {self.max_turns} turns ran out before you reached the goal (you ended at "
            f"{where(self.position)}); reward 0.{self._hint_text()}",
        )

    def oracle_action(self) -> str:
        path = shortest_path(self.size, self.holes, self.position, self.goal)
        if path is None or len(path) < 2:
            raise RuntimeError(f"{self.id}: no path from {self.position} to the goal")
        direction = direction_of((path[1][0] - path[0][0], path[1][1] - path[0][1]))
        code = next(code for code, name in self.mapping.items() if name == direction)
        return f"<answer>Direction {code}</answer>"

    def optimum(self) -> float:
        return 1.0


def _make_map(rng: random.Random, size: int, density: float, options: dict[str, Any]):
    cells = [(r, c) for r in range(size) for c in range(size)]
    for _ in range(10_000):
        start, goal = rng.sample(cells, 2)
        holes = frozenset(cell for cell in cells if cell not in (start, goal) and rng.random() < density)
        path = shortest_path(size, holes, start, goal)
        if path is not None and options["min_moves"] <= len(path) - 1 <= options["max_moves"]:
            return holes, start, goal
    raise EnvironmentSpecError(
        f"frozen-lake-obscure: no map of size {size} with holes {density:.2f} has a path of "
        f"{options['min_moves']}-{options['max_moves']} moves; relax the options"
    )


def read_moves(text: str) -> dict[str, str]:
    """Code -> direction for every position change that ``text`` (observations, feedback) shows."""
    found = {}
    for code, r0, c0, r1, c1 in _MOVE.findall(text or ""):
        step = (int(r1) - int(r0), int(c1) - int(c0))
        if step in DIRECTIONS.values():
            found[code] = direction_of(step)
    return found


def complete(mapping: dict[str, str]) -> dict[str, str]:
    """With three codes known the fourth is the one direction left (the mapping is a permutation)."""
    if len(mapping) == 3:
        (code,) = set(CODES) - set(mapping)
        (direction,) = set(DIRECTIONS) - set(mapping.values())
        mapping = {**mapping, code: direction}
    return mapping


class FrozenLakeObscure(Environment):
    name = "frozen-lake-obscure"
    description = (
        "Frozen lake whose action codes 1-4 map to directions by a secret, per-pack permutation."
    )
    easy_hints = "the feedback names the direction each code tried moved you"
    defaults: dict[str, Any] = {
        "size": [4, 5], "holes": [0.3, 0.4], "min_moves": 2, "max_moves": 6, "max_turns": 8,
        "answer_format": "strict", "hints": False,
    }
    presets = {
        "train": {},
        "easy": {"size": 3, "holes": 0.15, "min_moves": 1, "max_moves": 4, "answer_format": "lenient", "hints": True},
        "hard": {"size": [6, 7], "min_moves": 4, "max_moves": 8, "max_turns": 10},
    }

    def __init__(self, preset: str = "train", **options: Any):
        super().__init__(preset, **options)
        self.size_range = range_option(self, "size", 2, 9, integer=True)
        self.holes_range = range_option(self, "holes", 0.0, 0.6, integer=False)
        low = self._int_option("min_moves", 1, 2 * self.size_range[0] - 2)
        high = self._int_option("max_moves", low, 2 * self.size_range[0] - 2)
        self._int_option("max_turns", high, 50)
        self.answer_format = answer_format_option(self)
        self._bool_option("hints")

    def instructions(self) -> str:
        reply = (f"reply with {STRICT_ANSWER} where X is an action code 1, 2, 3 or 4"
                 if self.answer_format == "strict" else "reply with one action code: 1, 2, 3 or 4")
        return (
            f"You walk on a frozen lake drawn as a grid. Each turn, {reply}. "
            "Every code moves you one cell in a fixed direction (up, down, left or right), but which code means "
            "which direction is a secret that stays the same for the whole series of tasks. "
            "Reach the goal G within the turns you have; falling into a hole H ends the task."
            + (" (Curriculum: this preset's feedback names the direction each code moved you.)" if self.options["hints"] else "")
        )

    def hidden_facts(self, rng: random.Random) -> dict[str, Any]:
        directions = list(DIRECTIONS)
        rng.shuffle(directions)
        return {"mapping": dict(zip(CODES, directions))}

    def make_task(self, pack: Pack, index: int, task_id: str) -> FrozenLakeTask:
        return FrozenLakeTask(pack, index, task_id)

    # The reference policy: it learns the mapping from position changes only -----------------
    has_reference_policy = True

    def reference_notes(self, notes: str, transcript: str, reward: Optional[float], feedback: Optional[str]) -> str:
        """One line per code whose direction a position change showed (the notes or this task); the newest wins."""
        mapping = {code: direction.lower() for code, direction in _NOTE.findall(notes or "")}
        mapping.update(read_moves(f"{transcript}\n{feedback or ''}"))
        mapping = complete(mapping)
        return "\n".join(f"- Direction {code} moves {mapping[code]}." for code in sorted(mapping))

    def reference_reply(self, notes: str, messages: list[dict]) -> str:
        """The next code on a shortest safe path using the codes known (notes, or seen in this task), else a probe."""
        seen = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")
        mapping = {code: direction.lower() for code, direction in _NOTE.findall(notes or "")}
        mapping = complete({**mapping, **read_moves(seen)})
        board = _read_board(str(messages[-1].get("content", "")))
        code = _safe_code(board, mapping) if board else None
        return f"<answer>Direction {code or _probe(board, mapping)}</answer>"


def _read_board(observation: str) -> Optional[dict[str, Any]]:
    """The last map an observation draws: size, holes, your cell and the goal (``None`` when it shows none)."""
    rows = [line.strip() for line in observation.splitlines() if _MAP_ROW.match(line.strip())]
    if not rows:
        return None
    rows = rows[-len(rows[-1].split()):]
    board: dict[str, Any] = {"size": len(rows), "holes": set(), "you": None, "goal": None}
    for r, line in enumerate(rows):
        for c, mark in enumerate(line.split()):
            if mark == "H":
                board["holes"].add((r, c))
            elif mark == "@":
                board["you"] = (r, c)
            elif mark == "G":
                board["goal"] = (r, c)
    left = _TURNS_LEFT.findall(observation)
    board["turns_left"] = int(left[-1]) if left else 99
    return board if board["you"] and board["goal"] else None


def _safe_code(board: dict[str, Any], mapping: dict[str, str]) -> Optional[str]:
    """The known code that starts a shortest hole-free path to the goal over known directions, if one fits the turns left."""
    path = shortest_path(board["size"], frozenset(board["holes"]), board["you"], board["goal"], set(mapping.values()))
    if path is None or len(path) < 2 or len(path) - 1 > board["turns_left"]:
        return None
    direction = direction_of((path[1][0] - path[0][0], path[1][1] - path[0][1]))
    return next(code for code, name in mapping.items() if name == direction)


def _probe(board: Optional[dict[str, Any]], mapping: dict[str, str]) -> str:
    """An unknown code to learn from: the lowest one (every unknown code is equally likely to be any unknown direction)."""
    unknown = [code for code in CODES if code not in mapping]
    if unknown:
        return unknown[0]
    # Everything known but no safe path fits: step along any known direction that is not a hole.
    for code in CODES:
        if board is None:
            return code
        dr, dc = DIRECTIONS[mapping[code]]
        r, c = board["you"][0] + dr, board["you"][1] + dc
        if 0 <= r < board["size"] and 0 <= c < board["size"] and (r, c) not in board["holes"]:
            return code
    return CODES[0]
