"""``optimal-control``: steer a point mass whose dynamics only the pack knows.

Each pack hides the constants of ``v' = a*v + b*u`` and ``x' = x + v'`` (``b`` may be
negative: pushing one way can move the mass the other way). Every task gives a new
start and goal. The agent writes a feedback policy ``u(x, v, t, goal)`` as an
arithmetic expression (read by :mod:`~lifecycle_agent.envs.expression`, never by
``eval``); ``u`` is clipped to [-1, 1] and applied for ``horizon`` steps.

Reward ``1 / (1 + L)``, ``L = (x_T - goal)^2 + 2 * v_T^2 + 0.03 * sum(u^2)``. With
several attempts per task, each one is simulated and shown, and the best counts. The
oracle plays the exact optimum (a box-constrained least-squares problem solved by an
active-set method; the tests check its optimality conditions).
"""

from __future__ import annotations

import random
import re
from typing import Any, Optional

from ..tasks import StepResult
from .base import Environment, EnvTask, Pack
from .expression import Expression, ExpressionError
from .parsing import code_blocks, inline_code, labelled, nonempty_lines, shorten

VARIABLES = ("x", "v", "t", "goal")
EFFORT = 0.03
VELOCITY_WEIGHT = 2.0
_PREFIX = re.compile(r"^\s*(?:[-*>]\s*)?u\s*(?:\([^)]*\))?\s*(?:=|:)\s*", re.IGNORECASE)
_U_ASSIGN = re.compile(r"(?:^|[\s`*(:])u\s*(?:\([^)]*\))?\s*=\s*([^=].*)$", re.IGNORECASE)


def simulate(a: float, b: float, x: float, v: float, goal: float, horizon: int, policy) -> dict[str, Any]:
    """Run ``policy(x, v, t) -> u`` (clipped to [-1, 1]) for ``horizon`` steps. Returns the trajectory and loss."""
    rows, effort = [], 0.0
    for t in range(horizon):
        u = min(1.0, max(-1.0, float(policy(x, v, t))))
        rows.append((t, x, v, u))
        v = a * v + b * u
        x = x + v
        effort += u * u
    position_error, velocity_error = (x - goal) ** 2, VELOCITY_WEIGHT * v * v
    loss = position_error + velocity_error + EFFORT * effort
    return {"rows": rows, "x": x, "v": v, "loss": loss, "parts": (position_error, velocity_error, EFFORT * effort)}


def optimal_controls(a: float, b: float, x: float, v: float, goal: float, horizon: int) -> list[float]:
    """The control sequence minimising ``L`` under ``|u| <= 1`` (exact, primal active-set method).

    ``x_T`` and ``v_T`` are affine in ``u``, so ``L`` is a strictly convex quadratic
    ``(g.u - e1)^2 + 2 (h.u - e2)^2 + 0.03 |u|^2`` over a box.
    """
    zero = simulate(a, b, x, v, goal, horizon, lambda *_: 0.0)
    g, h = [], []
    for j in range(horizon):
        pulse = simulate(a, b, x, v, goal, horizon, lambda _x, _v, t, j=j: 1.0 if t == j else 0.0)
        g.append(pulse["x"] - zero["x"])
        h.append(pulse["v"] - zero["v"])
    return solve_box_qp(g, h, goal - zero["x"], -zero["v"], 1.0, VELOCITY_WEIGHT, EFFORT)


def qp_gradient(u, g, h, e1, e2, w1, w2, lam) -> list[float]:
    """Gradient of ``w1 (g.u - e1)^2 + w2 (h.u - e2)^2 + lam |u|^2``."""
    r1 = sum(gi * ui for gi, ui in zip(g, u)) - e1
    r2 = sum(hi * ui for hi, ui in zip(h, u)) - e2
    return [2 * (w1 * r1 * gi + w2 * r2 * hi + lam * ui) for gi, hi, ui in zip(g, h, u)]


