"""Source-only training (ERM): cross-entropy on labelled source images, target unused.

    L = CE(C(F(x_s)), y_s)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domadapt.models import DomainAdaptModel


class StepOutput(NamedTuple):
    """One iteration: the loss to back-propagate and detached scalar statistics."""

    loss: Tensor
    stats: dict[str, Tensor]


def batch_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(1) == labels).float().mean()


class SourceOnly(nn.Module):
    """ERM on the source (or, in the multi-domain setting, on the pooled training domains)."""

    uses_target = False

    def __init__(self, model: DomainAdaptModel) -> None:
        super().__init__()
        self.model = model

    def heads(self) -> list[nn.Module]:
        return [self.model.bottleneck, self.model.classifier]

    def forward(self, x_s: Tensor, y_s: Tensor, x_t: Tensor | None = None,
                p: float = 0.0) -> StepOutput:
        logits, _ = self.model(x_s)
        cls_loss = F.cross_entropy(logits.float(), y_s)
        with torch.no_grad():
            stats = {"cls_loss": cls_loss.detach(), "train_acc": batch_accuracy(logits, y_s)}
        return StepOutput(cls_loss, stats)
