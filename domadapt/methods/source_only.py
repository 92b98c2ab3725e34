"""Source-only training (ERM): cross-entropy on labelled source images, target unused.

    L = CE(C(F(x_s)), y_s)
"""

from __future__ import annotations

from torch import Tensor

from domadapt.methods.base import (
    Method,
    Step,
    StepOutput,
    batch_accuracy,
    register_method,
    supervised_loss,
)
from domadapt.nn.domains import SOURCE


@register_method
class SourceOnly(Method):
    """ERM on the source (or, in the multi-domain setting, on the pooled training domains)."""

    name = "source-only"
    help = "ERM on the labelled source (the multi-domain setting's only method)"

    def forward(self, x_s: Tensor, y_s: Tensor, x_t: Tensor | None, step: Step) -> StepOutput:
        logits, _ = self.model(x_s, domains=SOURCE)
        cls_loss = supervised_loss(logits, y_s)
        stats = {"cls_loss": cls_loss.detach(), "train_acc": batch_accuracy(logits, y_s)}
        return StepOutput(cls_loss, stats)
