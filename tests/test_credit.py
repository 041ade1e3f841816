"""Credit assignment: rewards-to-go returns, per-(type, position) group baselines, re-weighting."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.credit import (
    PARSE_FAILURE_REWARD,
    REWEIGHT_T_MAX,
    REWEIGHT_T_MIN,
    cod_advantages,
    reweight_advantages,
    solve_returns,
    update_returns,
    update_reward,
)


def assert_matrix_close(actual, expected, tol=1e-9):
    assert len(actual) == len(expected)
    for row_a, row_e in zip(actual, expected):
        assert len(row_a) == len(row_e)
        for a, e in zip(row_a, row_e):
            assert a == pytest.approx(e, abs=tol)


def test_solve_return_is_mean_of_rewards_to_go():
    assert_matrix_close(solve_returns([[1, 0, 1], [0, 0, 0]]), [[2 / 3, 0.5, 1], [0, 0, 0]])


def test_update_return_is_own_reward_then_later_tasks():
    assert_matrix_close(update_returns([[0, -0.1]], [[1, 0, 1]]), [[1 / 3, 0.45]])


def test_hand_computed_pack_of_three_tasks():
    solve, update = cod_advantages([[1, 0, 1], [0, 0, 0]], [[0, -0.1], [0, 0]])
    assert_matrix_close(solve, [[1 / 3, 0.25, 0.5], [-1 / 3, -0.25, -0.5]])
    assert_matrix_close(update, [[1 / 6, 0.225], [-1 / 6, -0.225]])


def test_ties_share_the_same_advantage():
    solve, update = cod_advantages([[1, 1], [1, 1], [0, 0]], [[0], [0], [0]])
    assert_matrix_close(solve, [[1 / 3, 1 / 3], [1 / 3, 1 / 3], [-2 / 3, -2 / 3]])
    assert_matrix_close(update, [[1 / 6], [1 / 6], [-1 / 3]])


def test_all_equal_group_has_zero_advantage():
    solve, update = cod_advantages([[1, 0, 1]] * 4, [[0, -0.1]] * 4)
    assert_matrix_close(solve, [[0, 0, 0]] * 4)
    assert_matrix_close(update, [[0, 0]] * 4)


def test_all_equal_group_has_zero_advantage_with_std_scaling():
    solve, update = cod_advantages([[0.5, 0.5]] * 3, [[-0.1]] * 3, normalize_std=True)
    assert_matrix_close(solve, [[0, 0]] * 3)
    assert_matrix_close(update, [[0]] * 3)


def test_single_task_pack_has_no_update_advantages():
    solve, update = cod_advantages([[1], [0]], [[], []])
    assert_matrix_close(solve, [[0.5], [-0.5]])
    assert update == [[], []]


def test_parse_failure_lowers_only_that_update():
    solve, update = cod_advantages([[0, 1], [0, 1]], [[update_reward("ok")], [update_reward("format_miss")]])
    assert_matrix_close(solve, [[0, 0], [0, 0]])
    assert_matrix_close(update, [[0.025], [-0.025]])


def test_update_reward_penalises_every_status_but_ok():
    assert update_reward("ok") == 0.0
    for status in ("format_miss", "failed", "error", None):
        assert update_reward(status) == PARSE_FAILURE_REWARD == -0.1


def test_std_scaling_divides_by_sample_std():
    solve, _ = cod_advantages([[1, 0], [0, 0]], [[0], [0]], normalize_std=True)
    expected = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert_matrix_close(solve, [[expected, 0], [-expected, 0]], tol=1e-6)


def test_tensors_and_arrays_are_read_and_lists_come_back():
    torch = pytest.importorskip("torch")
    solve, update = cod_advantages(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0], [-0.1]]))
    assert isinstance(solve, list) and all(isinstance(v, float) for row in solve for v in row)
    assert solve[0][0] == pytest.approx(0.25) and len(update) == 2 and len(update[0]) == 1
    _, update = cod_advantages(torch.tensor([[1.0], [0.0]]), torch.zeros(2, 0))
    assert update == [[], []]
    np = pytest.importorskip("numpy")
    solve, update = cod_advantages(np.array([[1, 0, 1], [0, 0, 0]]), np.array([[0, -0.1], [0, 0]]))
    assert_matrix_close(solve, [[1 / 3, 0.25, 0.5], [-1 / 3, -0.25, -0.5]])
    assert_matrix_close(update, [[1 / 6, 0.225], [-1 / 6, -0.225]])


@pytest.mark.parametrize(
    "solve, message",
    [
        (lambda np: np.array([1.0, 0.0]), r"solve_rewards\[0\] must be a list of rewards \(2-D input: G rollouts x positions\), got float"),
        (lambda np: np.zeros((2, 2, 1)), r"solve_rewards must be 2-D \(G rollouts x positions\), got a deeper nesting at solve_rewards\[0\]"),
        (lambda np: np.array([["a", "b"], ["c", "d"]]), r"solve_rewards\[0\]\[0\] must be a finite number, got 'a'"),
        (lambda np: [[1, "x"], [0, 0]], r"solve_rewards\[0\]\[1\] must be a finite number, got 'x'"),
        (lambda np: [[True, 0], [0, 0]], r"solve_rewards\[0\]\[0\] must be a finite number, got True"),
        (lambda np: None, r"solve_rewards must be G x positions rewards \(a list of lists\), got NoneType"),
    ],
)
def test_unsupported_rewards_are_refused_with_the_reason(solve, message):
    np = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match=message):
        cod_advantages(solve(np), [[0], [0]])


def test_ragged_solve_rewards_are_refused():
    with pytest.raises(ValueError, match=r"solve_rewards\[1\] has 1 positions"):
        cod_advantages([[1, 0], [1]], [[0], [0]])


def test_update_rewards_of_wrong_length_are_refused():
    with pytest.raises(ValueError, match=r"update_rewards\[0\] has 2 positions; expected S - 1 = 1"):
        cod_advantages([[1, 0], [1, 0]], [[0, 0], [0]])


def test_mismatched_group_sizes_are_refused():
    with pytest.raises(ValueError, match="update_rewards has 1 rollouts but solve_rewards has 2"):
        cod_advantages([[1, 0], [1, 0]], [[0]])


def test_non_finite_reward_is_refused_with_its_cell():
    with pytest.raises(ValueError, match=r"solve_rewards\[0\]\[1\] must be a finite number"):
        cod_advantages([[1, float("nan")], [0, 0]], [[0], [0]])


def test_empty_group_is_refused():
    with pytest.raises(ValueError, match="no rollout"):
        cod_advantages([], [])


def test_reweighting_leaves_a_non_negative_batch_alone():
    values, temperature = reweight_advantages([1.0, -1.0], [3, 1])
    assert values == [1.0, -1.0] and temperature is None


def test_reweighting_finds_the_temperature_that_zeroes_the_token_sum():
    values, temperature = reweight_advantages([1.0, -1.0], [1, 3])
    # exp(1/T) = 3 exp(-1/T)  =>  T = 2 / ln 3
    assert temperature == pytest.approx(2 / math.log(3), rel=1e-6)
    assert values[0] == pytest.approx(math.exp(1 / temperature))
    assert abs(values[0] * 1 + values[1] * 3) < 0.1


def test_reweighting_stops_at_the_lowest_temperature():
    values, temperature = reweight_advantages([0.01, -1.0], [1, 100])
    assert temperature == pytest.approx(0.8, abs=0.05)
    assert values[1] > -1.0  # negative advantages shrink


def weighted_sum(values, lengths):
    return sum(a * n for a, n in zip(values, lengths))


def test_reweighting_converges_on_the_token_sum_not_on_the_interval():
    advantages, lengths = [2.0, -0.1], [1, 100]
    values, temperature = reweight_advantages(advantages, lengths)
    scale = sum(abs(a) * n for a, n in zip(advantages, lengths))  # 12
    assert abs(weighted_sum(values, lengths)) <= 1e-6 * scale  # stopping on a 0.05-wide interval left -0.31
    assert temperature == pytest.approx(1.3048, abs=1e-4)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(min_value=-2, max_value=2, allow_nan=False), st.integers(min_value=0, max_value=300)),
             min_size=1, max_size=12)
)
def test_reweighted_sum_is_balanced_or_on_its_non_negative_side(batch):
    advantages, lengths = [a for a, _ in batch], [n for _, n in batch]
    values, temperature = reweight_advantages(advantages, lengths)
    if temperature is None:
        assert weighted_sum(advantages, lengths) >= 0 and values == advantages
        return
    total, scale = weighted_sum(values, lengths), sum(abs(a) * n for a, n in batch)
    if temperature == REWEIGHT_T_MIN:  # the sharpest allowed re-weighting may still leave it negative
        return
    assert REWEIGHT_T_MIN < temperature <= REWEIGHT_T_MAX
    assert total >= -1e-6 * scale and (temperature == REWEIGHT_T_MAX or abs(total) <= 1e-6 * scale)


def test_reweighting_reads_numpy_and_tensors_and_gives_a_list_back():
    np = pytest.importorskip("numpy")
    values, temperature = reweight_advantages(np.array([2.0, -0.1]), np.array([1, 100]))
    assert isinstance(values, list) and len(values) == 2 and temperature == pytest.approx(1.3048, abs=1e-4)
    torch = pytest.importorskip("torch")
    again, _ = reweight_advantages(torch.tensor([2.0, -0.1], dtype=torch.float64), torch.tensor([1, 100]))
    assert again == pytest.approx(values)


@pytest.mark.parametrize(
    "advantages, lengths, message",
    [
        (lambda np: ["x", 1.0], [1, 1], r"advantages\[0\] must be a finite number, got 'x'"),
        (lambda np: [1.0, float("nan")], [1, 1], r"advantages\[1\] must be a finite number, got nan"),
        (lambda np: [1.0, -1.0], [1, -3], r"lengths\[1\] is -3.0: a completion-token count must be >= 0"),
        (lambda np: np.array([[1.0, -1.0]]), [1, 1], r"advantages must be 1-D \(one value per episode\), got nested lists"),
        (lambda np: 0.5, [1], r"advantages must be a list of numbers \(one value per episode\), got float"),
    ],
)
def test_reweighting_refuses_unsupported_input_with_the_reason(advantages, lengths, message):
    np = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match=message):
        reweight_advantages(advantages(np), lengths)


def test_reweighting_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="2 advantages but 1 lengths"):
        reweight_advantages([1.0, -1.0], [1])


@st.composite
def packs(draw):
    group = draw(st.integers(min_value=1, max_value=6))
    size = draw(st.integers(min_value=1, max_value=5))
    reward = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(min_value=-1, max_value=1, allow_nan=False))
    solve = [[draw(reward) for _ in range(size)] for _ in range(group)]
    update = [[draw(st.sampled_from([0.0, PARSE_FAILURE_REWARD])) for _ in range(size - 1)] for _ in range(group)]
    return solve, update


@settings(max_examples=200, deadline=None)
@given(packs(), st.booleans())
def test_group_advantages_sum_to_zero_at_every_type_and_position(pack, normalize_std):
    solve, update = pack
    adv_solve, adv_update = cod_advantages(solve, update, normalize_std=normalize_std)
    for advantages in (adv_solve, adv_update):
        for j in range(len(advantages[0])):
            assert abs(sum(row[j] for row in advantages)) < 1e-9 * len(advantages)


@settings(max_examples=100, deadline=None)
@given(packs())
def test_advantages_keep_the_shapes_of_the_rewards(pack):
    solve, update = pack
    adv_solve, adv_update = cod_advantages(solve, update)
    assert [len(r) for r in adv_solve] == [len(r) for r in solve]
    assert [len(r) for r in adv_update] == [len(r) for r in update]
