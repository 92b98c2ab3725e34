"""Losses and weights shared by methods and validators (one definition each).

    H(p)  = -sum_k p_k log p_k               per row of probabilities p [B, K] (0 log 0 = 0)
    v(p)  = 1 + exp(-H(p))                   certainty weight, in [1 + 1/K, 2] (CDAN+E, MCC)

`entropy` takes probabilities (methods: softmax outputs they already hold); `entropy_of_log_probs`
takes log-probabilities (validators: log_softmax of logits, exact for saturated rows). Both are
H, in two numerically different forms that existing results depend on, so both are kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["certainty_weights", "entropy", "entropy_of_log_probs"]


def entropy(p: Tensor) -> Tensor:
    """H(p) = -sum_k p_k log p_k per row (0 log 0 = 0): [B, K] probabilities -> [B]."""
    return torch.special.entr(p).sum(1)


def entropy_of_log_probs(log_p: Tensor) -> Tensor:
    """H = -sum_k p_k log p_k per row of log-probabilities log_p [B, K], p = exp(log_p),
    with 0 log 0 = 0 -> [B]."""
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(1)


def certainty_weights(p: Tensor) -> Tensor:
    """v = 1 + exp(-H(p)) per row, in [1 + 1/K, 2]; detached (a constant weight)."""
    return 1.0 + torch.exp(-entropy(p.detach().float()))
