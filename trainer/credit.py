"""Per-episode credit assignment for CoD rollouts (docs/training.md, "Credit assignment").

G rollouts of one pack (same seed, same task order, same starting context), rollout i,
positions j = 0..S-1, solve rewards ``r_x[i][j]`` and update rewards ``r_z[i][j]``
(``j < S-1``; 0 for an update whose reply parsed, -0.1 for one that did not):

    solve return     Rx[i][j] = mean(r_x[i][j], r_x[i][j+1], ..., r_x[i][S-1])
    update return    Rz[i][j] = mean(r_z[i][j], r_x[i][j+1], ..., r_x[i][S-1])
    baseline         b[j]     = mean over i of the return at the same (episode type, j)
    advantage        A[i][j]  = R[i][j] - b[j]          (optionally / (std over i + eps))

An update is credited with the tasks it can still influence. Every function here is pure
Python: lists in, lists out. Arrays and tensors are read through their ``tolist()`` at the
boundary (:func:`_rows`), so the math below sees nothing but lists of floats.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from typing import Any, Hashable, Optional, Sequence

#: Reward of an update episode whose reply held no usable context block (strict miss or lenient format miss).
PARSE_FAILURE_REWARD = -0.1
#: Added to the standard deviation when advantages are scaled by it.
STD_EPS = 1e-6
#: Bounds of the re-weighting temperature searched by :func:`reweight_advantages`.
REWEIGHT_T_MIN, REWEIGHT_T_MAX = 0.8, 100.0
#: The bisection stops once ``|sum_k A_k exp(A_k/T) L_k| <= REWEIGHT_RTOL * sum_k |A_k| L_k`` ...
REWEIGHT_RTOL = 1e-9
#: ... or once its interval is narrower than ``REWEIGHT_T_RTOL * T``.
REWEIGHT_T_RTOL = 1e-12


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def solve_returns(solve_rewards: list[list[float]]) -> list[list[float]]:
    """``Rx[i][j] = mean(r_x[i][j:])``: the mean of this task's reward and every later one."""
    return [[_mean(row[j:]) for j in range(len(row))] for row in solve_rewards]


def update_returns(update_rewards: list[list[float]], solve_rewards: list[list[float]]) -> list[list[float]]:
    """``Rz[i][j] = mean([r_z[i][j]] + r_x[i][j+1:])``: the update's own reward and the tasks after it."""
    return [
        [_mean([r_z[j]] + r_x[j + 1 :]) for j in range(len(r_z))]
        for r_z, r_x in zip(update_rewards, solve_rewards)
    ]


def group_advantages(returns: list[list[float]], normalize_std: bool = False) -> list[list[float]]:
    """``A[i][j] = R[i][j] - mean_i R[i][j]``, per position j over the G rollouts of one pack.

    With ``normalize_std`` the difference is divided by ``std_i R[i][j] + 1e-6`` (sample
    standard deviation, n - 1 in the denominator; a group of one has std 0). A position where
    every rollout has the same return gets advantage 0 either way.
    """
    if not returns:
        return []
    advantages = [[0.0] * len(row) for row in returns]
    for j in range(len(returns[0])):
        column = [row[j] for row in returns]
        baseline = _mean(column)
        scale = 1.0
        if normalize_std:
            n = len(column)
            std = math.sqrt(sum((r - baseline) ** 2 for r in column) / (n - 1)) if n > 1 else 0.0
            scale = std + STD_EPS
        for i, r in enumerate(column):
            advantages[i][j] = (r - baseline) / scale
    return advantages


