"""The one-sided masked policy-gradient loss on crafted ratios and advantage signs."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from trainer.loss import cod_policy_loss, cod_policy_loss_sum, keep_mask  # noqa: E402


def rollout_logps_for(ratios, logps):
    """Rollout log-probs that give exactly these ratios exp(logp - rollout)."""
    return logps.detach() - torch.log(torch.tensor(ratios, dtype=torch.float64))


def grads(ratios, advantages):
    """Per-token gradient of the token-mean loss for one row with these ratios and per-token advantages."""
    logps = torch.full((1, len(ratios)), -1.0, dtype=torch.float64, requires_grad=True)
    rollout = rollout_logps_for([ratios], logps)
    loss = cod_policy_loss(logps, rollout, torch.tensor([advantages], dtype=torch.float64), torch.ones(1, len(ratios)))
    loss.backward()
    return logps.grad[0].tolist()


def test_positive_advantage_learns_while_ratio_at_most_1_2():
    assert keep_mask(torch.tensor([0.5, 1.0, 1.2, 1.21, 3.0]), torch.tensor(1.0)).tolist() == [True, True, True, False, False]


def test_negative_advantage_learns_while_ratio_at_least_0_8():
    assert keep_mask(torch.tensor([0.1, 0.79, 0.8, 1.0, 5.0]), torch.tensor(-1.0)).tolist() == [False, False, True, True, True]


def test_zero_advantage_is_kept_everywhere():
    assert keep_mask(torch.tensor([0.1, 1.0, 5.0]), torch.tensor(0.0)).tolist() == [True, True, True]


def test_gradient_is_minus_advantage_over_token_count_on_kept_tokens():
    g = grads([1.0, 1.1, 1.3, 0.9, 0.7, 1.5], [2.0, 2.0, 2.0, -1.0, -1.0, -1.0])
    n = 6
    assert g == pytest.approx([-2.0 / n, -2.0 / n, 0.0, 1.0 / n, 0.0, 1.0 / n])


def test_dropped_tokens_still_count_in_the_token_mean():
    logps = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    rollout = rollout_logps_for([[1.0, 1.5]], logps)
    loss = cod_policy_loss(logps, rollout, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2))
    assert loss.item() == pytest.approx((-1.0 * -1.0) / 2)


def test_padding_never_carries_loss():
    logps = torch.tensor([[-1.0, -50.0], [-3.0, -4.0]], dtype=torch.float64)
    rollout = logps.clone()
    mask = torch.tensor([[1, 0], [1, 1]])
    loss = cod_policy_loss(logps, rollout, torch.tensor([1.0, -1.0], dtype=torch.float64), mask)
    assert loss.item() == pytest.approx((1.0 - 3.0 - 4.0) / 3)


def test_row_advantage_broadcasts_over_its_tokens():
    logps = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    per_row = cod_policy_loss(logps, logps, torch.tensor([0.5], dtype=torch.float64), torch.ones(1, 2))
    per_token = cod_policy_loss(logps, logps, torch.tensor([[0.5, 0.5]], dtype=torch.float64), torch.ones(1, 2))
    assert per_row.item() == per_token.item() == pytest.approx(0.5 * 3 / 2)


def test_ratio_carries_no_gradient():
    logps = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    loss = cod_policy_loss(logps, torch.tensor([[-1.0]], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64), torch.ones(1, 1))
    loss.backward()
    assert logps.grad.item() == pytest.approx(-3.0)  # exactly -A: no d(ratio)/d(logp) term


def test_loss_sum_reports_kept_tokens():
    logps = torch.zeros(1, 3, dtype=torch.float64)
    rollout = rollout_logps_for([[1.0, 2.0, 0.5]], logps)
    _, kept = cod_policy_loss_sum(logps, rollout, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 3))
    assert kept.item() == 2


def test_empty_batch_gives_zero_not_nan():
    logps = torch.zeros(1, 2)
    loss = cod_policy_loss(logps, logps, torch.tensor([1.0]), torch.zeros(1, 2))
    assert loss.item() == 0.0 and not math.isnan(loss.item())