def solve_box_qp(g, h, e1, e2, w1, w2, lam, tol: float = 1e-12) -> list[float]:
    """Minimise ``w1 (g.u - e1)^2 + w2 (h.u - e2)^2 + lam |u|^2`` over ``-1 <= u_i <= 1``.

    Primal active set (Nocedal & Wright, algorithm 16.3). With the bounds in the working
    set fixed, the free part of the minimiser is ``alpha*g + beta*h``: a 2x2 solve.
    """
    n = len(g)
    u = [0.0] * n
    working: set[int] = set()
    for _ in range(50 * (n + 1)):
        free = [i for i in range(n) if i not in working]
        c1 = sum(g[i] * u[i] for i in working) - e1
        c2 = sum(h[i] * u[i] for i in working) - e2
        gg = sum(g[i] * g[i] for i in free) + lam / w1
        gh = sum(g[i] * h[i] for i in free)
        hh = sum(h[i] * h[i] for i in free) + lam / w2
        det = gg * hh - gh * gh
        alpha, beta = (-c1 * hh + c2 * gh) / det, (-c2 * gg + c1 * gh) / det
        target = [u[i] if i in working else alpha * g[i] + beta * h[i] for i in range(n)]
        step = [t - ui for t, ui in zip(target, u)]
        if max((abs(s) for s in step), default=0.0) <= tol:
            grad = qp_gradient(u, g, h, e1, e2, w1, w2, lam)
            violations = [(grad[i] * u[i], i) for i in working]  # > 0: the bound is pushing the wrong way
            worst = max(violations, default=(0.0, -1))
            if worst[0] <= tol:
                return u
            working.discard(worst[1])
            continue
        length, blocking = 1.0, None
        for i in free:
            if step[i] > tol and u[i] + step[i] > 1.0:
                ratio = (1.0 - u[i]) / step[i]
            elif step[i] < -tol and u[i] + step[i] < -1.0:
                ratio = (-1.0 - u[i]) / step[i]
            else:
                continue
            if ratio < length:
                length, blocking = ratio, i
        u = [ui + length * s for ui, s in zip(u, step)]
        if blocking is not None:
            u[blocking] = 1.0 if step[blocking] > 0 else -1.0
            working.add(blocking)
    raise RuntimeError("optimal-control: the active-set solver did not converge")


def parse_policy(reply: str) -> tuple[Optional[Expression], Optional[str]]:
    """The policy expression in a reply, or ``(None, why)``.

    Looks, in order, at an ``Action:``/``Policy:``/``Answer:`` line, lines of the form
    ``u = ...`` (also inside a sentence), code blocks, inline code, and finally the whole one-line reply.
    """
    candidates: list[str] = []
    label = labelled(reply)
    if label:
        candidates.append(label)
    lines = nonempty_lines(reply)
    candidates += [m.group(1) for m in (_U_ASSIGN.search(line) for line in reversed(lines)) if m]
    for block in code_blocks(reply):
        candidates += list(reversed(nonempty_lines(block)))
    candidates += list(reversed(inline_code(reply)))
    if len(lines) == 1:
        candidates.append(lines[0])
    first_error = None
    for text in candidates:
        text = _PREFIX.sub("", text.strip().strip("`*")).strip().rstrip(".;").strip("`* ")
        try:
            return Expression(text, VARIABLES), None
        except ExpressionError as exc:
            first_error = first_error or f"{shorten(text, 60)!r}: {exc}"
    return None, first_error or "no line of the form `u = <expression>` was found"


