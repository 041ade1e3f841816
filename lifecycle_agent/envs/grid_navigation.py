"""``grid-navigation``: reach a target over a cost map that only the pack knows.

Each pack hides one integer cost map (0-99 per cell, with a few cheap rows or columns).
Every task gives a new start and target. A move is a rook move: any distance along
your row or your column; every cell you pass or land on is *entered* and costs its
value. You have a fixed number of moves. Reward ``1 - mean(entered cost) / 100`` if
you land on the target, else 0.

You see the cost of every cell you enter and of the cells next to where you stop.
With ``reveal_across_pack`` (default) the cells seen stay revealed for the rest of
the pack: this is pack state, kept on the :class:`~lifecycle_agent.envs.Pack`.
"""

from __future__ import annotations

import random
import re
from typing import Any, Optional

from ..tasks import StepResult
from .base import Environment, EnvTask, Pack
from .parsing import labelled, shorten, without

_ROW_COL = re.compile(r"\brow\s*(\d+)\D{0,16}?\bcol(?:umn)?\s*(\d+)", re.IGNORECASE)
_PAIR = re.compile(r"\(?\s*(\d+)\s*[,;]\s*(\d+)\s*\)?")
_DIRECTION = re.compile(r"\b(up|down|left|right|north|south|west|east)\b(?:\D{0,12}?(\d+))?", re.IGNORECASE)
_TWO_INTS = re.compile(r"^\D*(\d+)\s+(\d+)\D*$")
#: Text of our own observations that a model may echo back; never read as a move.
_ECHO = (
    re.compile(r"You are at row \d+, column \d+; the target is row \d+, column \d+\.?", re.IGNORECASE),
    re.compile(r"You moved to row \d+, column \d+[^.\n]*\.?", re.IGNORECASE),
    re.compile(r"Reply with the cell to move to[^\n]*", re.IGNORECASE),
    re.compile(r"\b\d+ moves? left\b", re.IGNORECASE),
)
_DELTAS = {"up": (-1, 0), "north": (-1, 0), "down": (1, 0), "south": (1, 0), "left": (0, -1), "west": (0, -1), "right": (0, 1), "east": (0, 1)}


def parse_move(reply: str, position: tuple[int, int]) -> Optional[tuple[int, int]]:
    """The destination cell (0-based) of a move, or ``None``.

    Reads ``row R, column C``, ``(R, C)``, ``R,C`` (1-based; an ``Action:``/``Move:`` line wins,
    else the last mention in the reply), or a direction with a distance (``down 3``).
    Echoes of the observation ("You are at row 2, column 3; the target is ...") are ignored.
    """
    reply = without(reply or "", _ECHO)
    label = labelled(reply)
    for text in ([label] if label else []) + [reply or ""]:
        for pattern in (_ROW_COL, _PAIR):
            matches = pattern.findall(text)
            if matches:
                row, col = matches[-1]
                return int(row) - 1, int(col) - 1
        direction = _DIRECTION.findall(text)
        if direction:
            word, distance = direction[-1]
            dr, dc = _DELTAS[word.lower()]
            steps = int(distance) if distance else 1
            return position[0] + dr * steps, position[1] + dc * steps
        pair = _TWO_INTS.match(text.strip())
        if pair:
            return int(pair.group(1)) - 1, int(pair.group(2)) - 1
    return None


def path_cells(start: tuple[int, int], end: tuple[int, int]) -> list[tuple[int, int]]:
    """Cells entered by a rook move from ``start`` to ``end`` (start excluded, end included)."""
    (r0, c0), (r1, c1) = start, end
    if r0 == r1:
        step = 1 if c1 > c0 else -1
        return [(r0, c) for c in range(c0 + step, c1 + step, step)]
    step = 1 if r1 > r0 else -1
    return [(r, c0) for r in range(r0 + step, r1 + step, step)]


def best_route(costs: list[list[int]], start, target, moves: int, spent: int = 0, entered: int = 0):
    """The route minimising the mean cost of entered cells, with at most ``moves`` rook moves.

    ``spent``/``entered``: cost and count of cells entered so far in the task. Returns
    ``(mean, route)`` where ``route`` is the list of landing cells, or ``(None, [])`` when
    the target cannot be reached. Exact: Dinkelbach's method over integer ratios, each
    step a layered shortest-path search (a route may not land on the target before its
    last move, because landing there ends the task).
    """
    segments = _Segments(costs)
    found = _route_ratio(segments, start, target, moves, 0, 1, spent, entered)
    if found is None:
        return None, []
    _, num, den, route = found
    while True:
        value, new_num, new_den, new_route = _route_ratio(segments, start, target, moves, num, den, spent, entered)
        if value >= 0:  # no route beats the ratio num/den: it is the optimum
            return num / den, route
        num, den, route = new_num, new_den, new_route


