"""Soft neighborhood density of the target predictions, SND (Saito et al., "Tune it the Right
Way: Unsupervised Validation of Domain Adaptation via Soft Neighborhood Density", ICCV 2021;
higher is better), logged as `val_snd`; None with fewer than 2 target images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from torch import Tensor

from domadapt.nn.losses import entropy_of_log_probs
from domadapt.validators.base import EvalOutputs, as_2d_float, register_validator

__all__ = ["soft_neighborhood_density"]


def soft_neighborhood_density(
    scores: Tensor | ArrayLike,
    temperature: float = 0.05,
    *,
    probabilities: bool = False,
    chunk_size: int = 2048,
) -> float:
    """SND of the target predictions (Saito et al., ICCV 2021); higher is better.

    With p_i = softmax(z_i) (or the given probabilities when `probabilities=True`),
    f_i = p_i / ||p_i||_2, S_ij = f_i . f_j, and for each i the softmax over its neighbours
    j != i (the diagonal is excluded exactly):

        P_ij = exp(S_ij / tau) / sum_{l != i} exp(S_il / tau),
        SND  = -(1/N) sum_i sum_{j != i} P_ij log P_ij,     tau = `temperature` (0.05).

    (The authors' code masks the diagonal with S_ii = -1 instead of removing it and adds 1e-5
    inside the log; both change SND by less than ~1e-5 relative.) Needs N >= 2. Computed in
    row blocks of `chunk_size`, so memory is O(chunk_size * N).
    """
    s = as_2d_float(scores, "scores")
    n = s.size(0)
    if n < 2:
        raise ValueError(f"soft_neighborhood_density needs at least 2 samples, got {n}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p = s if probabilities else F.softmax(s, dim=1)
    f = F.normalize(p, p=2, dim=1)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, n, chunk_size):
        block = f[start:start + chunk_size] @ f.T / temperature  # [b, N]
        rows = torch.arange(block.size(0))
        block[rows, rows + start] = -math.inf  # drop each sample's similarity to itself
        total += entropy_of_log_probs(F.log_softmax(block, dim=1)).double().sum()
    return (total / n).item()


@register_validator("snd", higher_is_better=True,
                    help="soft neighborhood density on the target")
def val_snd(ev: EvalOutputs) -> float | None:
    return soft_neighborhood_density(ev.target_logits) if len(ev.target_logits) >= 2 else None
