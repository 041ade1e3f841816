"""A restricted arithmetic expression language for control policies. Never calls ``eval``.

The text is parsed with :func:`ast.parse` (parsing only) and every node is checked
against a short allow-list before anything is computed; evaluation walks the checked
tree with plain Python arithmetic. What is allowed:

- numbers; the variables the caller names (e.g. ``x``, ``v``, ``t``, ``goal``);
- ``+ - * / % **`` (``^`` is read as ``**``), unary ``-``/``+``, parentheses;
- comparisons, ``and``/``or``/``not``, and ``a if condition else b``;
- functions ``abs, min, max, clip(value, low, high), sign, sqrt, exp, log, tanh, round, floor, ceil``;
- a list indexed by an expression, ``[0.5, 0.2, -0.1][t]`` (the index is rounded and
  clamped into the list).

Limits: at most :data:`MAX_CHARS` characters and :data:`MAX_NODES` syntax nodes;
exponents at most 16 in size; every intermediate result must be a finite number.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Callable, Iterable

MAX_CHARS = 2000
MAX_NODES = 400
MAX_EXPONENT = 16.0


class ExpressionError(ValueError):
    """The text is not an allowed expression, or computing it failed (the message says why)."""


def _clip(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _sign(value: float) -> float:
    return (value > 0) - (value < 0)


def _checked(fn: Callable, name: str) -> Callable:
    def call(*args):
        try:
            return fn(*args)
        except (ValueError, OverflowError) as exc:
            shown = ", ".join(f"{a:g}" for a in args)
            raise ExpressionError(f"{name}({shown}) failed: {exc}") from None

    return call


FUNCTIONS: dict[str, tuple[Callable, int, int]] = {
    # name: (function, fewest arguments, most arguments)
    "abs": (abs, 1, 1),
    "min": (min, 2, 32),
    "max": (max, 2, 32),
    "clip": (_clip, 3, 3),
    "sign": (_sign, 1, 1),
    "sqrt": (_checked(math.sqrt, "sqrt"), 1, 1),
    "exp": (_checked(math.exp, "exp"), 1, 1),
    "log": (_checked(math.log, "log"), 1, 1),
    "tanh": (math.tanh, 1, 1),
    "round": (lambda v: float(round(v)), 1, 1),
    "floor": (lambda v: float(math.floor(v)), 1, 1),
    "ceil": (lambda v: float(math.ceil(v)), 1, 1),
}

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_COMPARE = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge, ast.Eq: operator.eq, ast.NotEq: operator.ne,
}


class Expression:
    """A checked expression over named variables; call it with their values.

    >>> Expression("clip(0.5*(goal - x) - v, -1, 1)", ["x", "v", "goal"])(x=0, v=0, goal=4)
    1.0
    """

    def __init__(self, text: str, variables: Iterable[str]):
        self.variables = frozenset(variables)
        if not isinstance(text, str) or not text.strip():
            raise ExpressionError("the expression is empty")
        if len(text) > MAX_CHARS:
            raise ExpressionError(f"the expression is {len(text)} characters long; at most {MAX_CHARS} are allowed")
        self.text = text.strip()
        try:
            tree = ast.parse(self.text.replace("^", "**"), mode="eval")
        except SyntaxError as exc:
            raise ExpressionError(f"not a valid expression ({exc.msg}, column {exc.offset})") from None
        except (RecursionError, MemoryError, ValueError):
            raise ExpressionError("the expression is nested too deeply") from None
        nodes = list(ast.walk(tree))
        if len(nodes) > MAX_NODES:
            raise ExpressionError(f"the expression has {len(nodes)} parts; at most {MAX_NODES} are allowed")
        for node in nodes:
            self._check(node)
        self._tree = tree.body

    def _check(self, node: ast.AST) -> None:
        if isinstance(node, (ast.Expression, ast.Load, ast.And, ast.Or, ast.Not, ast.USub, ast.UAdd, ast.IfExp, ast.BoolOp)):
            return
        if isinstance(node, tuple(_BINARY)) or isinstance(node, tuple(_COMPARE)):
            return
        if isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Compare)):
            if isinstance(node, ast.BinOp) and type(node.op) not in _BINARY:
                raise ExpressionError(f"operator {type(node.op).__name__} is not allowed")
            if isinstance(node, ast.UnaryOp) and not isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
                raise ExpressionError(f"operator {type(node.op).__name__} is not allowed")
            if isinstance(node, ast.Compare) and any(type(op) not in _COMPARE for op in node.ops):
                raise ExpressionError("only <, <=, >, >=, ==, != comparisons are allowed")
            return
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise ExpressionError(f"only numbers are allowed as constants, not {node.value!r}")
            try:
                _finite(float(node.value))
            except OverflowError:
                raise ExpressionError("a number in the expression is too large") from None
            return
        if isinstance(node, ast.Name):
            if node.id not in self.variables and node.id not in FUNCTIONS:
                known = ", ".join(sorted(self.variables))
                raise ExpressionError(f"unknown name {node.id!r}; variables: {known}; functions: {', '.join(FUNCTIONS)}")
            return
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                raise ExpressionError(f"only these functions can be called: {', '.join(FUNCTIONS)}")
            if node.keywords:
                raise ExpressionError(f"{node.func.id}() takes no keyword arguments")
            _, low, high = FUNCTIONS[node.func.id]
            if not low <= len(node.args) <= high:
                raise ExpressionError(f"{node.func.id}() takes {low if low == high else f'{low}-{high}'} arguments, got {len(node.args)}")
            return
        if isinstance(node, ast.Subscript):
            if not isinstance(node.value, ast.List):
                raise ExpressionError("only a list literal can be indexed, as in [0.5, 0.2][t]")
            if isinstance(node.slice, ast.Slice):
                raise ExpressionError("slices are not allowed; index a list with one expression")
            return
        if isinstance(node, ast.List):
            if not node.elts:
                raise ExpressionError("an indexed list needs at least one value")
            return
        raise ExpressionError(f"{type(node).__name__} is not allowed in an expression")

    def __call__(self, **values: float) -> float:
        missing = self.variables - set(values)
        if missing:
            raise ExpressionError(f"no value for {', '.join(sorted(missing))}")
        return float(self._eval(self._tree, values))

    def _eval(self, node: ast.AST, env: dict) -> float:
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id in FUNCTIONS:
                raise ExpressionError(f"{node.id} is a function: call it, as in {node.id}(x)")
            return float(env[node.id])
        if isinstance(node, ast.UnaryOp):
            value = self._eval(node.operand, env)
            return -value if isinstance(node.op, ast.USub) else (float(not value) if isinstance(node.op, ast.Not) else value)
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left, env), self._eval(node.right, env)
            if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or (left == 0 and right < 0)):
                raise ExpressionError(f"{left:g} ** {right:g} is not allowed (exponents up to {MAX_EXPONENT:g})")
            try:
                result = _BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ExpressionError("division by zero") from None
            except OverflowError:
                raise ExpressionError("a number grew too large") from None
            return _finite(result)
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, env)
            for op, right_node in zip(node.ops, node.comparators):
                right = self._eval(right_node, env)
                if not _COMPARE[type(op)](left, right):
                    return 0.0
                left = right
            return 1.0
        if isinstance(node, ast.BoolOp):
            value = 0.0
            for operand in node.values:
                value = self._eval(operand, env)
                if isinstance(node.op, ast.And) and not value:
                    return value
                if isinstance(node.op, ast.Or) and value:
                    return value
            return value
        if isinstance(node, ast.IfExp):
            return self._eval(node.body if self._eval(node.test, env) else node.orelse, env)
        if isinstance(node, ast.Call):
            fn = FUNCTIONS[node.func.id][0]
            return _finite(float(fn(*(self._eval(arg, env) for arg in node.args))))
        if isinstance(node, ast.Subscript):
            items = node.value.elts
            index = int(min(max(round(self._eval(node.slice, env)), 0), len(items) - 1))
            return self._eval(items[index], env)
        raise ExpressionError(f"{type(node).__name__} is not allowed in an expression")  # unreachable after _check

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


def _finite(value: float) -> float:
    if isinstance(value, complex) or not math.isfinite(value):
        raise ExpressionError("the result is not a finite number")
    return value