class OptimalControlTask(EnvTask):
    def __init__(self, pack: Pack, index: int, task_id: str):
        super().__init__(pack, index, task_id)
        options = pack.env.options
        self.horizon, self.max_turns = options["horizon"], options["attempts"]
        self.a, self.b = pack.hidden["a"], pack.hidden["b"]
        rng = pack.instance_rng(index)
        self.x0 = round(rng.uniform(-3.0, 3.0), 2)
        self.v0 = round(rng.uniform(-0.5, 0.5), 2)
        distance = rng.uniform(options["distance_low"], options["distance_high"])
        self.goal = round(self.x0 + distance * rng.choice((-1, 1)), 2)
        self._optimal: Optional[list[float]] = None
        self._reset()

    def _reset(self) -> None:
        self.attempt = 0
        self.best: Optional[float] = None
        self.best_summary = ""
        self.first_response = ""

    def start(self) -> str:
        self._reset()
        return (
            f"Start: x = {self.x0:.2f}, v = {self.v0:.2f}. Goal: x = {self.goal:.2f} with v = 0 after {self.horizon} steps "
            f"(t = 0 .. {self.horizon - 1}). You have {self.max_turns} attempt{'s' if self.max_turns != 1 else ''}; "
            "the best one counts. Reply with one line `u = <expression in x, v, t, goal>`."
        )

    def _run(self, expression: Expression) -> dict[str, Any]:
        return simulate(
            self.a, self.b, self.x0, self.v0, self.goal, self.horizon,
            lambda x, v, t: expression(x=x, v=v, t=t, goal=self.goal),
        )

    def step(self, action: str) -> StepResult:
        self.attempt += 1
        last = self.attempt >= self.max_turns
        expression, why = parse_policy(action)
        if expression is not None:
            try:
                outcome = self._run(expression)
            except ExpressionError as exc:
                expression, why = None, f"computing u failed: {exc}"
        if expression is None:
            note = f"Attempt {self.attempt}: I could not use your controller ({why}); this attempt scores 0."
            self.best = self.best if self.best is not None else 0.0
        else:
            reward = 1.0 / (1.0 + outcome["loss"])
            if self.best is None or reward > self.best:
                self.best = reward
                self.best_summary = (
                    f"attempt {self.attempt} ended at x = {outcome['x']:.2f} for goal {self.goal:.2f} with v = {outcome['v']:.2f}"
                )
            if not self.first_response:
                self.first_response = _response_text(outcome["rows"], self.a, self.b)
            note = f"Attempt {self.attempt}: u = {expression.text}\n{_trajectory_text(outcome, self.goal)}"
        if last:
            return StepResult("", self.best, True, self._feedback())
        return StepResult(
            f"{note}\nBest reward so far {self.best:.3f}. Reply with an improved `u = ...` "
            f"({self.max_turns - self.attempt} attempt{'s' if self.max_turns - self.attempt != 1 else ''} left).",
            self.best, False, None,
        )

    def _feedback(self) -> str:
        if not self.best_summary:
            return (
                "No controller could be used, so the reward is 0. Write one line `u = <expression>` using x, v, t, goal, "
                "numbers, + - * / and functions such as clip(value, -1, 1)."
            )
        return f"Best reward {self.best:.3f}: {self.best_summary}. {self.first_response}".strip()

    def timeout_result(self) -> StepResult:
        return StepResult("", self.best or 0.0, True, self._feedback())

    def optimal_controls(self) -> list[float]:
        if self._optimal is None:
            self._optimal = optimal_controls(self.a, self.b, self.x0, self.v0, self.goal, self.horizon)
        return self._optimal

    def oracle_action(self) -> str:
        values = ", ".join(f"{u:.6f}" for u in self.optimal_controls())
        return f"u = [{values}][t]"

    def optimum(self) -> float:
        controls = self.optimal_controls()
        outcome = simulate(self.a, self.b, self.x0, self.v0, self.goal, self.horizon, lambda x, v, t: controls[t])
        return 1.0 / (1.0 + outcome["loss"])


