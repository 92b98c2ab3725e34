"""Heads on top of a backbone's pooled features: bottleneck and DANN domain discriminator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Bottleneck", "DomainDiscriminator", "domain_accuracy", "domain_adversarial_loss"]


class Bottleneck(nn.Sequential):
    """Linear(in_features, dim) -> BatchNorm1d -> ReLU: the 256-d feature layer of DANN."""

    def __init__(self, in_features: int, dim: int = 256) -> None:
        super().__init__(nn.Linear(in_features, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True))
        self.out_features = dim


class DomainDiscriminator(nn.Sequential):
    """Domain classifier D(f): (Linear -> BatchNorm1d -> ReLU) x 2 -> Linear(1), one logit.

    The logit is log P(source | f) - log P(target | f) (Ganin et al., JMLR 2016, with the
    BatchNorm of the Transfer-Learning-Library variant). Put a `GradientReversal` before it.
    """

    def __init__(self, in_features: int, hidden: int = 1024) -> None:
        super().__init__(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_features] -> [B] logits."""
        return super().forward(x).squeeze(-1)


def _domain_targets(logits_source: Tensor, logits_target: Tensor) -> tuple[Tensor, Tensor]:
    """All logits concatenated, with labels 1 (source) and 0 (target)."""
    logits = torch.cat([logits_source.reshape(-1), logits_target.reshape(-1)])
    labels = torch.cat([torch.ones_like(logits_source.reshape(-1)),
                        torch.zeros_like(logits_target.reshape(-1))])
    return logits, labels


def domain_adversarial_loss(logits_source: Tensor, logits_target: Tensor) -> Tensor:
    """L_d = -mean over all n_s + n_t samples of [d log s(z) + (1 - d) log(1 - s(z))],

    d = 1 for source and 0 for target, s the sigmoid (binary cross-entropy with logits).
    """
    logits, labels = _domain_targets(logits_source, logits_target)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def domain_accuracy(logits_source: Tensor, logits_target: Tensor) -> Tensor:
    """Fraction of samples whose domain the discriminator gets right (logit > 0 = source)."""
    logits, labels = _domain_targets(logits_source, logits_target)
    return ((logits > 0) == labels.bool()).float().mean()
