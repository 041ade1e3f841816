"""``optimal-control``: steer a point mass whose dynamics only the pack knows.

Each pack hides the constants of ``v' = a*v + b*u`` and ``x' = x + v'`` (``b`` may be
negative: pushing one way can move the mass the other way); the reference implementation's
ranges are ``a`` in [0.55, 1.2] and ``|b|`` in [0.35, 1.5]. Every task gives a new start
``(x0, v0)``, a target position and a target velocity. The agent writes a feedback policy
``u(x, v, t, x_target, v_target, horizon, remaining_steps)`` as an arithmetic expression (read by
:mod:`~lifecycle_agent.envs.expression`, never by ``eval``); ``u`` is clipped to [-1, 1] and
applied for ``horizon`` steps.

Reward ``1 / (1 + L)``, ``L = (x_T - x_target)^2 + 2 * (v_T - v_target)^2 + 0.03 * sum(u^2)``.
The feedback is the trajectory the controller produced (what the agent observes; never ``a`` or
``b``). With several attempts per task each one is simulated and shown, and the best counts.
The oracle plays the exact optimum (a box-constrained least-squares problem solved by an
active-set method; the tests check its optimality conditions).
"""

from __future__ import annotations

import random
import re
from typing import Any, Optional
from xml.sax.saxutils import unescape as xml_unescape

from ..tasks import StepResult
from .base import Environment, EnvTask, Pack
from .expression import Expression, ExpressionError
from .options import answer_format_option, draw, range_option
from .parsing import answer_block, code_blocks, inline_code, labelled, nonempty_lines, shorten

#: ``goal`` is a short name for ``x_target`` (kept for controllers written before v_target existed).
VARIABLES = ("x", "v", "t", "goal", "x_target", "v_target", "horizon", "remaining_steps")
EFFORT = 0.03
VELOCITY_WEIGHT = 2.0
_PREFIX = re.compile(r"^\s*(?:[-*>]\s*)?u\s*(?:\([^)]*\))?\s*(?:=|:)\s*", re.IGNORECASE)
_U_ASSIGN = re.compile(r"(?:^|[\s`*(:])u\s*(?:\([^)]*\))?\s*=\s*([^=].*)$", re.IGNORECASE)


def simulate(a: float, b: float, x: float, v: float, goal: float, horizon: int, policy, v_goal: float = 0.0) -> dict[str, Any]:
    """Run ``policy(x, v, t) -> u`` (clipped to [-1, 1]) for ``horizon`` steps. Returns the trajectory and loss."""
    rows, effort = [], 0.0
    for t in range(horizon):
        u = min(1.0, max(-1.0, float(policy(x, v, t))))
        rows.append((t, x, v, u))
        v = a * v + b * u
        x = x + v
        effort += u * u
    position_error, velocity_error = (x - goal) ** 2, VELOCITY_WEIGHT * (v - v_goal) ** 2
    loss = position_error + velocity_error + EFFORT * effort
    return {"rows": rows, "x": x, "v": v, "loss": loss, "parts": (position_error, velocity_error, EFFORT * effort)}


def optimal_controls(a: float, b: float, x: float, v: float, goal: float, horizon: int, v_goal: float = 0.0) -> list[float]:
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
    return solve_box_qp(g, h, goal - zero["x"], v_goal - zero["v"], 1.0, VELOCITY_WEIGHT, EFFORT)


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
    """The policy expression in a reply, read leniently, or ``(None, why)``.

    Looks, in order, at a ``<answer><action_expression>`` block, an ``Action:``/``Policy:``/``Answer:``
    line, lines of the form ``u = ...`` (also inside a sentence), code blocks, inline code, and
    finally the whole one-line reply.
    """
    strict, _ = parse_strict_policy(reply)
    if strict is not None:
        return strict, None
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


STRICT_ANSWER = "<answer><action_expression>EXPRESSION</action_expression></answer>"
_ACTION_EXPRESSION = re.compile(r"^\s*<action_expression>(.*?)</action_expression>\s*$", re.DOTALL | re.IGNORECASE)


