"""MCD (Saito et al., CVPR 2018, "Maximum Classifier Discrepancy for Unsupervised Domain
Adaptation"): a feature generator G and two classifiers F1, F2, trained in three steps per
iteration. With p_k = softmax(F_k(G(x))) and the discrepancy

    d(p1, p2) = mean over samples and classes of |p1 - p2|     (the paper's L1 distance)

    A  min over G, F1, F2   CE(p1(x_s), y_s) + CE(p2(x_s), y_s)
    B  min over F1, F2      CE(p1(x_s), y_s) + CE(p2(x_s), y_s) - d(p1(x_t), p2(x_t))   (G fixed)
    C  min over G           d(p1(x_t), p2(x_t))          (F1, F2 fixed), repeated `mcd_steps` times

B makes the classifiers disagree on target samples outside the source support while staying
right on the source; C moves the target features to where they agree. The paper repeats C
n = 4 times on digits (`mcd_steps`, default 4).

Here G = backbone + bottleneck, F1 = the model's classifier (the one evaluated: target
accuracy is F1's), F2 = a second linear classifier of the same shape (its own random
initialisation). Two optimizers with the run's rules: "generator" (G) and "classifiers"
(F1, F2). Departures from the paper, all for consistency with the other methods here: SGD with
the run's lr schedule (the paper uses Adam at 2e-4 for digits), and source and target are
forwarded concatenated in every step (as Transfer-Learning-Library's MCD and this project's DANN:
BN/BIN layers normalize with mixed-batch statistics; the losses use only their own halves).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domadapt.errors import UserError
from domadapt.methods.base import (
    Method,
    SGDFactory,
    Step,
    StepFn,
    batch_accuracy,
    register_method,
    supervised_loss,
)
from domadapt.nn.domains import concat_domains, domain_labels
from domadapt.registry import hparam


@dataclass(frozen=True)
class MCDHparams:
    mcd_steps: int = hparam(4, "MCD: generator steps (C) per iteration, n in the paper")

    def __post_init__(self) -> None:
        if self.mcd_steps <= 0:
            raise UserError(f"--mcd-steps must be positive, got {self.mcd_steps}")


def classifier_discrepancy(logits_1: Tensor, logits_2: Tensor) -> Tensor:
    """d = mean |softmax(z1) - softmax(z2)| over samples and classes, in float32."""
    return (F.softmax(logits_1.float(), dim=1) - F.softmax(logits_2.float(), dim=1)).abs().mean()


@register_method
class MCD(Method):
    """Maximum classifier discrepancy (module docstring for the three steps)."""

    name = "mcd"
    help = "maximum classifier discrepancy: two classifiers, alternating steps (Saito et al.)"
    Hparams = MCDHparams
    uses_target = True
    owns_update = True

    def __init__(self, model, hp: MCDHparams, *, num_classes: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, hp, num_classes=num_classes)
        self.classifier2 = nn.Linear(model.classifier.in_features, num_classes)

    def build_optimizers(self, sgd: SGDFactory) -> dict[str, torch.optim.Optimizer]:
        return {"generator": sgd(backbone=[self.model.backbone], heads=[self.model.bottleneck]),
                "classifiers": sgd(heads=[self.model.classifier, self.classifier2])}

    def features(self, x_s: Tensor, x_t: Tensor) -> Tensor:
        """G([x_s; x_t]): bottleneck features of the concatenated batch."""
        x, domains = concat_domains(x_s, x_t)
        with domain_labels(self.model, domains):
            return self.model.bottleneck(self.model.backbone(x))

    def source_loss(self, f: Tensor, y_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(CE(F1) + CE(F2) on the source rows, F1's logits, F2's logits) of features f."""
        z1, z2 = self.model.classifier(f), self.classifier2(f)
        n = y_s.shape[0]
        return supervised_loss(z1[:n], y_s) + supervised_loss(z2[:n], y_s), z1, z2

    def step_a(self, x_s: Tensor, y_s: Tensor, x_t: Tensor, opt: StepFn) -> dict[str, Tensor]:
        """A: G, F1 and F2 descend CE1 + CE2 on the source."""
        loss, z1, _ = self.source_loss(self.features(x_s, x_t), y_s)
        opt(("generator", "classifiers"), loss)
        return {"cls_loss": loss.detach() / 2,
                "train_acc": batch_accuracy(z1[:y_s.shape[0]].detach(), y_s)}

    def step_b(self, x_s: Tensor, y_s: Tensor, x_t: Tensor, opt: StepFn) -> Tensor:
        """B: F1 and F2 descend CE1 + CE2 - d on features of the fixed G; returns d."""
        with torch.no_grad():
            f = self.features(x_s, x_t)
        loss, z1, z2 = self.source_loss(f, y_s)
        n = y_s.shape[0]
        disc = classifier_discrepancy(z1[n:], z2[n:])
        opt("classifiers", loss - disc)
        return disc.detach()

    def step_c(self, x_s: Tensor, x_t: Tensor, opt: StepFn) -> Tensor:
        """C: G descends d (F1, F2 receive gradients but are not stepped); returns d."""
        f = self.features(x_s, x_t)
        n = x_s.shape[0]
        disc = classifier_discrepancy(self.model.classifier(f[n:]), self.classifier2(f[n:]))
        opt("generator", disc)
        return disc.detach()

    def update(self, x_s: Tensor, y_s: Tensor, x_t: Tensor | None, step: Step,
               opt: StepFn) -> dict[str, Tensor]:
        """A, B, then C `mcd_steps` times. Statistics: cls_loss (mean of CE1, CE2 in A),
        train_acc (F1's, in A), discrepancy_max (d in B), discrepancy (mean d over the C steps,
        before each step)."""
        if x_t is None:
            raise ValueError("MCD needs a target batch")
        stats = self.step_a(x_s, y_s, x_t, opt)
        stats["discrepancy_max"] = self.step_b(x_s, y_s, x_t, opt)
        discs = [self.step_c(x_s, x_t, opt) for _ in range(self.hp.mcd_steps)]
        stats["discrepancy"] = torch.stack(discs).mean()
        return stats
