"""``grid-navigation``: reach a target over a cost landscape that only the pack knows.

Each pack hides one integer cost map (0-99 per cell): a few Gaussian cost hills over a cheap
background, as in the reference implementation, on a square grid whose size is drawn per pack.
Every task gives a new start, target and an exact number of rounds. A move is a rook move: any
distance along your row or your column; every cell you pass or land on is *entered* and costs
its value. Reward ``1 - mean(entered cost) / 100`` if you are on the target after the last
round, else 0.

At first every cost is hidden. Entering a cell reveals the costs within ``reveal_radius`` rows
and columns of it; with ``reveal_across_pack`` (default, as in the reference) what was revealed
stays revealed for the rest of the pack: this is pack state, kept on the
:class:`~lifecycle_agent.envs.Pack`.
"""

from __future__ import annotations

import math
import random
import re
from typing import Any, Optional

from ..tasks import StepResult
from .base import Environment, EnvTask, Pack
from .options import answer_format_option, draw, range_option
from .parsing import answer_block, labelled, shorten, without

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

    Reads ``<answer>R,C</answer>`` first, then ``row R, column C``, ``(R, C)``, ``R,C`` (1-based; an ``Action:``/``Move:`` line wins,
    else the last mention in the reply), or a direction with a distance (``down 3``).
    Echoes of the observation ("You are at row 2, column 3; the target is ...") are ignored.
    """
    strict = parse_strict_move(reply)
    if strict is not None:
        return strict
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
    """The route of exactly ``moves`` rook moves ending on ``target`` that minimises the mean entered cost.

    ``spent``/``entered``: cost and count of cells entered so far in the task. Returns
    ``(mean, route)`` where ``route`` is the list of landing cells, or ``(None, [])`` when
    no such route exists. A route may pass or land on the target before its last move (only
    where you are after the last round counts). Exact: Dinkelbach's method over integer
    ratios, each step a layered shortest-path search over the ``moves`` rounds.
    """
    segments = _Segments(costs)
    found = _route_ratio(segments, start, target, moves, 0, 1, spent, entered)
    if found is None:
        return None, []
    _, num, den, route = found
    if den == 0:  # no cell entered at all (moves == 0 and already there)
        return 0.0, route
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
    for _ in range(moves):
        nxt: dict = {}
        for cell, (value, total, count, node) in layer.items():
            here = (cell, node)
            for end, cost, length in segments.moves_from(cell):
                candidate = value + den * cost - num * length
                if end not in nxt or candidate < nxt[end][0]:
                    nxt[end] = (candidate, total + cost, count + length, here)
        layer = nxt
    if target not in layer:
        return None
    best = layer[target]
    route, node = [target], best[3]
    while node is not None and node[1] is not None:
        route.append(node[0])
        node = node[1]
    return best[0], best[1], best[2], route[::-1]


def landscape(rng: random.Random, size: int, hills: int, min_scale: float = 0.10, max_scale: float = 0.35) -> list[list[int]]:
    """A cost map of ``hills`` rotated Gaussian hills over a cheap background (the reference's landscape).

    Each hill has a random centre, two widths in ``[min_scale, max_scale]`` of the map, a random angle
    and a height in [0.8, 1.2]; the sum is scaled to [0, 1] and squared, so valleys stay cheap and the
    costs run from 0 to 99.
    """
    coords = [i / (size - 1) for i in range(size)]
    height = [[0.0] * size for _ in range(size)]
    for _ in range(hills):
        centre_r, centre_c = rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0)
        long_scale = rng.uniform(min_scale, max_scale)
        short_scale = rng.uniform(min_scale, long_scale)
        angle = rng.uniform(0.0, math.pi)
        amplitude = rng.uniform(0.8, 1.2)
        cos_a, sin_a = math.cos(angle), math.sin(angle)
        for r in range(size):
            for c in range(size):
                dr, dc = coords[r] - centre_r, coords[c] - centre_c
                along, across = cos_a * dr + sin_a * dc, -sin_a * dr + cos_a * dc
                height[r][c] += amplitude * math.exp(-0.5 * ((along / long_scale) ** 2 + (across / short_scale) ** 2))
    low = min(min(row) for row in height)
    span = max(max(row) for row in height) - low
    if span == 0.0:
        return [[0] * size for _ in range(size)]
    return [[int(round(99.0 * ((value - low) / span) ** 2)) for value in row] for row in height]


def witness_task(rng: random.Random, size: int, rounds: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """A start and target joined by a random walk of exactly ``rounds`` rook moves (so a route of that length exists)."""
    while True:
        start = (rng.randrange(size), rng.randrange(size))
        current = start
        for _ in range(rounds):
            r, c = current
            other = rng.randrange(size - 1)
            if rng.random() < 0.5:
                current = (r, other + 1 if other >= c else other)
            else:
                current = (other + 1 if other >= r else other, c)
        if current != start:
            return start, current


def chebyshev(cell: tuple[int, int], radius: int, size: int):
    """The cells within ``radius`` rows and columns of ``cell`` (the square the reference reveals)."""
    r, c = cell
    for i in range(max(0, r - radius), min(size, r + radius + 1)):
        for j in range(max(0, c - radius), min(size, c + radius + 1)):
            yield (i, j)


def render_costs(costs: list[list[int]], seen, size: int) -> str:
    header = "     " + "".join(f"{c + 1:>3}" for c in range(size))
    rows = [header]
    for r in range(size):
        cells = "".join(f"{costs[r][c]:>3}" if (r, c) in seen else "  ?" for c in range(size))
        rows.append(f"row{r + 1:>2}{cells}")
    return "\n".join(rows)


def read_costs(text: str) -> dict[tuple[int, int], int]:
    """Every cost a rendered map in ``text`` shows (later maps win): what an agent has seen."""
    seen: dict[tuple[int, int], int] = {}
    for row, values in _RENDER_ROW.findall(text or ""):
        for c, value in enumerate(values.split()):
            if value != "?":
                seen[(int(row) - 1, c)] = int(value)
    return seen


class GridNavigationTask(EnvTask):
    def __init__(self, pack: Pack, index: int, task_id: str):
        super().__init__(pack, index, task_id)
        env = pack.env
        self.costs: list[list[int]] = pack.hidden["costs"]
        self.size = len(self.costs)
        self.strict = env.options["answer_format"] == "strict"
        self.hints = env.options["hints"]
        self.radius = env.options["reveal_radius"]
        rng = pack.instance_rng(index)
        self.max_turns = draw(rng, env.rounds_range, integer=True)
        self.start_cell, self.target = witness_task(rng, self.size, self.max_turns)
        self.reveal_across_pack = env.options["reveal_across_pack"]
        # Cells this task reveals stay revealed for later tasks (cod packing): a resumed run replays it.
        self.replay_on_resume = bool(self.reveal_across_pack) and pack.packing == "cod"
        self._plan: Optional[tuple[float, list]] = None
        self.position, self.turns, self.spent, self.entered = self.start_cell, 0, 0, 0
        self.seen: set[tuple[int, int]] = set()

    def _reset(self) -> None:
        self.position = self.start_cell
        self.turns = 0
        self.spent = 0
        self.entered = 0
        self.seen = set(self.pack_state.get("seen", ())) if self.reveal_across_pack else set()

    def _reveal(self, cells) -> None:
        for cell in cells:
            self.seen.update(chebyshev(cell, self.radius, self.size))
        if self.reveal_across_pack:
            self.pack_state.setdefault("seen", set()).update(self.seen)

    def render(self) -> str:
        return render_costs(self.costs, self.seen, self.size)

    def _reply_with(self) -> str:
        if self.strict:
            return "Reply with the cell to move to, in your row or column, as <answer>row,column</answer> (e.g. <answer>3,5</answer>)."
        return "Reply with the cell to move to in your row or column, e.g. `Move: row 3, column 5`."

    def _status(self) -> str:
        left = self.max_turns - self.turns
        return (
            f"Round {self.turns + 1} of exactly {self.max_turns}: you are at {where(self.position)}; the target is "
            f"{where(self.target)}. {left} move{'s' if left != 1 else ''} left; you must be on the target after the last one.\n"
            f"Costs seen so far (? = not seen yet):\n{self.render()}\n{self._reply_with()}"
        )

    def start(self) -> str:
        self._reset()
        return self._status()

    def _mean(self) -> float:
        return self.spent / self.entered if self.entered else 0.0

    def _destination(self, action: str) -> tuple[Optional[tuple[int, int]], Optional[str]]:
        """The cell a reply moves to, or ``(None, why)`` for an unreadable or illegal move."""
        end = parse_strict_move(action) if self.strict else parse_move(action, self.position)
        if end is None:
            form = "<answer>row,column</answer>" if self.strict else "a move"
            return None, f"I could not read {form} in {shorten(action, 60)!r}"
        if not (0 <= end[0] < self.size and 0 <= end[1] < self.size):
            return None, f"row {end[0] + 1}, column {end[1] + 1} is off the {self.size}x{self.size} map"
        if end == self.position:
            return None, "the destination must differ from where you are"
        if end[0] != self.position[0] and end[1] != self.position[1]:
            return None, f"row {end[0] + 1}, column {end[1] + 1} is not along your row or column (you are at {where(self.position)})"
        return end, None

    def step(self, action: str) -> StepResult:
        end, why = self._destination(action)
        if end is None and self.strict:  # the reference ends the task on an invalid move
            return StepResult("", 0.0, True, f"Invalid move: {why}; the task ended with reward 0.{self._hint_text()}")
        self.turns += 1
        if end is None:
            note = f"{why[0].upper()}{why[1:]}; the move is lost."
        else:
            cells = path_cells(self.position, end)
            cost = sum(self.costs[r][c] for r, c in cells)
            self.spent += cost
            self.entered += len(cells)
            self.position = end
            self._reveal(cells)
            route = f" ({' -> '.join(where(cell) for cell in cells)})" if len(cells) <= 3 else ""
            note = (f"You moved to {where(end)}, entering {len(cells)} cell{'s' if len(cells) != 1 else ''}{route} "
                    f"of total cost {cost}; the cells entered so far cost {self._mean():.1f} on average.")
        if self.turns >= self.max_turns:
            return self._final(note)
        return StepResult(f"{note}\n{self._status()}", None, False, None)

    def _final(self, note: str) -> StepResult:
        seen = f"{note}\nCosts seen so far (? = not seen yet):\n{self.render()}\n"
        if self.position == self.target:
            reward = 1.0 - self._mean() / 100.0
            return StepResult("", reward, True, (
                f"{seen}Success: after round {self.max_turns} you are on the target; the {self.entered} cells you "
                f"entered cost {self._mean():.1f} on average; reward {reward:.3f}.{self._hint_text()}"))
        return StepResult("", 0.0, True, (
            f"{seen}Failed: after round {self.max_turns} you are at {where(self.position)}, not on the target at "
            f"{where(self.target)}; reward 0.{self._hint_text()}"))

    def _hint_text(self) -> str:
        """The ``hints`` curriculum (easy preset): the cheapest cells of the whole map. Never in train or hard."""
        if not self.hints:
            return ""
        cheap = sorted((self.costs[r][c], r, c) for r in range(self.size) for c in range(self.size))[:6]
        return "\nHint: the cheapest cells of the map are " + ", ".join(f"{where((r, c))} ({v})" for v, r, c in cheap) + "."

    def timeout_result(self) -> StepResult:
        return self._final(f"The {self.max_turns} rounds are over.")

    def _route(self) -> list[tuple[int, int]]:
        """The oracle's remaining route, planned once from the current state (replanned if play left it)."""
        plan = self._plan
        if plan is None or plan[0] != (self.position, self.turns, self.spent, self.entered):
            _, route = best_route(self.costs, self.position, self.target, self.max_turns - self.turns, self.spent, self.entered)
            self._plan = plan = ((self.position, self.turns, self.spent, self.entered), route)
        return plan[1]

    def oracle_action(self) -> str:
        route = self._route()
        if not route:
            raise RuntimeError(f"{self.id}: no route of {self.max_turns - self.turns} moves to the target")
        r, c = route[0]
        state = self._plan[0]
        # after this move the rest of the route is still optimal from the new state: keep it
        cells = path_cells(self.position, (r, c))
        self._plan = ((((r, c)), state[1] + 1, state[2] + sum(self.costs[i][j] for i, j in cells), state[3] + len(cells)), route[1:])
        return f"<answer>{r + 1},{c + 1}</answer>"

    def optimum(self) -> float:
        mean, _ = best_route(self.costs, self.start_cell, self.target, self.max_turns)
        return 1.0 - mean / 100.0


def where(cell: tuple[int, int]) -> str:
    return f"row {cell[0] + 1}, column {cell[1] + 1}"


class GridNavigation(Environment):
    name = "grid-navigation"
    description = (
        "Rook moves over a hidden per-pack landscape of cost hills; exactly N rounds; cells seen stay revealed."
    )
    easy_hints = "the observation names the cheapest cells of the whole map"
    defaults: dict[str, Any] = {
        "size": [8, 12], "rounds": [4, 6], "hills": 4, "reveal_radius": 2, "reveal_across_pack": True,
        "cheap_lanes": 0, "answer_format": "strict", "hints": False,
    }
    presets = {
        "train": {},
        "easy": {"size": 6, "rounds": [3, 4], "hills": 3, "answer_format": "lenient", "hints": True},
        "hard": {"size": [12, 14], "rounds": [6, 8], "hills": 6, "reveal_radius": 1},
    }

    def __init__(self, preset: str = "train", **options: Any):
        super().__init__(preset, **options)
        self.size_range = range_option(self, "size", 3, 16, integer=True)
        self.rounds_range = range_option(self, "rounds", 1, 10, integer=True)
        self._int_option("hills", 2, 12)
        self._int_option("reveal_radius", 0, 16)
        self._bool_option("reveal_across_pack")
        self._int_option("cheap_lanes", 0, self.size_range[0])
        self.answer_format = answer_format_option(self)
        self._bool_option("hints")

    def instructions(self) -> str:
        reply = ("reply with the cell to move to as <answer>row,column</answer> (rows and columns count from 1)"
                 if self.answer_format == "strict" else "reply with the cell to move to, e.g. `Move: row 3, column 5`")
        return (
            "You move on a square grid of cells whose integer costs (0-99) stay the same for the whole series of tasks. "
            f"Each round, {reply}: a move goes any distance along your row or your column, and every cell you pass "
            "or land on is entered and costs its value. A task has an exact number of rounds and you must be on the "
            "target after the last one; your reward is then 1 minus the mean cost of the cells you entered divided by "
            f"100 (else 0). Entering a cell reveals the costs within {self.options['reveal_radius']} rows and columns "
            "of it, and what you have seen stays revealed."
            + (" An unreadable or illegal move ends the task with reward 0." if self.answer_format == "strict" else "")
            + (" (Curriculum: this preset's feedback names the cheapest cells of the map.)" if self.options["hints"] else "")
        )

    def hidden_facts(self, rng: random.Random) -> dict[str, Any]:
        size = draw(rng, self.size_range, integer=True)
        costs = landscape(rng, size, self.options["hills"])
        for _ in range(self.options["cheap_lanes"]):  # optional cheap rows/columns over the landscape
            horizontal, index = rng.random() < 0.5, rng.randrange(size)
            for k in range(size):
                r, c = (index, k) if horizontal else (k, index)
                costs[r][c] = rng.randint(0, 12)
        return {"costs": costs}

    def make_task(self, pack: Pack, index: int, task_id: str) -> GridNavigationTask:
        return GridNavigationTask(pack, index, task_id)

    # The reference policy: it plans over the costs it has seen ------------------------------
    has_reference_policy = True

    def reference_notes(self, notes: str, transcript: str, reward: Optional[float], feedback: Optional[str]) -> str:
        """The map of every cost seen so far (the notes, then this task's observations and feedback)."""
        seen = read_costs(notes)
        seen.update(read_costs(f"{transcript}\n{feedback or ''}"))
        if not seen:
            return ""
        size = max(max(r, c) for r, c in seen) + 1
        grid = [[seen.get((r, c), 0) for c in range(size)] for r in range(size)]
        return "Costs seen (? = not seen yet):\n" + render_costs(grid, set(seen), size)

    def reference_reply(self, notes: str, messages: list[dict]) -> str:
        """The first move of the cheapest route of the rounds left, over the costs seen (unseen cells guessed)."""
        observation = str(messages[-1].get("content", ""))
        state = _STATUS.search(observation)
        if state is None:
            return "<answer>1,1</answer>"
        r, c, tr, tc, left = (int(g) for g in state.groups())
        seen = read_costs(notes)
        seen.update(read_costs(observation))
        size = len(_HEADER.search(observation).group(1).split()) if _HEADER.search(observation) else max(r, c, tr, tc)
        guess = UNSEEN_GUESS
        costs = [[seen.get((i, j), guess) for j in range(size)] for i in range(size)]
        _, route = best_route(costs, (r - 1, c - 1), (tr - 1, tc - 1), left)
        if not route:
            return f"<answer>{r},{tc}</answer>"
        return f"<answer>{route[0][0] + 1},{route[0][1] + 1}</answer>"


#: The cost the reference policy assumes for a cell it has not seen (most of a landscape is cheap valley).
UNSEEN_GUESS = 30
_RENDER_ROW = re.compile(r"^row\s*(\d+)((?:[ \t]+(?:\d+|\?))+)[ \t]*$", re.MULTILINE)
_HEADER = re.compile(r"^ {5}((?:[ \t]+\d+)+)[ \t]*$", re.MULTILINE)
_STATUS = re.compile(r"you are at row (\d+), column (\d+); the target is row (\d+), column (\d+)\. (\d+) moves? left")
_STRICT_MOVE = re.compile(r"\s*(-?\d+)\s*,\s*(-?\d+)\s*")


def parse_strict_move(reply: str) -> Optional[tuple[int, int]]:
    """The cell (0-based) of a ``<answer>row,column</answer>`` block (1-based in the text), or ``None``."""
    block = answer_block(reply)
    found = _STRICT_MOVE.fullmatch(block) if block is not None else None
    return (int(found.group(1)) - 1, int(found.group(2)) - 1) if found else None