def parse_strict_policy(reply: str) -> tuple[Optional[Expression], Optional[str]]:
    """The reference's format: one ``<answer><action_expression>...</action_expression></answer>`` ending the reply.

    As in the reference, a reply with a markdown code fence, text after ``</answer>``, or anything
    but one ``action_expression`` in the answer is refused.
    """
    reply = reply or ""
    if "```" in reply:
        return None, "code fences are not allowed; put the expression in the answer block"
    block = answer_block(reply)
    if block is None:
        return None, f"no {STRICT_ANSWER} block"
    if reply[reply.lower().rfind("</answer>") + len("</answer>"):].strip():
        return None, "the answer block must end the reply"
    found = _ACTION_EXPRESSION.match(block)
    if found is None:
        return None, "the answer block must hold exactly one <action_expression>...</action_expression>"
    text = xml_unescape(found.group(1)).strip()
    try:
        return Expression(text, VARIABLES), None
    except ExpressionError as exc:
        return None, f"{shorten(text, 60)!r}: {exc}"


class OptimalControlTask(EnvTask):
    def __init__(self, pack: Pack, index: int, task_id: str):
        super().__init__(pack, index, task_id)
        env = pack.env
        self.horizon, self.max_turns = env.options["horizon"], env.options["attempts"]
        self.strict = env.options["answer_format"] == "strict"
        self.hints = env.options["hints"]
        self.a, self.b = pack.hidden["a"], pack.hidden["b"]
        rng = pack.instance_rng(index)
        self.x0 = round(draw(rng, env.ranges["start_x"], integer=False), 3)
        self.v0 = round(draw(rng, env.ranges["start_v"], integer=False), 3)
        self.goal = round(draw(rng, env.ranges["target_x"], integer=False), 3)
        self.v_goal = round(draw(rng, env.ranges["target_v"], integer=False), 3)
        self._optimal: Optional[list[float]] = None
        self._reset()

    def _reset(self) -> None:
        self.attempt = 0
        self.best: Optional[float] = None

    def _reply_with(self) -> str:
        if self.strict:
            return f"End your reply with {STRICT_ANSWER} (no code fences)."
        return "Reply with one line `u = <expression>`."

    def start(self) -> str:
        self._reset()
        attempts = f"{self.max_turns} attempt{'s' if self.max_turns != 1 else ''}" + ("; the best one counts" if self.max_turns > 1 else "")
        return (
            f"Initial state: x0 = {self.x0:.3f}, v0 = {self.v0:.3f}. Target: x_target = {self.goal:.3f}, "
            f"v_target = {self.v_goal:.3f} after horizon = {self.horizon} steps (t = 0 .. {self.horizon - 1}). "
            f"You have {attempts}. {self._reply_with()}"
        )

    def _run(self, expression: Expression) -> dict[str, Any]:
        def policy(x, v, t):
            return expression(x=x, v=v, t=t, goal=self.goal, x_target=self.goal, v_target=self.v_goal,
                              horizon=self.horizon, remaining_steps=max(1, self.horizon - t))

        return simulate(self.a, self.b, self.x0, self.v0, self.goal, self.horizon, policy, self.v_goal)

    def step(self, action: str) -> StepResult:
        self.attempt += 1
        last = self.attempt >= self.max_turns
        expression, why = parse_strict_policy(action) if self.strict else parse_policy(action)
        if expression is not None:
            try:
                outcome = self._run(expression)
            except ExpressionError as exc:
                expression, why = None, f"computing u failed: {exc}"
        if expression is None:
            note = f"Attempt {self.attempt}: I could not use your controller ({why}); this attempt scores 0. {self._language()}"
            self.best = self.best if self.best is not None else 0.0
        else:
            self.best = max(self.best or 0.0, 1.0 / (1.0 + outcome["loss"]))
            note = f"Attempt {self.attempt}: u = {expression.text}\n{self._trajectory_text(outcome)}"
        if last:
            return StepResult("", self.best, True, f"{note}{self._hint_text()}")
        left = self.max_turns - self.attempt
        return StepResult(
            f"{note}\nBest reward so far {self.best:.3f}. {self._reply_with()} ({left} attempt{'s' if left != 1 else ''} left)",
            self.best, False, None,
        )

    def _language(self) -> str:
        form = STRICT_ANSWER if self.strict else "one line `u = <expression>`"
        return (f"Write {form} using x, v, t, x_target, v_target, horizon, remaining_steps, numbers, + - * / and "
                "functions such as clip(value, -1, 1).")

    def _trajectory_text(self, outcome: dict[str, Any]) -> str:
        """What the agent observes of a run: the states and pushes, the end state, the loss and the reward."""
        lines = [f"{'t':>3}  {'x_t':>10}  {'v_t':>10}  {'u_t':>10}"]
        lines += [f"{t:>3}  {x:>10.3f}  {v:>10.3f}  {u:>10.3f}" for t, x, v, u in outcome["rows"]]
        lines.append(f"{self.horizon:>3}  {outcome['x']:>10.3f}  {outcome['v']:>10.3f}  {'--':>10}")
        position, velocity, effort = outcome["parts"]
        lines.append(
            f"End: x = {outcome['x']:.3f} (target {self.goal:.3f}), v = {outcome['v']:.3f} (target {self.v_goal:.3f}). "
            f"Loss {outcome['loss']:.3f} = {position:.3f} position + {velocity:.3f} velocity + {effort:.3f} effort; "
            f"reward {1.0 / (1.0 + outcome['loss']):.3f}."
        )
        return "\n".join(lines)

    def _hint_text(self) -> str:
        """The ``hints`` curriculum (easy preset): the sign of ``b``. Never in train or hard."""
        if not self.hints:
            return ""
        grows = "grow" if self.b > 0 else "shrink"
        return f"\nHint: a push u > 0 makes the velocity {grows}."

    def timeout_result(self) -> StepResult:
        return StepResult("", self.best or 0.0, True, f"No attempt left.{self._hint_text()}")

    def optimal_controls(self) -> list[float]:
        if self._optimal is None:
            self._optimal = optimal_controls(self.a, self.b, self.x0, self.v0, self.goal, self.horizon, self.v_goal)
        return self._optimal

    def oracle_action(self) -> str:
        return controls_answer(self.optimal_controls())

    def optimum(self) -> float:
        controls = self.optimal_controls()
        outcome = simulate(self.a, self.b, self.x0, self.v0, self.goal, self.horizon, lambda x, v, t: controls[t], self.v_goal)
        return 1.0 / (1.0 + outcome["loss"])