def cod_advantages(
    solve_rewards: Sequence[Sequence[float]], update_rewards: Sequence[Sequence[float]], normalize_std: bool = False
) -> tuple[list[list[float]], list[list[float]]]:
    """Advantages of every solve and update episode of the G rollouts of one pack.

    Args:
        solve_rewards: G x S rewards ``r_x`` (nested lists; a 2-D array or tensor is read with ``tolist()``).
        update_rewards: G x (S-1) rewards ``r_z`` (0 for a parsed update, -0.1 for an unparseable one).
        normalize_std: divide by the group's standard deviation at each (type, position).

    Returns:
        ``(solve_advantages, update_advantages)``: nested lists of the shapes of the inputs.

    Raises ValueError for ragged, mismatched, non-numeric or non-finite input, naming the offending cell.
    """
    r_x = _matrix(solve_rewards, "solve_rewards")
    r_z = _matrix(update_rewards, "update_rewards")
    if not r_x:
        raise ValueError("solve_rewards holds no rollout: pass G x S rewards with G >= 1")
    size = len(r_x[0])
    if size < 1:
        raise ValueError("solve_rewards rows are empty: a pack has at least one task (S >= 1)")
    if len(r_z) != len(r_x):
        raise ValueError(f"update_rewards has {len(r_z)} rollouts but solve_rewards has {len(r_x)}; both must be G rows")
    for i, (row_x, row_z) in enumerate(zip(r_x, r_z)):
        if len(row_x) != size:
            raise ValueError(f"solve_rewards[{i}] has {len(row_x)} positions, solve_rewards[0] has {size}; rows must be equal")
        if len(row_z) != size - 1:
            raise ValueError(
                f"update_rewards[{i}] has {len(row_z)} positions; expected S - 1 = {size - 1} "
                "(no update follows the last task of a training rollout)"
            )
    adv_x = group_advantages(solve_returns(r_x), normalize_std)
    adv_z = group_advantages(update_returns(r_z, r_x), normalize_std) if size > 1 else [[] for _ in r_x]
    return adv_x, adv_z


# ---------------------------------------------------------------- the boundary: anything in, lists of floats out


def _number(value: Any, where: str) -> float:
    """``value`` as a finite float; ValueError naming ``where`` for anything else (bools included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _rows(values: Any, name: str, what: str) -> list:
    """``values`` as a list: a list or tuple as is, an array or tensor through ``tolist()``, else a ValueError."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{name} must be {what}, got {type(values).__name__}")
    return list(values)


def _vector(values: Any, name: str) -> list[float]:
    """One value per episode, as floats."""
    items = _rows(values, name, "a list of numbers (one value per episode)")
    if any(isinstance(item, (list, tuple)) for item in items):
        raise ValueError(f"{name} must be 1-D (one value per episode), got nested lists")
    return [_number(item, f"{name}[{k}]") for k, item in enumerate(items)]


def _matrix(values: Any, name: str) -> list[list[float]]:
    """G rows of rewards, as floats."""
    rows = _rows(values, name, "G x positions rewards (a list of lists)")
    matrix = []
    for i, row in enumerate(rows):
        row = _rows(row, f"{name}[{i}]", "a list of rewards (2-D input: G rollouts x positions)")
        if any(isinstance(item, (list, tuple)) for item in row):
            raise ValueError(f"{name} must be 2-D (G rollouts x positions), got a deeper nesting at {name}[{i}]")
        matrix.append([_number(value, f"{name}[{i}][{j}]") for j, value in enumerate(row)])
    return matrix


def update_reward(status: Optional[str], penalty: float = PARSE_FAILURE_REWARD) -> float:
    """``r_z`` of one update episode: 0 when its reply held a delimited block (``ok``), else ``penalty``.

    ``format_miss`` (the note was taken leniently from the reply) is penalised like
    ``failed``: deployment keeps it, training teaches the format.
    """
    return 0.0 if status == "ok" else float(penalty)


def reweight_advantages(
    advantages: Sequence[float],
    lengths: Sequence[float],
    t_min: float = REWEIGHT_T_MIN,
    t_max: float = REWEIGHT_T_MAX,
) -> tuple[list[float], Optional[float]]:
    """The paper's optional adaptive re-weighting of a batch of advantages.

    ``lengths[k]`` is the number of completion tokens that carry ``advantages[k]``. When the
    token-weighted sum ``sum_k A_k * L_k`` is negative, a temperature T in ``[t_min, t_max]``
    is found by bisection so that ``f(T) = sum_k A_k * exp(A_k / T) * L_k`` is 0, and every
    advantage becomes ``A_k * exp(A_k / T)`` (positive ones grow, negative ones shrink).

    ``f`` falls as T grows. The bisection runs until ``|f(T)| <= REWEIGHT_RTOL * sum_k |A_k| L_k``
    or the interval is narrower than ``REWEIGHT_T_RTOL * T``; in the second case it returns the end
    where ``f >= 0``, so the re-weighted sum is never left negative when a balancing T exists. When
    ``f(t_max) >= 0`` already, T = ``t_max``; when even ``f(t_min) < 0``, T = ``t_min`` (the closest
    to balance the range allows).

    ``advantages`` and ``lengths`` are lists (a 1-D array or tensor is read with ``tolist()``).
    Returns ``(new_advantages, T)``, the advantages as a list; ``T`` is ``None`` (advantages
    unchanged) when the sum is >= 0. Raises ValueError for mismatched lengths,
    non-numeric or non-finite values, or a negative length.
    """
    values, counts = _vector(advantages, "advantages"), _vector(lengths, "lengths")
    if len(values) != len(counts):
        raise ValueError(f"got {len(values)} advantages but {len(counts)} lengths; pass one length per advantage")
    negative = [k for k, n in enumerate(counts) if n < 0]
    if negative:
        raise ValueError(f"lengths[{negative[0]}] is {counts[negative[0]]}: a completion-token count must be >= 0")
    if not 0 < t_min < t_max:
        raise ValueError(f"need 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")

    def weighted_sum(temperature: Optional[float]) -> float:
        if temperature is None:
            return sum(a * n for a, n in zip(values, counts))
        return sum(a * math.exp(a / temperature) * n for a, n in zip(values, counts))

    if weighted_sum(None) >= 0:
        return values, None
    tolerance = REWEIGHT_RTOL * sum(abs(a) * n for a, n in zip(values, counts))
    temperature = _balancing_temperature(weighted_sum, t_min, t_max, tolerance)
    return [a * math.exp(a / temperature) for a in values], temperature