def _trajectory_text(outcome: dict[str, Any], goal: float) -> str:
    lines = ["t     x      v      u"]
    lines += [f"{t:<2} {x:>6.2f} {v:>6.2f} {u:>6.2f}" for t, x, v, u in outcome["rows"]]
    position, velocity, effort = outcome["parts"]
    lines.append(
        f"end: x = {outcome['x']:.2f} (goal {goal:.2f}), v = {outcome['v']:.2f} (goal 0). "
        f"Loss {outcome['loss']:.3f} = {position:.3f} position + {velocity:.3f} velocity + {effort:.3f} effort; "
        f"reward {1.0 / (1.0 + outcome['loss']):.3f}."
    )
    return "\n".join(lines)


def _response_text(rows, a: float, b: float) -> str:
    """A sentence about what the system did in one step, from the first step with a clear push."""
    for _, _, v, u in rows:
        if abs(u) >= 0.2:
            after = a * v + b * u
            return f"Observed: with u = {u:.2f} the velocity went from {v:.2f} to {after:.2f} in one step."
    return "Your controller hardly pushed (|u| < 0.2 throughout), so the run showed little about the system."


class OptimalControl(Environment):
    name = "optimal-control"
    description = "Write a feedback controller u(x, v, t, goal) for hidden dynamics v' = a*v + b*u, x' = x + v'."
    defaults: dict[str, Any] = {
        "horizon": 10, "attempts": 2, "a_low": 0.7, "a_high": 0.95, "b_low": 0.3, "b_high": 0.8,
        "flip_sign": True, "distance_low": 1.0, "distance_high": 4.0,
    }
    presets = {
        "train": {},
        "easy": {"horizon": 12, "attempts": 3, "a_low": 0.8, "a_high": 0.9, "b_low": 0.4, "b_high": 0.6,
                 "flip_sign": False, "distance_low": 1.0, "distance_high": 3.0},
        "hard": {"horizon": 8, "attempts": 1, "a_low": 0.5, "a_high": 1.0, "b_low": 0.15, "b_high": 1.0,
                 "distance_low": 2.0, "distance_high": 5.0},
    }

    def __init__(self, preset: str = "train", **options: Any):
        super().__init__(preset, **options)
        self._int_option("horizon", 2, 30)
        self._int_option("attempts", 1, 10)
        low = self._float_option("a_low", 0.0, 1.0)
        self._float_option("a_high", low, 1.0)
        low = self._float_option("b_low", 0.01, 2.0)
        self._float_option("b_high", low, 2.0)
        self._bool_option("flip_sign")
        low = self._float_option("distance_low", 0.0, 10.0)
        self._float_option("distance_high", low, 10.0)

    def instructions(self) -> str:
        return (
            "You control a point mass on a line. Each step t, your controller gives a push u (clipped to [-1, 1]); "
            "then the velocity becomes v' = a*v + b*u and the position x' = x + v'. The constants a and b are "
            "unknown to you but stay the same for the whole series of tasks (b may even be negative). "
            "End at the goal with velocity 0 using little effort: the loss is (x_end - goal)^2 + 2*v_end^2 + "
            "0.03*sum(u^2) and the reward is 1/(1 + loss). Write the controller as one arithmetic expression in "
            "x, v, t and goal, for example `u = clip(0.5*(goal - x) - v, -1, 1)`; allowed: numbers, + - * / ** , "
            "comparisons, `a if cond else b`, abs, min, max, clip, sign, sqrt, exp, log, tanh, round, and a list "
            "indexed by t such as [1, 0.5, 0][t]."
        )

    def hidden_facts(self, rng: random.Random) -> dict[str, Any]:
        o = self.options
        a = round(rng.uniform(o["a_low"], o["a_high"]), 3)
        b = round(rng.uniform(o["b_low"], o["b_high"]), 3)
        if o["flip_sign"] and rng.random() < 0.5:
            b = -b
        return {"a": a, "b": b}

    def make_task(self, pack: Pack, index: int, task_id: str) -> OptimalControlTask:
        return OptimalControlTask(pack, index, task_id)