def controls_answer(controls: list[float]) -> str:
    """A control sequence as a strict answer: a ``[u0, u1, ...][t]`` table."""
    values = ", ".join(f"{u:.6f}" for u in controls)
    return f"<answer><action_expression>[{values}][t]</action_expression></answer>"


class OptimalControl(Environment):
    name = "optimal-control"
    description = (
        "Write a feedback controller u(x, v, t, x_target, v_target) for hidden dynamics v' = a*v + b*u, x' = x + v'."
    )
    easy_hints = "the task states the sign of b"
    defaults: dict[str, Any] = {
        "horizon": 12, "attempts": 1, "a_low": 0.55, "a_high": 1.2, "b_low": 0.35, "b_high": 1.5, "flip_sign": True,
        "start_x": [-2.0, 2.0], "start_v": [-1.5, 1.5], "target_x": [-8.0, 8.0], "target_v": 0.0,
        "answer_format": "strict", "hints": False,
    }
    presets = {
        "train": {},
        "easy": {"horizon": 8, "attempts": 2, "a_low": 0.8, "a_high": 0.9, "b_low": 0.4, "b_high": 0.6, "flip_sign": False,
                 "start_x": [-1.0, 1.0], "start_v": [-0.5, 0.5], "target_x": [-3.0, 3.0],
                 "answer_format": "lenient", "hints": True},
        "hard": {"a_low": 0.5, "a_high": 1.25, "b_low": 0.2, "b_high": 1.5, "target_v": [-0.5, 0.5]},
    }
    _RANGES = {"start_x": 20.0, "start_v": 5.0, "target_x": 20.0, "target_v": 5.0}

    def __init__(self, preset: str = "train", **options: Any):
        super().__init__(preset, **options)
        self._int_option("horizon", 2, 30)
        self._int_option("attempts", 1, 10)
        low = self._float_option("a_low", 0.0, 1.5)
        self._float_option("a_high", low, 1.5)
        low = self._float_option("b_low", 0.01, 2.0)
        self._float_option("b_high", low, 2.0)
        self._bool_option("flip_sign")
        self.ranges = {key: range_option(self, key, -bound, bound, integer=False) for key, bound in self._RANGES.items()}
        self.answer_format = answer_format_option(self)
        self._bool_option("hints")

    def instructions(self) -> str:
        reply = (f"End your reply with {STRICT_ANSWER}, the answer holding only the expression"
                 if self.answer_format == "strict" else "Reply with one line `u = <expression>`")
        sign = " (b may even be negative)" if self.options["flip_sign"] else " (b is positive)"
        return (
            "You control a point mass on a line. Each step t, your controller gives a push u (clipped to [-1, 1]); "
            "then the velocity becomes v' = a*v + b*u and the position x' = x + v'. The constants a and b are "
            f"unknown to you but stay the same for the whole series of tasks{sign}. "
            "End at the target position with the target velocity using little effort: the loss is "
            "(x_end - x_target)^2 + 2*(v_end - v_target)^2 + 0.03*sum(u^2) and the reward is 1/(1 + loss). "
            "Write the controller as one arithmetic expression in x, v, t, x_target, v_target, horizon and "
            f"remaining_steps. {reply}, for example <answer><action_expression>clip(0.5*(x_target - x) - v, -1, 1)"
            "</action_expression></answer>. Allowed: numbers, + - * / ** , comparisons, `a if cond else b`, abs, "
            "min, max, clip, sign, sqrt, exp, log, tanh, round, and a list indexed by t such as [1, 0.5, 0][t]."
            + (" (Curriculum: this preset's feedback says which way a push moves the velocity.)" if self.options["hints"] else "")
        )

    def hidden_facts(self, rng: random.Random) -> dict[str, Any]:
        o = self.options
        a = rng.uniform(o["a_low"], o["a_high"])
        b = rng.uniform(o["b_low"], o["b_high"])
        if o["flip_sign"] and rng.random() < 0.5:
            b = -b
        return {"a": a, "b": b}

    def make_task(self, pack: Pack, index: int, task_id: str) -> OptimalControlTask:
        return OptimalControlTask(pack, index, task_id)

    # The reference policy: it estimates a and b from the trajectories it was shown ------------
    has_reference_policy = True

    def reference_notes(self, notes: str, transcript: str, reward: Optional[float], feedback: Optional[str]) -> str:
        """The dynamics fitted to the steps this task showed (least squares), else the notes' older estimate."""
        estimate = fit_dynamics(transitions(f"{transcript}\n{feedback or ''}")) or read_estimate(notes)
        if estimate is None:
            return ""
        a, b = estimate
        return f"- Dynamics fitted to observed steps: v' = {a:.4f}*v + {b:.4f}*u."

    def reference_reply(self, notes: str, messages: list[dict]) -> str:
        """The optimal push sequence for the fitted dynamics (from the notes or this task's attempts), else a
        generic feedback controller (right when b > 0, as a careful agent would try first)."""
        shown = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")
        estimate = fit_dynamics(transitions(shown)) or read_estimate(notes)
        task = _TASK.search(shown)
        if estimate is None or task is None:
            return f"<answer><action_expression>{FALLBACK}</action_expression></answer>"
        x0, v0, goal, v_goal, horizon = (float(g) for g in task.groups())
        return controls_answer(optimal_controls(*estimate, x0, v0, goal, int(horizon), v_goal))


