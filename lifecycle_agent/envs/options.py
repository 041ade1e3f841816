"""Option checks shared by the game environments: ranges drawn per pack or task, the answer format, hints.

A *range option* holds one value or a ``[low, high]`` pair: the reference implementation draws
map sizes, probabilities and round counts from ranges, and a single value keeps a preset fixed.
"""

from __future__ import annotations

import random
from typing import Any, Union

from ..errors import EnvironmentSpecError

#: ``strict``: only the reference implementation's answer format counts (anything else ends the
#: task with reward 0, as in the reference). ``lenient``: the format noise of small models is read
#: too (``Action: 3``, ``I choose 3``, markdown); the strict format is always accepted.
ANSWER_FORMATS = ("strict", "lenient")

Number = Union[int, float]


def range_option(env: Any, key: str, low: Number, high: Number, integer: bool) -> tuple[Number, Number]:
    """Option ``key`` as ``(low, high)``: one value or a ``[low, high]`` pair within ``[low, high]``, or a clear error."""
    value = env.options[key]
    kind = "an integer" if integer else "a number"
    pair = value if isinstance(value, (list, tuple)) else [value, value]

    def ok(item: Any) -> bool:
        if isinstance(item, bool) or not isinstance(item, int if integer else (int, float)):
            return False
        return low <= item <= high

    if len(pair) != 2 or not all(ok(item) for item in pair) or pair[0] > pair[1]:
        raise EnvironmentSpecError(
            f"{env.name}: option {key} must be {kind} from {low} to {high}, or a [low, high] pair of them, got {value!r}"
        )
    return (pair[0], pair[1])


def draw(rng: random.Random, bounds: tuple[Number, Number], integer: bool) -> Number:
    """One value from ``bounds`` (inclusive for integers): the value itself when low == high."""
    low, high = bounds
    if low == high:
        return low
    return rng.randint(low, high) if integer else rng.uniform(low, high)


def answer_format_option(env: Any) -> str:
    """The ``answer_format`` option, checked."""
    value = env.options["answer_format"]
    if value not in ANSWER_FORMATS:
        raise EnvironmentSpecError(
            f"{env.name}: option answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {value!r}"
        )
    return value