class _Segments:
    """Cost and length of every rook move on a cost map, from prefix sums."""

    def __init__(self, costs: list[list[int]]):
        self.size = len(costs)
        self.rows = [[0] + _cumsum(row) for row in costs]
        self.cols = [[0] + _cumsum([costs[r][c] for r in range(self.size)]) for c in range(self.size)]

    def moves_from(self, cell):
        """``(end, cost, cells entered)`` of every move from ``cell``."""
        r, c = cell
        row, col = self.rows[r], self.cols[c]
        for j in range(self.size):
            if j > c:
                yield (r, j), row[j + 1] - row[c + 1], j - c
            elif j < c:
                yield (r, j), row[c] - row[j], c - j
        for i in range(self.size):
            if i > r:
                yield (i, c), col[i + 1] - col[r + 1], i - r
            elif i < r:
                yield (i, c), col[r] - col[i], r - i


def _cumsum(values):
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def _route_ratio(segments: _Segments, start, target, moves, num, den, spent, entered):
    """min over routes of ``den*(spent+S) - num*(entered+K)``: ``(value, total cost, total cells, route)``."""
    # layer: cell -> (value, total cost, total cells, parent node); a node is (cell, parent node)
    layer = {start: (den * spent - num * entered, spent, entered, None)}
    best = None
    for _ in range(moves):
        nxt: dict = {}
        for cell, (value, total, count, node) in layer.items():
            if cell == target:
                continue
            here = (cell, node)
            for end, cost, length in segments.moves_from(cell):
                candidate = value + den * cost - num * length
                if end not in nxt or candidate < nxt[end][0]:
                    nxt[end] = (candidate, total + cost, count + length, here)
        if target in nxt and (best is None or nxt[target][0] < best[0]):
            best = nxt[target]
        layer = nxt
    if best is None:
        return None
    route, node = [target], best[3]
    while node is not None and node[1] is not None:
        route.append(node[0])
        node = node[1]
    return best[0], best[1], best[2], route[::-1]