#: What the reference policy plays before it has seen the system move.
FALLBACK = "clip(0.5*(x_target - x) + 0.5*(v_target - v), -1, 1)"
_ROW = re.compile(r"^\s*(\d+)\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)\s+(-?\d+\.\d+|--)\s*$")
_ESTIMATE = re.compile(r"v' = (-?\d+\.\d+)\*v \+ (-?\d+\.\d+)\*u")
_TASK = re.compile(
    r"x0 = (-?\d+\.\d+), v0 = (-?\d+\.\d+)\. Target: x_target = (-?\d+\.\d+), v_target = (-?\d+\.\d+) after horizon = (\d+)"
)


def transitions(text: str) -> list[tuple[float, float, float]]:
    """``(v_t, u_t, v_t+1)`` for every pair of consecutive rows of the trajectory tables in ``text``."""
    found, previous = [], None
    for line in (text or "").splitlines():
        row = _ROW.match(line)
        if row is None:
            previous = None
            continue
        t, v, u = int(row.group(1)), float(row.group(3)), row.group(4)
        if previous is not None and t == previous[0] + 1:
            found.append((previous[1], previous[2], v))
        previous = (t, v, float(u)) if u != "--" else None
    return found


def fit_dynamics(steps: list[tuple[float, float, float]]) -> Optional[tuple[float, float]]:
    """Least-squares ``a, b`` of ``v' = a*v + b*u`` over ``steps``, or ``None`` when they cannot tell a from b."""
    svv = sum(v * v for v, _, _ in steps)
    svu = sum(v * u for v, u, _ in steps)
    suu = sum(u * u for _, u, _ in steps)
    svy = sum(v * y for v, _, y in steps)
    suy = sum(u * y for _, u, y in steps)
    det = svv * suu - svu * svu
    if len(steps) < 2 or det < 1e-3 * max(svv * suu, 1e-12) or suu < 1e-2:
        return None
    return (svy * suu - suy * svu) / det, (suy * svv - svy * svu) / det


def read_estimate(notes: str) -> Optional[tuple[float, float]]:
    found = _ESTIMATE.findall(notes or "")
    return (float(found[-1][0]), float(found[-1][1])) if found else None
