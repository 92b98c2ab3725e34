"""Gradient reversal layer (Ganin & Lempitsky, ICML 2015; Ganin et al., JMLR 2016, DANN).

Identity in the forward pass; multiplies the gradient by -coeff in the backward pass, so the
feature extractor below it maximises the loss that the domain discriminator above it minimises.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

__all__ = ["GradientReversal", "grad_reverse", "grl_coefficient"]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, coeff: float) -> Tensor:  # type: ignore[override]
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad.neg().mul_(ctx.coeff), None


def grad_reverse(x: Tensor, coeff: float = 1.0) -> Tensor:
    """y = x; dL/dx = -coeff * dL/dy."""
    return _GradReverse.apply(x, float(coeff))


def grl_coefficient(p: float, alpha: float = 10.0) -> float:
    """DANN schedule lambda(p) = 2 / (1 + exp(-alpha p)) - 1 for training progress p in [0, 1].

    Rises from 0 at p = 0 to ~1 (0.99991 for alpha = 10) at p = 1, which suppresses the noisy
    domain signal early in training (Ganin et al., 2016, Sec. 5.2.2).
    """
    return 2.0 / (1.0 + math.exp(-alpha * p)) - 1.0


class GradientReversal(nn.Module):
    """Module form of `grad_reverse`; set `coeff` (e.g. to `grl_coefficient(p)`) each step."""

    def __init__(self, coeff: float = 1.0) -> None:
        super().__init__()
        self.coeff = coeff

    def forward(self, x: Tensor) -> Tensor:
        return grad_reverse(x, self.coeff)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}"