def _balancing_temperature(weighted_sum, t_min: float, t_max: float, tolerance: float) -> float:
    """Bisection for ``weighted_sum(T) = 0`` on ``[t_min, t_max]`` (``weighted_sum`` falls as T grows)."""
    if weighted_sum(t_max) >= 0:
        return t_max
    if weighted_sum(t_min) < 0:
        return t_min
    low, high = t_min, t_max  # weighted_sum(low) >= 0 > weighted_sum(high)
    while high - low > REWEIGHT_T_RTOL * high:
        middle = (low + high) / 2
        value = weighted_sum(middle)
        if abs(value) <= tolerance:
            return middle
        if value < 0:
            high = middle  # still negative: a lower T favours the positive advantages
        else:
            low = middle
    return low


def batch_advantages(
    packs: Sequence[Hashable],
    solve_rewards: Sequence[Sequence[float]],
    update_rewards: Sequence[Sequence[float]],
    *,
    solve_tokens: Optional[Sequence[Sequence[int]]] = None,
    update_tokens: Optional[Sequence[Sequence[int]]] = None,
    normalize_std: bool = False,
    reweight: bool = False,
) -> tuple[list[list[float]], list[list[float]], Optional[float]]:
    """Advantages of a batch of rollouts of several packs: the rollouts of each pack form one group.

    ``packs[k]`` identifies the pack of rollout k (rollouts of a pack may come in any order).
    With ``reweight``, :func:`reweight_advantages` runs over every episode of the batch,
    weighted by its completion tokens (``solve_tokens`` / ``update_tokens``, same shapes as the
    rewards). Returns ``(solve_advantages, update_advantages, temperature or None)`` per rollout.
    """
    if not len(packs) == len(solve_rewards) == len(update_rewards):
        raise ValueError(
            f"got {len(packs)} pack ids, {len(solve_rewards)} solve reward rows and {len(update_rewards)} update "
            "reward rows; pass one of each per rollout"
        )
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for k, pack in enumerate(packs):
        groups[pack].append(k)
    solve_adv: list[list[float]] = [[] for _ in packs]
    update_adv: list[list[float]] = [[] for _ in packs]
    for members in groups.values():
        adv_x, adv_z = cod_advantages([solve_rewards[k] for k in members], [update_rewards[k] for k in members],
                                      normalize_std)
        for k, ax, az in zip(members, adv_x, adv_z):
            solve_adv[k], update_adv[k] = ax, az
    if not reweight:
        return solve_adv, update_adv, None
    if solve_tokens is None or update_tokens is None:
        raise ValueError("reweighting needs the completion tokens of every episode (solve_tokens and update_tokens)")
    flat = [a for k in range(len(packs)) for a in solve_adv[k] + update_adv[k]]
    lengths = [n for k in range(len(packs)) for n in list(solve_tokens[k]) + list(update_tokens[k])]
    weighted, temperature = reweight_advantages(flat, lengths)
    cursor = 0
    for k in range(len(packs)):
        n_x, n_z = len(solve_adv[k]), len(update_adv[k])
        solve_adv[k] = weighted[cursor : cursor + n_x]
        update_adv[k] = weighted[cursor + n_x : cursor + n_x + n_z]
        cursor += n_x + n_z
    return solve_adv, update_adv, temperature
