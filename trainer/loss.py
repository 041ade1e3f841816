"""The paper's one-sided masked policy-gradient loss (docs/training.md, "Loss").

For every completion token t with advantage A_t (its episode's advantage), new log-prob
``logp_t`` (the policy being trained, at the sampling temperature) and rollout log-prob
``logp_rollout_t`` (recorded by the model that sampled it):

    ratio_t = exp(logp_t - logp_rollout_t)                        (no gradient through it)
    keep_t  = (A_t >= 0 and ratio_t <= 1.2) or (A_t <= 0 and ratio_t >= 0.8)
    loss    = sum over completion tokens of  -A_t * logp_t * keep_t
              / number of completion tokens                        (token mean)

A dropped token counts in the denominator as zero, like a clipped token in PPO. There is
no importance weight and no KL term: the ratio only decides which tokens learn, so a token
whose probability already moved far in the advantage's direction stops moving.
"""

from __future__ import annotations

#: Tokens with a non-negative advantage learn while ratio <= 1 + CLIP_HIGH.
CLIP_HIGH = 0.2
#: Tokens with a non-positive advantage learn while ratio >= 1 - CLIP_LOW.
CLIP_LOW = 0.2


def keep_mask(ratio, advantages, clip_low: float = CLIP_LOW, clip_high: float = CLIP_HIGH):
    """Boolean tensor: which tokens carry loss (the one-sided rule above). Shapes broadcast."""
    return ((advantages >= 0) & (ratio <= 1 + clip_high)) | ((advantages <= 0) & (ratio >= 1 - clip_low))


def cod_policy_loss_sum(logps, rollout_logps, advantages, mask, clip_low: float = CLIP_LOW, clip_high: float = CLIP_HIGH):
    """Sum over completion tokens of ``-A_t * logp_t`` for the tokens :func:`keep_mask` keeps.

    Args:
        logps: (B, T) log-probs of the completion tokens under the policy being trained.
        rollout_logps: (B, T) log-probs recorded when the tokens were sampled.
        advantages: (B,) one advantage per row (broadcast over its tokens) or (B, T).
        mask: (B, T) 1 for completion tokens, 0 for padding (prompts are never in these tensors).

    Returns ``(loss_sum, kept_tokens)``; divide ``loss_sum`` by the number of completion
    tokens of the whole batch for the token mean (the caller knows it across micro-batches
    and processes).
    """
    import torch

    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps.detach() - rollout_logps)
    keep = keep_mask(ratio, advantages, clip_low, clip_high).to(logps.dtype) * mask
    loss_sum = (-advantages * logps * keep).sum()
    return loss_sum, keep.sum().detach()


def cod_policy_loss(logps, rollout_logps, advantages, mask, clip_low: float = CLIP_LOW, clip_high: float = CLIP_HIGH):
    """Token mean of the one-sided masked loss over one batch (see the module docstring)."""
    loss_sum, _ = cod_policy_loss_sum(logps, rollout_logps, advantages, mask, clip_low, clip_high)
    return loss_sum / mask.sum().clamp(min=1)