class GridNavigationTask(EnvTask):
    def __init__(self, pack: Pack, index: int, task_id: str):
        super().__init__(pack, index, task_id)
        options = pack.env.options
        self.size, self.max_turns = options["size"], options["rounds"]
        self.costs: list[list[int]] = pack.hidden["costs"]
        rng = pack.instance_rng(index)
        cells = [(r, c) for r in range(self.size) for c in range(self.size)]
        while True:
            self.start_cell, self.target = rng.sample(cells, 2)
            if self.start_cell[0] != self.target[0] and self.start_cell[1] != self.target[1]:
                break
        self.reveal_across_pack = options["reveal_across_pack"]
        # Cells this task reveals stay revealed for later tasks (cod packing): a resumed run replays it.
        self.replay_on_resume = bool(self.reveal_across_pack) and pack.packing == "cod"
        self._optimum: Optional[float] = None
        self.position, self.turns, self.spent, self.entered = self.start_cell, 0, 0, 0
        self.seen: set[tuple[int, int]] = set()

    def _reset(self) -> None:
        self.position = self.start_cell
        self.turns = 0
        self.spent = 0
        self.entered = 0
        self.seen: set[tuple[int, int]] = set(self.pack_state.get("seen", ())) if self.reveal_across_pack else set()
        self._reveal_around(self.position)

    def _reveal_around(self, cell: tuple[int, int]) -> None:
        r, c = cell
        for dr, dc in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
            if 0 <= r + dr < self.size and 0 <= c + dc < self.size:
                self.seen.add((r + dr, c + dc))
        if self.reveal_across_pack:
            self.pack_state.setdefault("seen", set()).update(self.seen)

    def _where(self, cell) -> str:
        return f"row {cell[0] + 1}, column {cell[1] + 1}"

    def render(self) -> str:
        header = "     " + "".join(f"{c + 1:>4}" for c in range(self.size))
        rows = [header]
        for r in range(self.size):
            cells = "".join(f"{self.costs[r][c]:>4}" if (r, c) in self.seen else "   ?" for c in range(self.size))
            rows.append(f"row{r + 1:>2}{cells}")
        return "\n".join(rows)

    def _status(self) -> str:
        left = self.max_turns - self.turns
        return (
            f"You are at {self._where(self.position)}; the target is {self._where(self.target)}. "
            f"{left} move{'s' if left != 1 else ''} left.\nCosts seen so far (? = not seen yet):\n{self.render()}\n"
            "Reply with the cell to move to in your row or column, e.g. `Move: row 3, column 5`."
        )

    def start(self) -> str:
        self._reset()
        return self._status()

    def _mean(self) -> float:
        return self.spent / self.entered if self.entered else 0.0

    def step(self, action: str) -> StepResult:
        self.turns += 1
        end = parse_move(action, self.position)
        if end is None:
            note = f"I could not read a move in {shorten(action, 60)!r}; the move is lost."
        elif not (0 <= end[0] < self.size and 0 <= end[1] < self.size):
            note = f"Row {end[0] + 1}, column {end[1] + 1} is off the {self.size}x{self.size} map; the move is lost."
        elif end == self.position or (end[0] != self.position[0] and end[1] != self.position[1]):
            note = (
                f"Row {end[0] + 1}, column {end[1] + 1} is not along your row or column "
                f"(you are at {self._where(self.position)}); the move is lost."
            )
        else:
            cells = path_cells(self.position, end)
            cost = sum(self.costs[r][c] for r, c in cells)
            self.spent += cost
            self.entered += len(cells)
            for cell in cells:
                self.seen.add(cell)
            self.position = end
            self._reveal_around(end)
            if end == self.target:
                reward = 1.0 - self._mean() / 100.0
                return StepResult(
                    "", reward, True,
                    f"You reached the target in {self.turns} move{'s' if self.turns != 1 else ''}; the {self.entered} "
                    f"cells you entered cost {self._mean():.1f} on average; reward {reward:.3f}. {self._cheap_text()}",
                )
            note = f"You moved to {self._where(end)}, entering {len(cells)} cell{'s' if len(cells) != 1 else ''} (cost {cost})."
        if self.turns >= self.max_turns:
            return self.timeout_result()
        return StepResult(f"{note}\n{self._status()}", None, False, None)

    def _cheap_text(self) -> str:
        cheap = sorted((self.costs[r][c], r, c) for r, c in self.seen)[:4]
        if not cheap:
            return ""
        return "Cheapest cells seen: " + ", ".join(f"row {r + 1} column {c + 1} costs {v}" for v, r, c in cheap) + "."

    def timeout_result(self) -> StepResult:
        return StepResult(
            "", 0.0, True,
            f"The {self.max_turns} moves ran out before you landed on the target at {self._where(self.target)}; "
            f"reward 0. {self._cheap_text()}",
        )

    def oracle_action(self) -> str:
        _, route = best_route(self.costs, self.position, self.target, self.max_turns - self.turns, self.spent, self.entered)
        r, c = route[0] if route else (self.position[0], self.target[1])
        if (r, c) == self.position:  # unreachable and already in the target's column: head for its row
            r, c = self.target[0], self.position[1]
        return f"Move: row {r + 1}, column {c + 1}"

    def optimum(self) -> float:
        if self._optimum is None:
            mean, _ = best_route(self.costs, self.start_cell, self.target, self.max_turns)
            self._optimum = 1.0 - mean / 100.0
        return self._optimum


class GridNavigation(Environment):
    name = "grid-navigation"
    description = "Rook moves over a hidden per-pack cost map; cheap routes pay; cells seen stay revealed."
    defaults: dict[str, Any] = {"size": 6, "rounds": 4, "cheap_lanes": 2, "reveal_across_pack": True}
    presets = {
        "train": {},
        "easy": {"size": 5, "rounds": 5},
        "hard": {"size": 8, "rounds": 3, "cheap_lanes": 1},
    }

    def __init__(self, preset: str = "train", **options: Any):
        super().__init__(preset, **options)
        size = self._int_option("size", 3, 10)
        self._int_option("rounds", 2, 10)
        self._int_option("cheap_lanes", 0, size)
        self._bool_option("reveal_across_pack")

    def instructions(self) -> str:
        return (
            "You move on a grid of cells whose integer costs (0-99) stay the same for the whole series of tasks. "
            "A move goes any distance along your row or your column; every cell you pass or land on is entered and "
            "costs its value. Land on the target within the allowed moves; your reward is 1 minus the mean cost of "
            "the cells you entered divided by 100. Cheap rows and columns are worth remembering."
        )

    def hidden_facts(self, rng: random.Random) -> dict[str, Any]:
        size, lanes = self.options["size"], self.options["cheap_lanes"]
        costs = [[rng.randint(30, 99) for _ in range(size)] for _ in range(size)]
        cheap = []
        for _ in range(lanes):
            horizontal, index = rng.random() < 0.5, rng.randrange(size)
            cheap.append(("row" if horizontal else "column", index + 1))
            for k in range(size):
                r, c = (index, k) if horizontal else (k, index)
                costs[r][c] = rng.randint(0, 12)
        return {"costs": costs, "cheap_lanes": cheap}

    def make_task(self, pack: Pack, index: int, task_id: str) -> GridNavigationTask:
        return GridNavigationTask(pack, index, task_id)
